"""Checkpoint loading: BlinkDL .pth, .safetensors and Hugging Face RWKV-4 folders -> one validated form.

Nothing here executes pickled code: .pth and .bin files go through torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import stat
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from ..errors import RWKVDeployError
from .common import Dims
from .versions import VERSIONS, detect_version

log = logging.getLogger(__name__)

# Keys of variants the recurrent reference does not implement (spec §2): prefix/regex -> what it is.
UNSUPPORTED = [
    (r"^_", "a file already converted by ChatRWKV (pre-transposed weights, key '{key}'); use the original .pth"),
    (r"\.ffn\.s_emb|\.ffn\.s[012]\b|^s_emb", "RWKV-7 DeepEmbed (key '{key}'), which is not supported"),
    (r"head_q|head_k|^tiny_|pos_emb", "an RWKV-LM training option not in the recurrent model (key '{key}')"),
    (r"time_maa_rkvw", "an RWKV-6.0b/c research variant (key '{key}'), which is not supported"),
]

# Storage dtypes the reference converts from; anything else (fp8, integer, complex, quantized) is refused by name
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Hugging Face RWKV-4 names -> BlinkDL names (spec §3)
HF_RENAMES = [
    (r"^rwkv\.embeddings\.", "emb."), (r"^rwkv\.blocks\.0\.pre_ln\.", "blocks.0.ln0."), (r"^rwkv\.ln_out\.", "ln_out."),
    (r"^rwkv\.blocks\.", "blocks."), (r"\.attention\.", ".att."), (r"\.feed_forward\.", ".ffn."),
    (r"\.time_mix_key$", ".time_mix_k"), (r"\.time_mix_value$", ".time_mix_v"), (r"\.time_mix_receptance$", ".time_mix_r"),
]


@dataclass
class Checkpoint:
    """A validated checkpoint: BlinkDL key names, canonical shapes, the storage dtype kept."""

    path: Path
    format: str  # "pth", "safetensors" or "hf"
    weights: dict[str, Tensor]
    dims: Dims
    notes: list[str] = field(default_factory=list)
    tokenizer_file: Path | None = None  # an HF folder's tokenizer.json
    # transformers halves the residual every `rescale_every` layers in eval mode, in every dtype (spec §8.1);
    # the reference follows the checkpoint's own runtime so that an HF folder matches transformers
    rescale_every: int = 0

    _finite: set[str] = field(default_factory=set)  # keys whose values have been checked

    def checked(self, key: str) -> Tensor:
        """weights[key], its values checked for NaN/Inf the first time it is read. Loading reads only headers
        and shapes (inspect stays fast on a 15 GB file); the values are checked where they are used."""
        t = self.weights[key]
        if key not in self._finite and not t.is_meta:
            if not bool(torch.isfinite(t).all()):
                raise RWKVDeployError(f"{self.path}: '{key}' contains NaN or Inf values; the checkpoint is damaged")
            self._finite.add(key)
        return t

    @property
    def version(self) -> str:
        return self.dims.version

    @property
    def storage_dtype(self) -> torch.dtype:
        return Counter(t.dtype for t in self.weights.values()).most_common(1)[0][0]

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.weights.values())

    @cached_property
    def sha256(self) -> str:
        """Of the weights file (for a folder: of its weight files, in name order)."""
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin"))
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise RWKVDeployError(f"checkpoint not found: {path}")
    try:
        if path.is_dir():
            sd, tokenizer, rescale = _read_hf_folder(path)
            ckpt = _validate(path, "hf", sd, tokenizer)
            ckpt.rescale_every = rescale
            if rescale:
                ckpt.notes.append(f"Hugging Face config rescale_every={rescale}: the reference halves the residual "
                                  "stream as transformers does in eval mode")
            return ckpt
        fmt, sd = _read_file(path)
        return _validate(path, fmt, sd, None)
    except OSError as e:  # EACCES, EISDIR, EIO...: the file, not the program, is the problem
        raise RWKVDeployError(f"cannot read {e.filename or path}: {e.strerror or e}") from e


def _regular_file(path: Path) -> int:
    """Refuse FIFOs, devices and sockets before opening them: reading one would hang or never end. Then open it
    once, so that a permission error names this file rather than surfacing inside a loader. Returns its size."""
    st = os.stat(path)  # follows symlinks: a link to a regular file is fine
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise RWKVDeployError(f"{path} is {kind}; expected a regular file")
    open(path, "rb").close()
    return st.st_size


def _read_file(path: Path) -> tuple[str, dict]:
    size = _regular_file(path)
    if size == 0:
        raise RWKVDeployError(f"{path} is empty (0 bytes); expected a .pth or .safetensors checkpoint")
    with open(path, "rb") as fh:
        head = fh.read(8)
    is_torch = head[:2] == b"PK" or head[:1] == b"\x80"  # zip (torch.save) or legacy pickle
    if path.suffix == ".safetensors" or (not is_torch and _looks_like_safetensors(path, size)):
        return "safetensors", _read_safetensors(path)
    if not is_torch:
        raise RWKVDeployError(f"{path} is not a PyTorch (.pth) or safetensors checkpoint "
                              f"(it starts with {head[:8]!r}); pass a BlinkDL .pth, a .safetensors file or an HF folder")
    return "pth", _torch_load(path)


def _looks_like_safetensors(path: Path, size: int) -> bool:
    """safetensors = 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 1 < n < size and fh.read(1) == b"{"


# safetensors dtype names (its format spec) -> torch; unlisted names are refused by name
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: Path) -> dict:
    """Tensors that view a memory map of the file: only the JSON header is read now, and each tensor's bytes when
    it is used (export and verify then hold one layer at a time, not the whole file). The mapping is private
    (copy-on-write): nothing can write through to the file."""
    import mmap

    bad = f"{path} is not a valid safetensors file"
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        n = int.from_bytes(fh.read(8), "little") if size >= 8 else 0
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise RWKVDeployError(f"{bad} (header length {n} in a {size}-byte file); it may be truncated or corrupt")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise RWKVDeployError(f"{bad} (its header is not JSON: {e}); the file may be truncated or corrupt")
        if not isinstance(header, dict):
            raise RWKVDeployError(f"{bad} (its header is a JSON {type(header).__name__})")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    out, data = {}, 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), list(info["shape"]), info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
            ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError) as e:
            raise RWKVDeployError(f"{bad} (entry {key!r}: {e!r})")
        if dtype is None:
            raise RWKVDeployError(f"{path}: '{key}' has dtype {info['dtype']}; expected float16, bfloat16, float32 or "
                                  "float64 weights")
        if not ok or end - begin != numel * dtype.itemsize or data + end > size:
            raise RWKVDeployError(f"{bad} ('{key}' {info['dtype']} {shape} at bytes {begin}..{end} of "
                                  f"{size - data}); the file may be truncated or corrupt")
        out[key] = (torch.frombuffer(mm, dtype=dtype, count=numel, offset=data + begin).reshape(shape) if numel
                    else torch.empty(shape, dtype=dtype))
    return out


def _torch_load(path: Path) -> dict:
    try:
        with warnings.catch_warnings():
            # torch's weights-only unpickler warns (UserWarning) before refusing a pickle; our error says it all
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise RWKVDeployError(
            f"{path} holds objects other than tensors{what}, which are never unpickled here; "
            "save a plain state dict (torch.save(model.state_dict(), ...)) or use safetensors")
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError) as e:
        raise RWKVDeployError(f"{path} could not be read as a PyTorch checkpoint ({str(e).splitlines()[0][:200]}); "
                              "the file may be truncated or corrupt")


def _read_hf_folder(path: Path) -> tuple[dict, Path | None, int]:
    cfg = path / "config.json"
    if not cfg.exists():
        raise RWKVDeployError(f"{path} is a folder without config.json; pass a Hugging Face RWKV-4 model folder "
                              "or a checkpoint file")
    _regular_file(cfg)
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RWKVDeployError(f"{cfg} is not valid JSON ({e})")
    if not isinstance(config, dict):
        raise RWKVDeployError(f"{cfg} holds a JSON {type(config).__name__}; expected an object "
                              '({"model_type": "rwkv", ...})')
    if config.get("model_type") != "rwkv":
        raise RWKVDeployError(f"{cfg} has model_type {config.get('model_type')!r}; only Hugging Face RWKV-4 "
                              "folders (model_type 'rwkv') are supported")
    shards = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not shards:
        raise RWKVDeployError(f"{path} has no weights: expected model.safetensors or pytorch_model.bin beside config.json")
    for f in shards:
        _regular_file(f)
    tok = path / "tokenizer.json"
    if tok.exists():
        _regular_file(tok)  # export copies it: a FIFO there would hang the copy
    raw: dict = {}
    for f in shards:
        part = _read_safetensors(f) if f.suffix == ".safetensors" else _torch_load(f)
        raw.update(part if isinstance(part, dict) else {})
    sd = {}
    for k, t in raw.items():
        for pat, rep in HF_RENAMES:
            k = re.sub(pat, rep, k)
        sd[k] = t
    return sd, (tok if tok.exists() else None), int(config.get("rescale_every") or 0)


def _validate(path: Path, fmt: str, sd, tokenizer) -> Checkpoint:
    if not isinstance(sd, dict) or not sd:
        raise RWKVDeployError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    # known variants first, by key name: a file ChatRWKV converted also holds strings and int8 tensors
    for k in sd:
        for pat, what in UNSUPPORTED:
            if isinstance(k, str) and re.search(pat, k):
                raise RWKVDeployError(f"{path} is {what.format(key=k)}")
    bad = [k for k, t in sd.items() if not isinstance(k, str) or not isinstance(t, Tensor)]
    if bad:
        raise RWKVDeployError(f"{path} is not a state dict of tensors (entry {bad[0]!r} is a "
                              f"{type(sd[bad[0]]).__name__})")
    for k, t in sd.items():
        _check_tensor(path, k, t)
    if "emb.weight" not in sd or "head.weight" not in sd:
        sample = ", ".join(list(sd)[:4])
        raise RWKVDeployError(f"{path} is not an RWKV checkpoint: no 'emb.weight'/'head.weight' (keys start: {sample})")
    if sd["emb.weight"].dim() != 2:
        raise RWKVDeployError(f"'emb.weight' has shape {list(sd['emb.weight'].shape)}; expected [vocab, n_embd]")
    V, C = sd["emb.weight"].shape
    L = _layer_count(path, sd)
    version = detect_version(sd)
    V_ = VERSIONS[version]
    for key in ("blocks.0.att.key.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise RWKVDeployError(f"{path}: missing key '{key}' (RWKV-{version} detected)")
    d = Dims(version, L, C, sd["blocks.0.att.key.weight"].shape[0], sd["blocks.0.ffn.key.weight"].shape[0], 0, 0, V)
    try:
        V_.read_dims(sd, d)
    except (KeyError, ValueError, IndexError) as e:
        raise RWKVDeployError(f"{path}: RWKV-{version} detected but a key that sizes the heads is missing or "
                              f"malformed ({e})")
    expected = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
                "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    optional = {}
    for i in range(L):
        present = {k[len(f"blocks.{i}."):] for k in sd if k.startswith(f"blocks.{i}.")}
        for name, shape in {"ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
                            **V_.layer_shapes(d, i, present)}.items():
            expected[f"blocks.{i}.{name}"] = shape
        optional.update({f"blocks.{i}.{k}": s for k, s in V_.optional_shapes(d, i).items()})
    weights = {}
    for key, shape in expected.items():
        if key not in sd:
            raise RWKVDeployError(f"{path}: missing key '{key}' (RWKV-{version}, expected shape {list(shape)})")
        weights[key] = _canonical(path, key, sd[key], shape)
    for key in sd.keys() - expected.keys():
        if key not in optional:
            raise RWKVDeployError(f"{path}: unexpected key '{key}' for RWKV-{version}; this variant is not supported")
        weights[key] = _canonical(path, key, sd[key], optional[key])
    notes = _notes(d, weights, sd)
    log.debug("loaded %s: RWKV-%s, %d layers, n_embd %d", path, version, L, C)
    return Checkpoint(path, fmt, weights, d, notes, tokenizer)


def _check_tensor(path: Path, key: str, t: Tensor) -> None:
    """Dense, materialised, plain floating-point tensors only; checked before any arithmetic touches them."""
    if t.is_meta:
        raise RWKVDeployError(f"{path}: '{key}' is a meta tensor (shape only, no values); the checkpoint was saved "
                              "from a model that was never loaded. Save the real weights")
    if t.layout != torch.strided:
        raise RWKVDeployError(f"{path}: '{key}' has layout {t.layout}; expected dense tensors (save t.to_dense())")
    if t.is_quantized or t.dtype not in FLOAT_DTYPES:
        raise RWKVDeployError(f"{path}: '{key}' has dtype {t.dtype}; expected float16, bfloat16, float32 or float64 "
                              "weights")


def _layer_count(path: Path, sd: dict) -> int:
    """L from the 'blocks.N.*' keys, which must number exactly 0..L-1. Checked before anything loops over layers:
    one stray 'blocks.1000000.*' key once drove a loop (and its allocations) up to that index."""
    first_key: dict[int, str] = {}
    for k in sd:
        if m := re.match(r"blocks\.(\d+)\.", k):
            digits = m.group(1)
            # int() refuses > 4300 digits; any index this long is past the end anyway
            first_key.setdefault(int(digits) if len(digits) <= 12 else 10 ** 12, k)
    if not first_key:
        raise RWKVDeployError(f"{path} is not an RWKV checkpoint: no 'blocks.N.*' keys")
    L = len(first_key)
    if max(first_key) != L - 1:  # L distinct indices >= 0 are exactly 0..L-1 iff the largest is L-1
        missing = min(i for i in range(L) if i not in first_key)
        stray = first_key[max(first_key)]
        raise RWKVDeployError(f"{path}: the layers are not numbered 0..N-1: layer {missing} has no 'blocks.{missing}.*' "
                              f"keys, yet '{stray[:80]}' names a later layer")
    return L


def _canonical(path: Path, key: str, t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Accept [1,1,C] for [C] and the like; anything else of the wrong shape is an error that names the key."""
    if [s for s in t.shape if s != 1] != [s for s in shape if s != 1]:
        raise RWKVDeployError(f"{path}: '{key}' has shape {list(t.shape)}, expected {list(shape)}")
    return t.reshape(shape)


def _notes(d: Dims, w: dict[str, Tensor], sd: dict) -> list[str]:
    notes = []
    if any(k.endswith("att.time_state") for k in w):
        notes.append("state-tuned: att.time_state is used as the initial WKV state")
    if d.version == "7" and any(k.startswith("blocks.0.att.v") and k[len("blocks.0.att.v"):][:1] in "012" for k in w):
        notes.append("layer 0 has v0/v1/v2, which RWKV-7 does not use; they are ignored")
    if d.vocab_size not in (50277, 65536):
        notes.append(f"vocab size {d.vocab_size} is neither Pile (50277) nor World (65536); pass --tokenizer on export")
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in w.values())
    if len(dtypes) > 1:
        notes.append("mixed storage dtypes: " + ", ".join(f"{n} {k}" for k, n in dtypes.most_common()))
    if d.dim_att != d.n_embd:
        notes.append(f"dim_att {d.dim_att} differs from n_embd {d.n_embd} (no released model does this)")
    return notes
