"""ONNX Runtime sessions over an export folder, driven by its manifest. Imports no torch."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError
from .manifest import Manifest, read_manifest

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


class OnnxSession:
    """`init_state(batch)` and `step(tokens, state) -> (logits [B, V] float32, state)` on numpy arrays."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        ort = _ort()
        self.manifest: Manifest = read_manifest(folder)
        self.folder = Path(folder)
        self.states = self.manifest.state
        self.vocab_size = int(self.manifest["vocab_size"])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = providers or default_providers()
        self._register_library(opts)
        step = self.manifest.graph("step")
        self._step = self._open(ort, step, opts)
        self._prefill = self._open(ort, self.manifest.graph("prefill"), opts) if "prefill" in self.manifest["graphs"] else None
        self.tokenizer = None

    def _register_library(self, opts) -> None:
        lib = self.manifest.get("custom_op_library")
        if not lib:
            return
        from ..custom_ops.build import library_version

        path = Path(lib["path"]) if Path(lib["path"]).is_absolute() else self.folder / lib["path"]
        how = "rebuild it with `rwkv-deploy build-ops` and re-export with --wkv fused (or export with --wkv portable)"
        if not path.exists():
            raise RWKVDeployError(f"this export needs the rwkv custom-op library {path}, which is missing; {how}")
        built = library_version(path)
        if built != lib.get("rwkv_deploy_version"):
            raise RWKVDeployError(f"{path} was built by rwkv-deploy {built}, the manifest expects "
                                  f"{lib.get('rwkv_deploy_version')}; {how}")
        try:
            opts.register_custom_ops_library(str(path))
        except Exception as e:  # onnxruntime's own error types
            raise RWKVDeployError(f"ONNX Runtime refused {path}: {str(e).splitlines()[0][:300]}; {how}")
        # the library's kernels are CPU kernels: keep the CPU provider in the list
        if "CPUExecutionProvider" not in self.providers:
            self.providers = [*self.providers, "CPUExecutionProvider"]

    def _open(self, ort, graph: dict, opts):
        path = self.folder / graph["file"]
        if not path.exists():
            raise RWKVDeployError(f"{path} is missing; the export folder is incomplete, re-export it")
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise RWKVDeployError(f"ONNX Runtime could not load {path}: {str(e).splitlines()[0][:300]}")
        self._check_io(sess, graph, path)
        return sess

    def _check_io(self, sess, graph: dict, path: Path) -> None:
        """The manifest and the graph must agree on names and dtypes, or every client would misbehave."""
        ins = {i.name: ORT_TYPES.get(i.type, i.type) for i in sess.get_inputs()}
        outs = {o.name: ORT_TYPES.get(o.type, o.type) for o in sess.get_outputs()}
        want_in = {graph["tokens"]: "int64", **{s.input: s.dtype for s in self.states}}
        want_out = {graph["logits"]: "float32", **{s.output: s.dtype for s in self.states}}
        for kind, want, got in (("input", want_in, ins), ("output", want_out, outs)):
            if want != got:
                diff = sorted(set(want.items()) ^ set(got.items()))[:3]
                raise RWKVDeployError(f"{path} does not match manifest.json: {kind}s differ ({diff}); re-export the model")

    def init_state(self, batch: int = 1) -> list[np.ndarray]:
        return [s.initial(self.folder, batch) for s in self.states]

    def check_inputs(self, tokens: np.ndarray, state: list[np.ndarray], seq: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu" or tokens.ndim != (2 if seq else 1):
            raise RWKVDeployError(f"tokens must be integer ids of shape {'[batch, seq]' if seq else '[batch]'}, "
                                  f"got {tokens.dtype} {list(tokens.shape)}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)].flat[0]
            raise RWKVDeployError(f"token id {bad} is out of range [0, {self.vocab_size})")
        batch = tokens.shape[0]
        if len(state) != len(self.states):
            raise RWKVDeployError(f"state has {len(state)} tensors, the manifest lists {len(self.states)}")
        for s, t in zip(self.states, state):
            want = [batch, *s.shape[1:]]
            if list(t.shape) != want or t.dtype != np.dtype(s.dtype):
                raise RWKVDeployError(f"state {s.input}: expected {s.dtype} {want}, got {t.dtype} {list(t.shape)}")
        return tokens.astype(np.int64)

    def step(self, tokens, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        return self._run(self._step, "step", self.check_inputs(tokens, state), state)

    def _run(self, sess, graph: str, tokens: np.ndarray, state: list[np.ndarray]):
        g = self.manifest.graph(graph)
        feeds = {g["tokens"]: tokens, **{s.input: t for s, t in zip(self.states, state)}}
        out = sess.run([g["logits"], *(s.output for s in self.states)], feeds)
        return out[0], out[1:]

    @property
    def has_prefill(self) -> bool:
        return self._prefill is not None

    def prefill(self, tokens, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens [B, T] through the prefill graph -> logits and the state after the last token.

        logits are [B, V] (last position) or [B, T, V] for exports made with `--prefill all`.
        """
        if self._prefill is None:
            raise RWKVDeployError(f"{self.folder} has no prefill graph; re-export with --prefill")
        tokens = self.check_inputs(tokens, state, seq=True)
        if tokens.shape[1] == 0:
            raise RWKVDeployError("prefill needs at least one token")
        return self._run(self._prefill, "prefill", tokens, state)

    def forward(self, tokens, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens [B, T] -> logits of the last position [B, V] and the state after it.

        Uses the prefill graph when the export has one, else one step per token.
        """
        if self._prefill is not None:
            logits, state = self.prefill(tokens, state)
            return (logits[:, -1] if logits.ndim == 3 else logits), state
        tokens = self.check_inputs(tokens, state, seq=True)
        logits = None
        for t in range(tokens.shape[1]):
            logits, state = self.step(tokens[:, t], state)
        return logits, state

    def get_tokenizer(self):
        if self.tokenizer is None:
            from .tokenizer import load_tokenizer

            entry = self.manifest.get("tokenizer")
            if not entry:
                raise RWKVDeployError(f"{self.folder} has no tokenizer; re-export with --tokenizer FILE")
            self.tokenizer = load_tokenizer(self.folder / entry["file"], entry["kind"])
        return self.tokenizer


def open_session(folder: str | Path, providers: list[str] | None = None, threads: int | None = None) -> OnnxSession:
    return OnnxSession(folder, providers, threads)
