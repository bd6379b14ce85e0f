"""manifest.json: the contract of an export folder (design.md §2). No torch here: serving needs none."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError

FORMAT = "rwkv-deploy/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StateEntry:
    input: str
    output: str
    shape: list  # with "batch" first
    dtype: str  # "float32" | "float16"
    init: float
    init_file: str | None = None  # raw little-endian values for one batch row (state-tuned models)

    def initial(self, folder: Path, batch: int) -> np.ndarray:
        shape = [batch, *self.shape[1:]]
        if self.init_file:
            row = np.fromfile(folder / self.init_file, dtype=np.dtype(self.dtype).newbyteorder("<"))
            return np.ascontiguousarray(np.broadcast_to(row.reshape(shape[1:]), shape).astype(self.dtype))
        return np.full(shape, self.init, dtype=self.dtype)


class Manifest(dict):
    """The parsed manifest; keys are the public contract, properties are conveniences."""

    folder: Path

    @property
    def state(self) -> list[StateEntry]:
        return [StateEntry(**{k: s.get(k) for k in ("input", "output", "shape", "dtype", "init", "init_file")})
                for s in self["state"]]

    def graph(self, name: str = "step") -> dict:
        return self["graphs"][name]


REQUIRED = ["format", "rwkv_version", "vocab_size", "precision", "wkv", "graphs", "state"]


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise RWKVDeployError(f"{folder} is not an export folder (not a directory); run `rwkv-deploy export` first")
    if not path.exists():
        raise RWKVDeployError(f"{folder} has no {MANIFEST}; it is not an rwkv-deploy export folder")
    try:
        m = Manifest(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RWKVDeployError(f"{path} is not valid JSON ({e})")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise RWKVDeployError(f"{path} lacks {', '.join(missing)}; re-export the model")
    if m["format"] != FORMAT:
        raise RWKVDeployError(f"{path} has format {m['format']!r}; this rwkv-deploy reads {FORMAT!r}")
    m.folder = folder
    return m


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary name beside `path`, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
