"""The Session contract that every backend implements (design.md §3), and the named recurrent State.

    state = sess.init_state(batch)                      # State: state input name -> backend array
    logits, state = sess.step(tokens, state)            # tokens [B] int          -> logits [B, V]
    logits, state = sess.prefill(tokens, state)         # tokens [B, T], one call -> [B, V] ([B, T, V]: --prefill all)
    logits, state = sess.forward(tokens, state)         # tokens [B, T]           -> logits [B, V] of the LAST position
    arrays = state.to_numpy()                           # {name: np.ndarray}, host copies
    state = sess.state_from_numpy(arrays)               # and back, validated against the state table

Logits are numpy arrays on the host (float32; float64 from a float64 torch session). The State stays where the
backend keeps it (numpy, an ONNX Runtime OrtValue on the GPU, a torch tensor) between calls: only `to_numpy`
copies it to the host. Sessions never change a State in place, so one can be kept and reused (e.g. to branch
generation after a prompt).

Compatibility with format-1 callers: step/prefill/forward also accept the state as a list of numpy arrays in the
manifest's state order (converted with state_from_numpy on every call, so a copy to the device each time); they
always return a State. Numpy and the manifest only here: no torch, no onnxruntime.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RWKVDeployError, check_batch


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: its name (the manifest's state input name, e.g. "state.0.att_x"), shape with "batch"
    first, and numpy dtype name."""

    name: str
    shape: tuple
    dtype: str


class State(Mapping):
    """The recurrent state of `batch` sequences: state name -> backend array, in the state table's order."""

    __slots__ = ("_arrays", "batch", "backend", "_to_host")

    def __init__(self, arrays: dict[str, Any], batch: int, backend: str, to_host: Callable[[Any], np.ndarray]):
        self._arrays, self.batch, self.backend, self._to_host = arrays, batch, backend, to_host

    def __getitem__(self, name: str):
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """{name: array} copied to the host; the caller owns the arrays (changing them leaves the State alone)."""
        return {name: self._to_host(a) for name, a in self._arrays.items()}

    def __repr__(self) -> str:
        return f"State(batch={self.batch}, {len(self)} tensors, {self.backend})"


class Session(ABC):
    """A model behind the contract above. A backend sets `backend` (what runs, in words), `vocab_size`,
    `state_specs` and `manifest` (the export folder's, or None), and implements the section marked "backend";
    the checks of tokens, state and batch and the step/prefill/forward logic are shared here."""

    backend: str
    vocab_size: int
    state_specs: list[StateSpec]
    manifest: Mapping | None = None
    _tokenizer = None

    # --- backend ---------------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def has_prefill(self) -> bool:
        """Whether prefill() runs a whole sequence in one call."""

    @abstractmethod
    def _initial(self, batch: int) -> dict[str, Any]:
        """The initial state as backend arrays, by name."""

    @abstractmethod
    def _to_device(self, array: np.ndarray):
        """A host array (already checked against the state table) as a backend array."""

    @abstractmethod
    def _to_host(self, value) -> np.ndarray:
        """A backend array as a numpy array that the caller owns."""

    @abstractmethod
    def _run(self, graph: str, tokens: np.ndarray, state: State) -> tuple[np.ndarray, dict[str, Any]]:
        """graph "step" (tokens [B]) or "prefill" (tokens [B, T]) -> host logits and the new backend arrays."""

    @abstractmethod
    def _load_tokenizer(self):
        """The tokenizer, or an RWKVDeployError that says how to provide one."""

    # --- the contract ----------------------------------------------------------------------------------------

    @property
    def state_names(self) -> list[str]:
        return [s.name for s in self.state_specs]

    def init_state(self, batch: int = 1) -> State:
        batch = check_batch(batch)
        return self._state(self._initial(batch), batch)

    def state_from_numpy(self, arrays: Mapping[str, np.ndarray]) -> State:
        """A State from {name: numpy array}: every name of the state table, same batch, exact shapes and dtypes."""
        names = self.state_names
        missing, extra = [n for n in names if n not in arrays], [n for n in arrays if n not in names]
        if missing or extra:
            raise RWKVDeployError(f"state names differ from the state table: missing {missing[:3]}, "
                                  f"unexpected {extra[:3]} (expected {names[:3]}...)")
        batch, out = None, {}
        for spec in self.state_specs:
            a = np.asarray(arrays[spec.name])
            if batch is None and a.ndim:
                batch = check_batch(a.shape[0])
            want = [batch, *spec.shape[1:]]
            if list(a.shape) != want or a.dtype != np.dtype(spec.dtype):
                raise RWKVDeployError(f"state {spec.name}: expected {spec.dtype} {want}, got {a.dtype} {list(a.shape)}")
            out[spec.name] = self._to_device(np.array(a, order="C"))  # a copy: the State owns its arrays
        return self._state(out, batch)

    def step(self, tokens, state) -> tuple[np.ndarray, State]:
        """tokens [B] -> logits [B, V] and the state after them."""
        tokens, state = self._inputs(tokens, state, seq=False)
        return self._call("step", tokens, state)

    def prefill(self, tokens, state) -> tuple[np.ndarray, State]:
        """tokens [B, T] in one call -> logits [B, V] of the last position ([B, T, V] for `--prefill all`
        exports) and the state after the last token."""
        if not self.has_prefill:
            where = self.manifest.folder if self.manifest is not None else self.backend
            raise RWKVDeployError(f"{where} has no prefill graph; re-export with --prefill")
        tokens, state = self._inputs(tokens, state, seq=True)
        return self._call("prefill", tokens, state)

    def forward(self, tokens, state) -> tuple[np.ndarray, State]:
        """tokens [B, T] -> logits [B, V] of the last position and the state after it, on every backend: through
        prefill when the backend has it, else one step per token."""
        tokens, state = self._inputs(tokens, state, seq=True)
        if self.has_prefill:
            logits, state = self._call("prefill", tokens, state)
            return (logits[:, -1] if logits.ndim == 3 else logits), state
        for t in range(tokens.shape[1]):
            logits, state = self._call("step", tokens[:, t], state)
        return logits, state

    def get_tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    # --- shared checks ---------------------------------------------------------------------------------------

    def _state(self, arrays: dict[str, Any], batch: int) -> State:
        return State(arrays, batch, self.backend, self._to_host)

    def _call(self, graph: str, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        logits, arrays = self._run(graph, tokens, state)
        return logits, self._state(arrays, state.batch)

    def _inputs(self, tokens, state, seq: bool) -> tuple[np.ndarray, State]:
        """Tokens as int64 [B] or [B, T] with ids in range, and the state as this session's State of batch B."""
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu" or tokens.ndim != (2 if seq else 1):
            raise RWKVDeployError(f"tokens must be integer ids of shape {'[batch, seq]' if seq else '[batch]'}, "
                                  f"got {tokens.dtype} {list(tokens.shape)}")
        if seq and tokens.shape[1] == 0:
            raise RWKVDeployError("a sequence needs at least one token")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)].flat[0]
            raise RWKVDeployError(f"token id {bad} is out of range [0, {self.vocab_size})")
        state = self._as_state(state)
        if tokens.shape[0] != state.batch:
            raise RWKVDeployError(f"tokens are a batch of {tokens.shape[0]}, the state a batch of {state.batch}")
        return tokens.astype(np.int64), state

    def _as_state(self, state) -> State:
        if isinstance(state, State):
            if state.backend != self.backend or list(state) != self.state_names:
                raise RWKVDeployError(f"this State was made by {state.backend}, not by this {self.backend} session; "
                                      "convert it: session.state_from_numpy(state.to_numpy())")
            return state
        if isinstance(state, (list, tuple)):  # format-1 callers: numpy arrays in the manifest's state order
            if len(state) != len(self.state_specs):
                raise RWKVDeployError(f"state has {len(state)} tensors, the manifest lists {len(self.state_specs)}")
            return self.state_from_numpy(dict(zip(self.state_names, state)))
        raise RWKVDeployError(f"state must be a State from init_state/step/state_from_numpy (or a list of numpy "
                              f"arrays in the manifest's state order), got {type(state).__name__}")
