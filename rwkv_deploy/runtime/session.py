"""ONNX Runtime sessions over an export folder, driven by its manifest. Imports no torch."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError, check_batch
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
    """`init_state(batch)` and `step(tokens, state) -> (logits [B, V] float32, state)` on numpy arrays.

    trust_custom_ops=True loads the folder's custom-op library even if this installation did not build it
    (loading a library runs its native code; see `_register_library`).
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None, *,
                 trust_custom_ops: bool = False):
        ort = _ort()
        self.manifest: Manifest = read_manifest(folder)
        self.trust_custom_ops = trust_custom_ops
        self.folder = Path(folder)
        self.states = self.manifest.state
        self.vocab_size = int(self.manifest["vocab_size"])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = providers or default_providers()
        self._register_library(opts)
        self._step = self._open(ort, "step", opts)
        self._prefill = self._open(ort, "prefill", opts) if "prefill" in self.manifest["graphs"] else None
        self.tokenizer = None

    def _register_library(self, opts) -> None:
        """Load the folder's custom-op library, but only one this installation built, unless trusted explicitly.

        Loading a shared library runs its constructors: an export folder from elsewhere must not run native
        code just by being opened. Every check here reads bytes; nothing is loaded before they all pass.
        """
        lib = self.manifest.get("custom_op_library")
        if not lib:
            return
        from ..custom_ops.build import file_sha256, is_trusted_library, library_version

        path = self.manifest.path("custom_op_library.path", lib["path"])
        how = "rebuild it with `rwkv-deploy build-ops` and re-export with --wkv fused (or export with --wkv portable)"
        if not path.is_file():
            raise RWKVDeployError(f"this export needs the rwkv custom-op library {path}, which is missing; {how}")
        built = library_version(path)
        if built != lib.get("rwkv_deploy_version"):
            raise RWKVDeployError(f"{path} was built by rwkv-deploy {built}, the manifest expects "
                                  f"{lib.get('rwkv_deploy_version')}; {how}")
        if not self.trust_custom_ops and not is_trusted_library(path):
            raise RWKVDeployError(
                f"{path} (sha256 {file_sha256(path)[:16]}…) is a custom-op library that this installation did not "
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

    def init_state(self, batch: int = 1) -> list[np.ndarray]:
        return [s.initial(self.folder, check_batch(batch)) for s in self.states]

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
            self.tokenizer = load_tokenizer(self.manifest.path("tokenizer.file", entry["file"]), entry["kind"])
        return self.tokenizer


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


def open_session(folder: str | Path, providers: list[str] | None = None, threads: int | None = None, *,
                 trust_custom_ops: bool = False) -> OnnxSession:
    """Open an export folder with ONNX Runtime; trust_custom_ops=True allows a custom-op library that this
    installation did not build (it runs native code)."""
    return OnnxSession(folder, providers, threads, trust_custom_ops=trust_custom_ops)
