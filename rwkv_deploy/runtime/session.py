"""ONNX Runtime sessions over an export folder, driven by its manifest, and `open_session` for every backend.

Imports no torch: serving an export needs onnxruntime, numpy and a tokenizer only (design.md §3).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..custom_ops import CPU_PRODUCTS
from ..errors import RWKVDeployError
from .contract import Session, State, StateSpec
from .manifest import MANIFEST, Manifest, read_manifest

log = logging.getLogger(__name__)

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RWKVDeployError("onnxruntime is not installed: pip install 'rwkv-deploy[onnx]'")
    return onnxruntime


def default_providers() -> list[str]:
    available = _ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def resolve_providers(providers: str | list | None) -> list:
    """None (CUDA when this onnxruntime has it, else CPU), "cpu", "cuda", or a list of ONNX Runtime providers
    (names or (name, options) pairs). A provider this onnxruntime lacks is an error: ONNX Runtime itself would
    fall back to the CPU with only a warning, and "cuda" would silently measure the CPU."""
    if providers is None:
        return default_providers()
    if isinstance(providers, str):
        if providers not in PROVIDERS:
            raise RWKVDeployError(f"unknown provider {providers!r}; expected one of {', '.join(PROVIDERS)}")
        providers = PROVIDERS[providers]
    available = _ort().get_available_providers()
    for p in providers:
        name = p[0] if isinstance(p, tuple) else p
        if name not in available:
            hint = "; pip install onnxruntime-gpu for CUDA" if name == "CUDAExecutionProvider" else ""
            raise RWKVDeployError(f"{name} is not available in this onnxruntime (it has {', '.join(available)}){hint}")
    return list(providers)


class OnnxSession(Session):
    """An export folder on ONNX Runtime, behind the Session contract (runtime/contract.py).

    Two ways to run, one contract: `sess.run` with numpy feeds (the state is numpy arrays), or I/O binding
    (io_binding=True; the default with the CUDA provider), where the state is OrtValues on the provider's device:
    each step binds the state OrtValues as inputs and fresh device OrtValues as outputs, so the state never
    crosses to the host between steps; only tokens go in and logits come out. On the CPU provider the binding
    path computes the same thing (and is how it is tested on machines without a GPU).

    On the CPU provider the numpy way is already copy-free: ONNX Runtime reads the feeds in place and hands its
    outputs to numpy without a copy, from its memory arena (no page faults per step). Output buffers recycled from a
    pool between steps were measured against it and gained nothing (169M fp32, ±0.1 ms of a 20 ms step), so there
    is no pool.

    threads: ONNX Runtime's intra-op threads (None: its default, one per physical core). spinning: whether idle
    worker threads spin while they wait for work (None: ONNX Runtime's default, on). Measured on a 2-core VM, 169M
    fp32 decode: on an otherwise idle machine spinning is faster (v7 46.6 tok/s, 40.2 without); with one other
    busy process, a spinning worker holds the core the step needs and spinning=False is 1.65x faster (25 vs 15
    tok/s; threads=1 about the same).

    trust_custom_ops=True loads the folder's custom-op library even if this installation did not build it
    (loading a library runs its native code; see `_register_library`).
    """

    def __init__(self, folder: str | Path, providers: str | list | None = None, threads: int | None = None, *,
                 trust_custom_ops: bool = False, io_binding: bool | None = None, spinning: bool | None = None):
        ort = _ort()
        self._ortvalue = ort.OrtValue
        self.manifest: Manifest = read_manifest(folder)
        self.trust_custom_ops = trust_custom_ops
        self.folder = Path(folder)
        self.states = self.manifest.state
        self.state_specs = [StateSpec(s.input, tuple(s.shape), s.dtype) for s in self.states]
        self.vocab_size = int(self.manifest["vocab_size"])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if self.manifest.get("quantization"):  # what int8/int4 certificates assume (docs/precision.md), said
            # rather than left to ONNX Runtime's default: MatMulNBits rounds each product's input to int8
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
        self.providers = resolve_providers(providers)
        self._register_library(opts)
        self._step = self._open(ort, "step", opts)
        # The prefill graph is opened when first used: each ONNX Runtime session holds its own copy of the weights
        # (on CPU, fp16 ones widened to fp32), so verify and check, which only step, hold one copy, not two.
        self._prefill, self._ort, self._opts = None, ort, opts
        active = self._step.get_providers()  # what ONNX Runtime actually runs, not what was asked for
        # the device that bound state lives on: the CUDA provider's GPU, else host memory
        self.device = ("cpu", 0)
        if "CUDAExecutionProvider" in active:
            cuda = self._step.get_provider_options().get("CUDAExecutionProvider", {})
            self.device = ("cuda", int(cuda.get("device_id", 0)))
        self.io_binding = self.device[0] != "cpu" if io_binding is None else bool(io_binding)
        self.backend = "onnxruntime " + "/".join(active)
        if self.io_binding:
            self.backend += f" with I/O binding (state on {self.device[0]}:{self.device[1]})"

    def _register_library(self, opts) -> None:
        """Load the folder's custom-op library, but only one this installation built, unless trusted explicitly.

        Loading a shared library runs its constructors: an export folder from elsewhere must not run native
        code just by being opened. Every check here reads bytes; nothing is loaded before they all pass.
        """
        lib = self.manifest.custom_op_library("CPUExecutionProvider")
        if not lib:
            return
        from ..custom_ops.build import file_sha256, is_trusted_library, library_version

        path = lib["path"]
        how = "rebuild it with `rwkv-deploy build-ops` and re-export with --wkv fused (or export with --wkv portable)"
        if not path.is_file():
            raise RWKVDeployError(f"this export needs the rwkv custom-op library {path}, which is missing; {how}")
        digest = file_sha256(path)
        if lib["sha256"] and digest != lib["sha256"]:  # format 2 pins the exact file, trusted or not
            raise RWKVDeployError(f"{path} has sha256 {digest[:16]}…, manifest.json requires "
                                  f"{lib['sha256'][:16]}…: it is not the library this folder was exported with, so it "
                                  f"was not loaded; {how}")
        built = lib["rwkv_deploy_version"] and library_version(path)  # format 1 names the version that built it
        if built != lib["rwkv_deploy_version"]:
            raise RWKVDeployError(f"{path} was built by rwkv-deploy {built}, the manifest expects "
                                  f"{lib['rwkv_deploy_version']}; {how}")
        if not self.trust_custom_ops and not is_trusted_library(path):
            raise RWKVDeployError(
                f"{path} (sha256 {digest[:16]}…) is a custom-op library that this installation did not "
                "build, so it was not loaded: loading it would run its native code. If you trust where this export "
                "folder came from, pass --trust-custom-ops (Python: open_session(folder, trust_custom_ops=True)); "
                f"otherwise {how}")
        try:
            opts.register_custom_ops_library(str(path))
        except Exception as e:  # onnxruntime's own error types
            raise RWKVDeployError(f"ONNX Runtime refused {path}: {str(e).splitlines()[0][:300]}; {how}")
        # the library's kernels are CPU kernels: keep the CPU provider in the list
        if "CPUExecutionProvider" not in self.providers:
            self.providers = [*self.providers, "CPUExecutionProvider"]
        ops = ((self.manifest.get("requires") or {}).get("custom_ops") or {}).get("ops", [])
        products = sorted(op for op in ops if op in CPU_PRODUCTS)
        if products and self.providers[0] != "CPUExecutionProvider":
            log.warning("%s multiplies with the library's CPU kernels (%s): under %s those products run on the "
                        "CPU (export with --matmul portable for GPUs)", self.folder, ", ".join(products),
                        self.providers[0])
        if products:
            import ctypes

            # trusted and registered above: the symbol only reports the path this CPU (and the env cap) gives
            symbol = "RwkvMatMulF16Path" if "MatMulF16" in products else "RwkvMatMulQPath"
            path_taken = getattr(ctypes.CDLL(str(path)), symbol, None)
            if path_taken is not None:
                path_taken.restype = ctypes.c_char_p
                if path_taken() == b"plain":
                    log.warning("on this CPU (or with this library's compiler) the fp16/int8/int4 products of %s "
                                "run a plain loop, slower than ONNX Runtime's own (re-export with --matmul "
                                "portable)", self.folder)

    def _open(self, ort, name: str, opts):
        graph = self.manifest.graph(name)
        path = self.manifest.path(f"graphs.{name}.file", graph["file"])
        if not path.is_file():
            raise RWKVDeployError(f"{path} is missing; the export folder is incomplete, re-export it")
        if graph.get("external_data"):
            data = self.manifest.path(f"graphs.{name}.external_data", graph["external_data"])
            if not data.is_file():
                raise RWKVDeployError(f"{data} (the weights of {path.name}) is missing; the export folder is "
                                      "incomplete, re-export it")
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise RWKVDeployError(f"ONNX Runtime could not load {path}: {str(e).splitlines()[0][:300]}")
        self._check_io(sess, graph, path)
        return sess

    def _check_io(self, sess, graph: dict, path: Path) -> None:
        """The manifest and the graph must agree on names, dtypes and state shapes, or every client would
        misbehave; checked here so that a mismatch is an error before anything runs or prints."""
        ins = {i.name: ORT_TYPES.get(i.type, i.type) for i in sess.get_inputs()}
        outs = {o.name: ORT_TYPES.get(o.type, o.type) for o in sess.get_outputs()}
        want_in = {graph["tokens"]: "int64", **{s.input: s.dtype for s in self.states}}
        want_out = {graph["logits"]: "float32", **{s.output: s.dtype for s in self.states}}
        for kind, want, got in (("input", want_in, ins), ("output", want_out, outs)):
            if want != got:
                diff = sorted(set(want.items()) ^ set(got.items()))[:3]
                raise RWKVDeployError(f"{path} does not match manifest.json: {kind}s differ ({diff}); re-export the model")
        shapes = {a.name: a.shape for a in (*sess.get_inputs(), *sess.get_outputs())}
        for s in self.states:
            for name in (s.input, s.output):
                if not _same_shape(shapes[name], s.shape):
                    raise RWKVDeployError(f"{path} does not match manifest.json: state {name} is "
                                          f"{_show(shapes[name])} in the graph, {_show(s.shape)} in the manifest; "
                                          "re-export the model")

    @property
    def has_prefill(self) -> bool:
        return "prefill" in self.manifest["graphs"]

    def _prefill_session(self):
        if self._prefill is None:
            self._prefill = self._open(self._ort, "prefill", self._opts)
        return self._prefill

    def _initial(self, batch: int) -> dict:
        return {s.input: self._to_device(s.initial(self.folder, batch)) for s in self.states}

    def _to_device(self, array: np.ndarray):
        return self._ortvalue.ortvalue_from_numpy(array, *self.device) if self.io_binding else array

    def _to_host(self, value) -> np.ndarray:
        return np.array(value.numpy() if self.io_binding else value)  # OrtValue.numpy() copies from the GPU

    def _run(self, graph: str, tokens: np.ndarray, state: State) -> tuple[np.ndarray, dict]:
        g = self.manifest.graph(graph)
        sess = self._step if graph == "step" else self._prefill_session()
        if not self.io_binding:
            out = sess.run([g["logits"], *(s.output for s in self.states)], {g["tokens"]: tokens, **state})
            return out[0], dict(zip(self.state_names, out[1:]))
        binding = sess.io_binding()
        binding.bind_cpu_input(g["tokens"], np.ascontiguousarray(tokens))  # a few ids: copied in every call
        binding.bind_output(g["logits"], "cpu")  # logits go to the host, where sampling runs
        new = {}
        for s in self.states:
            binding.bind_ortvalue_input(s.input, state[s.input])
            # a fresh buffer on the device for each new state tensor: the input State stays intact (reusable)
            new[s.input] = self._ortvalue.ortvalue_from_shape_and_type(
                [state.batch, *s.shape[1:]], np.dtype(s.dtype).type, *self.device)
            binding.bind_ortvalue_output(s.output, new[s.input])
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy(), new  # outputs come in binding order: logits first

    def _load_tokenizer(self):
        from .tokenizer import manifest_tokenizer

        return manifest_tokenizer(self.manifest)


def _same_shape(graph_shape, manifest_shape: list) -> bool:
    """Same rank, and the same size wherever the graph fixes one (symbolic dims, like the batch, match anything).

    The first dimension is the batch: the schema makes it "batch" in the manifest, and the graph may name it.
    """
    if not graph_shape:  # ONNX Runtime reports an unknown rank as [] (state tensors are never scalars)
        return True
    if len(graph_shape) != len(manifest_shape):
        return False
    return all(not isinstance(g, int) or g == m for g, m in zip(graph_shape[1:], manifest_shape[1:]))


def _show(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


BACKENDS = ("ort", "torch", "trt")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise RWKVDeployError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def torch_device(providers) -> str:
    """The torch backend's device from the same argument: None or "cpu" -> cpu, "cuda" -> cuda."""
    if providers not in (None, "cpu", "cuda"):
        raise RWKVDeployError(f"the torch backend runs on 'cpu' or 'cuda', got providers={providers!r}")
    return providers or "cpu"


def open_session(path: str | Path, backend: str = "ort", providers: str | list | None = None,
                 threads: int | None = None, *, trust_custom_ops: bool = False,
                 io_binding: bool | None = None, spinning: bool | None = None) -> Session:
    """A Session (runtime/contract.py) on an export folder or a checkpoint.

    backend "ort": an export folder on ONNX Runtime (no torch needed). providers: None (CUDA if available, else
    CPU), "cpu", "cuda" or a list of ONNX Runtime providers; io_binding: keep the state on the device (default
    with CUDA); threads, spinning: ONNX Runtime's CPU threads (see OnnxSession). trust_custom_ops=True allows a
    custom-op library that this installation did not build (it runs native code).
    backend "torch": the PyTorch reference, on a checkpoint (float32) or on an export folder's source checkpoint
    at the export's precision; providers None/"cpu"/"cuda" picks the torch device.
    backend "trt": an export folder's TensorRT engines (`rwkv-deploy engine`) on a CUDA GPU; trust_custom_ops
    allows a WKV launcher library this installation did not build (fused exports).
    """
    check_backend(backend)
    path = Path(path)
    folder = path.is_dir() and (path / MANIFEST).is_file()
    if backend == "torch":
        from .torch_session import TorchSession

        device = torch_device(providers)
        if folder:
            return TorchSession.for_export(read_manifest(path), device=device, threads=threads)
        return TorchSession(path, device=device, threads=threads)
    if backend == "trt" and folder:  # the folder's TensorRT engines (rwkv-deploy engine) on this machine's GPU
        from ..trt.session import TrtSession

        return TrtSession(path, trust_plugin_library=trust_custom_ops)
    if not folder and (path.is_file() or (path / "config.json").is_file()):
        raise RWKVDeployError(f"{path} is a checkpoint, not an export folder: export it first (`rwkv-deploy export`), "
                              "or run it with the PyTorch reference (--backend torch; Python: backend=\"torch\")")
    return OnnxSession(path, providers, threads, trust_custom_ops=trust_custom_ops, io_binding=io_binding,
                       spinning=spinning)
