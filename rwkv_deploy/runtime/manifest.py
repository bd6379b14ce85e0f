"""manifest.json: the contract of an export folder (design.md §2). No torch here: serving needs none."""
from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError

FORMAT = "rwkv-deploy/1"
MANIFEST = "manifest.json"
SCHEMA = Path(__file__).with_name("manifest.schema.json")


def resolve_inside(folder: str | Path, rel, key: str) -> Path:
    """`rel` (a path named by manifest.json under `key`) resolved inside `folder`, symlinks followed.

    An export folder is data that people download and share: a path that leaves it (absolute, `../`, or a
    symlink pointing out) could make a reader open, or load as a library, any file on the machine.
    """
    where = Path(folder) / MANIFEST
    if not isinstance(rel, str) or not rel:
        raise RWKVDeployError(f"{where} {key} must be a non-empty relative path, got {rel!r}")
    if Path(rel).is_absolute():
        raise RWKVDeployError(f"{where} {key} is the absolute path {rel!r}; paths in an export folder must be "
                              "relative to it and stay inside it")
    root = Path(folder).resolve()
    full = (root / rel).resolve(strict=False)
    if not full.is_relative_to(root):
        raise RWKVDeployError(f"{where} {key} = {rel!r} leads outside the export folder (to {full}); refused")
    return full


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
            path = resolve_inside(folder, self.init_file, f"init_file of state {self.input!r}")
            try:
                row = np.fromfile(path, dtype=np.dtype(self.dtype).newbyteorder("<"))
            except OSError as e:
                raise RWKVDeployError(f"cannot read the initial state {path} ({e.strerror or e}); re-export the model")
            if row.size != int(np.prod(shape[1:])):
                raise RWKVDeployError(f"{path} holds {row.size} {self.dtype} values, state {self.input} needs "
                                      f"{int(np.prod(shape[1:]))} ({self.shape}); re-export the model")
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

    def path(self, key: str, rel) -> Path:
        """The file that this manifest names under `key`, confined to the export folder."""
        return resolve_inside(self.folder, rel, key)

    def named_paths(self) -> list[tuple[str, str]]:
        """(key, relative path) of every file this manifest names: all of them must stay inside the folder."""
        named = []
        for name, g in self["graphs"].items():
            named += [(f"graphs.{name}.{k}", g[k]) for k in ("file", "external_data") if g.get(k) is not None]
        named += [(f"state[{i}].init_file", s["init_file"]) for i, s in enumerate(self["state"])
                  if s.get("init_file") is not None]
        for key, field in (("tokenizer", "file"), ("custom_op_library", "path")):
            if self.get(key):
                named.append((f"{key}.{field}", self[key][field]))
        return named


REQUIRED = ["format", "rwkv_version", "vocab_size", "precision", "wkv", "graphs", "state"]


def read_manifest(folder: str | Path) -> Manifest:
    """Parse, schema-check and path-check OUT/manifest.json; every problem is one RWKVDeployError."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise RWKVDeployError(f"{folder} is not an export folder (not a directory); run `rwkv-deploy export` first")
    if not path.exists():
        raise RWKVDeployError(f"{folder} has no {MANIFEST}; it is not an rwkv-deploy export folder")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints over Python's digit limit
        raise RWKVDeployError(f"{path} is not valid JSON ({str(e)[:200]})")
    except RecursionError:
        raise RWKVDeployError(f"{path} is nested too deeply to be a manifest; re-export the model")
    except OSError as e:
        raise RWKVDeployError(f"cannot read {path} ({e.strerror or e})")
    if not isinstance(data, dict):
        raise RWKVDeployError(f"{path} holds a JSON {_json_type(data)}, not an object; re-export the model")
    m = Manifest(data)
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise RWKVDeployError(f"{path} lacks {', '.join(missing)}; re-export the model")
    if m["format"] != FORMAT:
        raise RWKVDeployError(f"{path} has format {m['format']!r}; this rwkv-deploy reads {FORMAT!r}")
    check_schema(m, path)
    m.folder = folder
    for key, rel in m.named_paths():  # refuse a folder that points outside itself before anything is read
        m.path(key, rel)
    return m


def check_schema(data, where: Path | str = MANIFEST) -> None:
    """Validate against manifest.schema.json; the first (most relevant) error becomes an RWKVDeployError."""
    validator = _validator()  # first: it names the extra to install when jsonschema is missing
    from jsonschema.exceptions import best_match

    try:
        error = best_match(validator.iter_errors(data))
    except RecursionError:
        raise RWKVDeployError(f"{where} is nested too deeply to be a manifest; re-export the model")
    if error is not None:
        at = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise RWKVDeployError(f"{where} does not follow the {FORMAT} schema: at {at}, {error.message[:300]}; "
                              "re-export the model (or fix the file)")


@functools.lru_cache(maxsize=1)
def _validator():
    try:
        import jsonschema
    except ImportError:
        raise RWKVDeployError("reading an export folder needs jsonschema: pip install 'rwkv-deploy[onnx]'")
    # JSON Schema counts 64.0 as an integer; numpy shapes and Python indices do not, so neither do we
    integer = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, x: isinstance(x, int) and not isinstance(x, bool))
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=integer)
    return cls(json.loads(SCHEMA.read_text()))


def _json_type(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


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
