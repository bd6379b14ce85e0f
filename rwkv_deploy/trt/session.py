"""The TensorRT Session: an export folder's engines behind the Session contract (runtime/contract.py).

The State is device buffers (cuda.DeviceArray) from one step to the next: each step binds the state buffers as
inputs and fresh buffers from the pool as outputs, so a kept State stays intact and, in a generation loop, two
sets of buffers alternate (ping-pong). Only tokens go in and logits come out per call. Needs a CUDA GPU, the
TensorRT that built the engines, and cuda-python; for fused exports also the rwkv plugins (plugin.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError
from ..runtime.contract import Session, State, StateSpec
from ..runtime.manifest import read_manifest
from . import import_tensorrt
from .engine import engine_records, trt_logger


class TrtSession(Session):
    """An export folder's TensorRT engines (built by `rwkv-deploy engine`) on this machine's GPU.

    trust_plugin_library=True loads a WKV launcher library that this installation did not build (fused exports).
    """

    def __init__(self, folder: str | Path, *, trust_plugin_library: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        # checked against the manifest (sha256 included) before anything needs TensorRT or a GPU
        records = {r["graph"]: r for r in engine_records(folder)}
        if "step" not in records:
            raise RWKVDeployError(f"{folder} has no TensorRT engine for its step graph; build one with "
                                  f"`rwkv-deploy engine {folder}`")
        trt, flavour = import_tensorrt()
        for r in records.values():
            if (r["flavour"], r["version"]) != (flavour, trt.__version__):
                raise RWKVDeployError(f"{r['file']} was built by {r['flavour']} {r['version']}, this is {flavour} "
                                      f"{trt.__version__}: engines run only on the TensorRT that built them; rebuild")
        from .cuda import DevicePool, Stream, no_gpu_reason

        reason = no_gpu_reason()
        if reason:
            raise RWKVDeployError(f"the TensorRT backend needs a CUDA GPU: {reason}")
        if any(r["plugins"] for r in records.values()):
            from .plugin import load_launchers, register_plugins

            register_plugins(trt, flavour)  # before deserialising: the engine names its plugins' creators
            load_launchers(trust=trust_plugin_library)
        self.states = self.manifest.state
        self.state_specs = [StateSpec(s.input, tuple(s.shape), s.dtype) for s in self.states]
        self.vocab_size = int(self.manifest["vocab_size"])
        self.records = records
        self.stream = Stream(DevicePool())
        runtime = trt.Runtime(trt_logger(trt))
        self._engines, self._contexts = {}, {}
        for graph, r in records.items():
            data = self.manifest.path(f"engines[{graph}].file", r["file"]).read_bytes()
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise RWKVDeployError(f"{flavour} could not load {r['file']} on this GPU (built for "
                                      f"{', '.join(r['targets'])}); rebuild it with --target for this GPU")
            self._engines[graph], self._contexts[graph] = engine, engine.create_execution_context()
        self.backend = f"{flavour} {trt.__version__} (state on cuda)"

    def close(self) -> None:
        """Give back this session's device memory and stream (the engines and contexts with them); the session
        cannot run after this. Called on garbage collection too; closing twice does nothing."""
        stream = self.__dict__.pop("stream", None)
        if stream is None:
            return
        stream.sync()  # nothing may still be reading or writing the buffers freed below
        self._engines, self._contexts = {}, {}  # TensorRT frees the contexts' own device memory with them
        stream.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit CUDA may already be gone; nothing to report to
            pass

    @property
    def has_prefill(self) -> bool:
        return "prefill" in self._contexts

    def _initial(self, batch: int) -> dict:
        self._check_batch(batch, "step")
        return {s.input: self._to_device(s.initial(self.folder, batch)) for s in self.states}

    def _to_device(self, array: np.ndarray):
        return self.stream.upload(array)

    def _to_host(self, value) -> np.ndarray:
        return self.stream.download(value)

    def _check_batch(self, batch: int, graph: str, seq: int | None = None) -> None:
        """Shapes outside the engine's profile would fail inside TensorRT: refuse them with the range."""
        g = self.manifest.graph(graph)
        high = self.records[graph]["profiles"][0][g["tokens"]]["max"]
        if batch > high[0] or (seq is not None and seq > high[1]):
            raise RWKVDeployError(f"the {graph} engine takes up to batch {high[0]}" +
                                  (f" and {high[1]} tokens" if len(high) > 1 else "") +
                                  "; rebuild with `rwkv-deploy engine --max-batch/--max-seq`")

    def _run(self, graph: str, tokens: np.ndarray, state: State) -> tuple[np.ndarray, dict]:
        g, ctx, B = self.manifest.graph(graph), self._contexts[graph], state.batch
        self._check_batch(B, graph, tokens.shape[1] if tokens.ndim == 2 else None)
        toks = self.stream.upload(tokens.astype(np.int64))  # [B] or [B, T]
        ctx.set_input_shape(g["tokens"], list(tokens.shape))
        ctx.set_tensor_address(g["tokens"], toks.ptr)
        new = {}
        for s in self.states:
            shape = [B, *s.shape[1:]]
            ctx.set_input_shape(s.input, shape)
            ctx.set_tensor_address(s.input, state[s.input].ptr)
            new[s.input] = self.stream.empty(shape, s.dtype)  # fresh: the input State stays usable
            ctx.set_tensor_address(s.output, new[s.input].ptr)
        logits = self.stream.empty(tuple(ctx.get_tensor_shape(g["logits"])), np.float32)  # [B, V] or [B, T, V]
        ctx.set_tensor_address(g["logits"], logits.ptr)
        if not ctx.execute_async_v3(self.stream.ptr):
            raise RWKVDeployError(f"TensorRT failed to run the {graph} engine: "
                                  + "; ".join(trt_logger(import_tensorrt()[0]).lines[-3:]))
        return self.stream.download(logits), new  # download waits for the stream: toks stays alive until then

    def _load_tokenizer(self):
        from ..runtime.tokenizer import manifest_tokenizer

        return manifest_tokenizer(self.manifest)
