"""manifest.json: the contract of an export folder (design.md §2). No torch here: serving needs none."""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError

FORMAT = "rwkv-deploy/2"  # what exports write
MANIFEST = "manifest.json"
# every format this rwkv-deploy reads -> its JSON Schema (format 1 is frozen: its schema is never edited again)
SCHEMAS = {"rwkv-deploy/1": Path(__file__).with_name("manifest.schema.json"),
           "rwkv-deploy/2": Path(__file__).with_name("manifest-2.schema.json")}
SCHEMA = SCHEMAS[FORMAT]


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
        # only the keys of this manifest's format: the schema checked their types, not those of stray keys
        v1 = self["format"] == "rwkv-deploy/1"
        for key, field in [("tokenizer", "file"), ("custom_op_library", "path") if v1 else ("golden", "logits_file")]:
            if self.get(key):
                named.append((f"{key}.{field}", self[key][field]))
        if not v1:
            libraries = (self["requires"]["custom_ops"] or {}).get("libraries", {})
            named += [(f"requires.custom_ops.libraries.{ep}.path", lib["path"]) for ep, lib in libraries.items()]
            named += [(f"engines[{i}].file", e["file"]) for i, e in enumerate(self["engines"])]
        return named

    def custom_op_library(self, provider: str = "CPUExecutionProvider") -> dict | None:
        """The custom-op library for `provider`, from either format, or None (portable export, or none for
        that provider): {"path": confined Path, "sha256": str | None, "rwkv_deploy_version": str | None}.

        Format 2 pins the library by sha256 (requires.custom_ops); format 1 named it with the version of
        rwkv-deploy that built it (custom_op_library).
        """
        if self["format"] == "rwkv-deploy/1":
            lib = self.get("custom_op_library")
            if not lib or lib.get("execution_provider", "CPUExecutionProvider") != provider:
                return None
            return {"path": self.path("custom_op_library.path", lib["path"]), "sha256": None,
                    "rwkv_deploy_version": lib.get("rwkv_deploy_version")}
        lib = ((self["requires"].get("custom_ops") or {}).get("libraries") or {}).get(provider)
        if not lib:
            return None
        return {"path": self.path(f"requires.custom_ops.libraries.{provider}.path", lib["path"]),
                "sha256": lib["sha256"], "rwkv_deploy_version": None}


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
        data = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8 whatever the locale
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
    if _format(m) is None:
        raise RWKVDeployError(f"{path} has format {m['format']!r}; this rwkv-deploy reads "
                              f"{' and '.join(map(repr, SCHEMAS))} (a newer format needs a newer rwkv-deploy)")
    check_schema(m, path)
    m.folder = folder
    for key, rel in m.named_paths():  # refuse a folder that points outside itself before anything is read
        m.path(key, rel)
    return m


# end-of-text spellings of Hugging Face tokenizers, in order of preference (GPT-NeoX/20B, GPT-2: <|endoftext|>)
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")


def tokenizer_entry(path: str | Path, vocab_size: int, fmt: str = FORMAT) -> dict:
    """manifest["tokenizer"] for the tokenizer file `path`, once it loads and fits a model of `vocab_size` logits.

    Format 2 adds the id that ends a text and the stop rule: RWKV models end a text with id 0 (World: id 0 has
    no bytes; 20B: it is <|endoftext|>); another tokenizers file's own end-of-text token is used if it has one.
    """
    from .tokenizer import HFTokenizer, load_tokenizer

    path = Path(path)
    tok = load_tokenizer(path)  # validates the file
    if tok.vocab_size > vocab_size:
        raise RWKVDeployError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocab is "
                              f"{vocab_size}; pass the tokenizer the model was trained with")
    entry = {"kind": tok.kind, "file": "tokenizer.json" if tok.kind == HFTokenizer.kind else path.name}
    if fmt != "rwkv-deploy/1":
        ids = [tok.tok.token_to_id(t) for t in EOS_TOKENS] if tok.kind == HFTokenizer.kind else []
        eos = next((i for i in ids if i is not None), 0)
        entry.update(eos_token_id=eos, stop={"token_ids": [eos]})
    return entry


def attach_tokenizer(folder: str | Path, file: str | Path) -> Manifest:
    """Copy the tokenizer `file` into an export folder and name it in manifest.json, replacing the tokenizer
    there (if any); no re-export. Returns the updated manifest."""
    m = read_manifest(folder)
    src = Path(file)
    entry = tokenizer_entry(src, m["vocab_size"], m["format"])
    dst = m.path("tokenizer.file", entry["file"])
    old = (m.get("tokenizer") or {}).get("file")
    if not (dst.exists() and dst.samefile(src)):
        # copied under a temporary name first: the file named by the manifest is whole at every moment
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    m["tokenizer"] = entry
    check_schema(m, Path(folder) / MANIFEST)
    write_json_atomic(Path(folder) / MANIFEST, m)
    if old and old != entry["file"] and old not in {rel for _, rel in m.named_paths()}:
        m.path("tokenizer.file", old).unlink(missing_ok=True)  # the replaced tokenizer, unless still named
    return m


def check_schema(data, where: Path | str = MANIFEST) -> None:
    """Validate against the schema of data["format"] (default: the current format); the first (most relevant)
    error becomes an RWKVDeployError."""
    fmt = _format(data) or FORMAT
    validator = _validator(fmt)  # first: it names the extra to install when jsonschema is missing
    from jsonschema.exceptions import best_match

    try:
        error = best_match(validator.iter_errors(data))
    except RecursionError:
        raise RWKVDeployError(f"{where} is nested too deeply to be a manifest; re-export the model")
    if error is not None:
        at = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise RWKVDeployError(f"{where} does not follow the {fmt} schema: at {at}, {error.message[:300]}; "
                              "re-export the model (or fix the file)")


@functools.lru_cache(maxsize=None)
def _validator(fmt: str):
    try:
        import jsonschema
    except ImportError:
        raise RWKVDeployError("reading an export folder needs jsonschema: pip install 'rwkv-deploy[onnx]'")
    # JSON Schema counts 64.0 as an integer; numpy shapes and Python indices do not, so neither do we
    integer = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, x: isinstance(x, int) and not isinstance(x, bool))
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=integer)
    return cls(json.loads(SCHEMAS[fmt].read_text(encoding="utf-8")))


def _format(data) -> str | None:
    """data["format"] if it is a format this rwkv-deploy reads (the value may be any JSON, even unhashable)."""
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) and fmt in SCHEMAS else None


def _json_type(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary name beside `path`, then rename: readers never see half a file."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def write_bytes_atomic(path: Path, data) -> None:
    """`data` (bytes or a buffer, e.g. a serialized engine) to a temporary name beside `path`, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it (Linux >= 4.7 lists it in /proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere, only setting it returns it: set and restore. Another thread creating a file between the two
    # calls would get mode bits from umask 0, so this is the fallback, never the rule.
    mask = os.umask(0)
    os.umask(mask)
    return mask
