"""`rwkv-deploy export`: checkpoint -> export folder (design.md §2), written atomically."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import RWKVDeployError
from ..models import load_checkpoint
from ..models.model import RWKV
from ..runtime.manifest import FORMAT, MANIFEST, current_umask, write_json_atomic
from ..runtime.tokenizer import load_tokenizer, tokenizer_kind, world_vocab_path
from .onnx_graph import LOGITS, TOKENS, WEIGHTS_FILE, PrefillGraph, StepGraph, WeightFile, export_graph, state_io_names

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
WKV_MODES = ("portable", "fused")
NP_DTYPE = {torch.float32: "float32", torch.float16: "float16"}


def export(checkpoint, out, *, precision: str = "fp32", opset: int = 18, tokenizer=None,
           external_data: bool | None = None, force: bool = False, prefill: str | bool | None = None,
           wkv: str = "portable", ort_include=None) -> Path:
    """Export `checkpoint` to the folder `out`; returns its path. Nothing is left at `out` on failure.

    prefill: None (step graph only), "last" (prefill.onnx returns the last position's logits) or "all"
    (every position's). True means "last".
    """
    prefill = "last" if prefill is True else (prefill or None)
    if prefill not in (None, "last", "all"):
        raise RWKVDeployError(f"unknown prefill mode {prefill!r}; expected last or all")
    if precision not in PRECISIONS:
        raise RWKVDeployError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if wkv not in WKV_MODES:
        raise RWKVDeployError(f"unknown --wkv {wkv!r}; expected one of {', '.join(WKV_MODES)}")
    if not 17 <= opset <= 23:  # 17 brings LayerNormalization
        raise RWKVDeployError(f"opset {opset} is not supported; use 17..23 (default 18)")
    out = Path(out).absolute()
    _check_destination(out, force)
    t0 = time.time()
    ckpt = load_checkpoint(checkpoint)
    log.info("[1/4] loaded RWKV-%s %s (%d layers x %d, %s params) in %.1fs", ckpt.version, ckpt.path.name,
             ckpt.dims.n_layer, ckpt.dims.n_embd, f"{ckpt.n_params:,}", time.time() - t0)
    tok_src, tok_kind = _find_tokenizer(ckpt, tokenizer)
    dtype = PRECISIONS[precision]
    library = None
    if wkv == "fused":
        from ..custom_ops.build import build_library

        library = build_library(ort_include=ort_include)
    model = RWKV(ckpt, dtype, wkv=wkv).eval()
    d = ckpt.dims
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise RWKVDeployError(f"cannot write to {out.parent} ({e.strerror}); choose another -o")
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        t1 = time.time()
        weights = WeightFile(tmp / WEIGHTS_FILE)
        external = export_graph(StepGraph(model), model, torch.zeros(2, dtype=torch.long), tmp / "model.onnx", opset,
                                external_data, weights)
        log.info("[2/4] step graph traced and checked in %.1fs", time.time() - t1)
        graphs = {"step": _graph_entry("model.onnx", external, ["batch"], d.vocab_size)}
        if prefill:
            t1 = time.time()
            # example T = 3: the T = 1 shortcut of models/wkv.py must not be taken, so the WKV becomes a Loop
            # the same weights: stored with the step graph's when those went to external data
            export_graph(PrefillGraph(model, prefill == "all"), model, torch.zeros(2, 3, dtype=torch.long),
                         tmp / "prefill.onnx", opset, external, weights)
            graphs["prefill"] = _graph_entry("prefill.onnx", external, ["batch", "seq"], d.vocab_size)
            graphs["prefill"]["positions"] = prefill
            if prefill == "all":
                graphs["prefill"]["logits_shape"] = ["batch", "seq", d.vocab_size]
            log.info("[2/4] prefill graph traced and checked in %.1fs", time.time() - t1)
        state = _state_entries(model, tmp)
        op_library = None
        if library is not None:  # shipped in the folder so that the export runs where it is copied to
            shutil.copyfile(library, tmp / library.name)
            op_library = {"path": library.name, "rwkv_deploy_version": __version__, "domain": "rwkv",
                          "execution_provider": "CPUExecutionProvider"}
        tok_entry = None
        if tok_src is not None:
            name = "tokenizer.json" if tok_kind == "hf-tokenizers" else tok_src.name
            shutil.copyfile(tok_src, tmp / name)
            tok_entry = {"kind": tok_kind, "file": name}
        log.info("[3/4] state table (%d tensors) and tokenizer (%s) written", len(state), tok_kind or "none")
        manifest = {
            "format": FORMAT, "rwkv_version": d.version, "n_layer": d.n_layer, "n_embd": d.n_embd,
            "dim_att": d.dim_att, "dim_ffn": d.dim_ffn, "n_head": d.n_head, "head_size": d.head_size,
            "vocab_size": d.vocab_size, "precision": precision, "wkv": wkv, "opset": opset,
            "rescale_every": model.rescale_every,
            "graphs": graphs,
            "state": state,
            "tokenizer": tok_entry,
            "custom_op_library": op_library,
            "source": {"path": str(ckpt.path.absolute()), "format": ckpt.format, "sha256": ckpt.sha256},
            "rwkv_deploy_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("[4/4] exported to %s in %.1fs (%s)", out, time.time() - t0, _size(out))
    return out


def _graph_entry(file: str, external: bool, tokens_shape: list, vocab: int) -> dict:
    return {"file": file, "external_data": WEIGHTS_FILE if external else None, "tokens": TOKENS,
            "tokens_dtype": "int64", "tokens_shape": tokens_shape, "logits": LOGITS, "logits_dtype": "float32",
            "logits_shape": ["batch", vocab]}


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RWKVDeployError(f"{out} exists and is a file; choose a folder name for -o")
    if out.exists() and any(out.iterdir()) and not force:
        raise RWKVDeployError(f"{out} already exists and is not empty; pass --force to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise RWKVDeployError(f"{parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RWKVDeployError(f"cannot write to {parent} (permission denied); choose another -o")


def _commit(tmp: Path, out: Path) -> None:
    """Swap the finished folder in: the old OUT survives until the new one is complete."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _state_entries(model: RWKV, folder: Path) -> list[dict]:
    ins, outs = state_io_names(model)
    entries = []
    for s, i, o, init in zip(model.states, ins, outs, model.init_state(1)):
        e = {"input": i, "output": o, "layer": s.layer, "kind": s.kind.name, "shape": ["batch", *s.shape],
             "dtype": NP_DTYPE[s.dtype], "init": s.kind.init, "init_file": None}
        if not torch.all(init == s.kind.init):  # a state-tuned initial state: ship the values
            e["init_file"] = f"state_init/{i}.bin"
            (folder / "state_init").mkdir(exist_ok=True)
            init[0].numpy().astype(np.dtype(NP_DTYPE[s.dtype]).newbyteorder("<")).tofile(folder / e["init_file"])
        entries.append(e)
    return entries


def _find_tokenizer(ckpt, given) -> tuple[Path | None, str | None]:
    if given is not None:
        path = Path(given)
        tok = load_tokenizer(path)  # validates the file
        if tok.vocab_size > ckpt.dims.vocab_size:
            raise RWKVDeployError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocab is "
                                  f"{ckpt.dims.vocab_size}; pass the tokenizer the model was trained with")
        return path, tokenizer_kind(path)
    if ckpt.tokenizer_file is not None:
        return ckpt.tokenizer_file, "hf-tokenizers"
    if ckpt.dims.vocab_size == 65536:
        world = world_vocab_path()
        if world is None:
            log.warning("vocab 65536 suggests the RWKV World tokenizer, but the `rwkv` package that ships it is not "
                        "installed; exporting without a tokenizer (pip install rwkv, or pass --tokenizer)")
        return world, "rwkv-world" if world else None
    log.warning("no tokenizer: pass --tokenizer FILE (e.g. 20B_tokenizer.json for Pile models) to use `run`")
    return None, None


def _size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{total / 1e6:.1f} MB"
