"""`rwkv-deploy inspect`: what a checkpoint is, without running it."""
from __future__ import annotations

from pathlib import Path

import torch

from .models import load_checkpoint
from .models.model import state_table


def inspect_checkpoint(path: str | Path, values: bool = False) -> dict:
    """Read from the checkpoint's headers and shapes only (tensors are memory-mapped, not loaded); `values` also
    reads every value and refuses NaN/Inf, which export and verify check anyway as they read each tensor."""
    ckpt = load_checkpoint(path)
    if values:
        for key in ckpt.weights:
            ckpt.checked(key)
    d = ckpt.dims
    table = state_table(d, torch.float32)
    per_layer = [s for s in table if s.layer == 0]
    return {
        "path": str(ckpt.path), "format": ckpt.format, "rwkv_version": d.version,
        "n_layer": d.n_layer, "n_embd": d.n_embd, "dim_att": d.dim_att, "dim_ffn": d.dim_ffn,
        "n_head": d.n_head, "head_size": d.head_size, "vocab_size": d.vocab_size, "lora": d.lora,
        "n_params": ckpt.n_params, "storage_dtype": str(ckpt.storage_dtype).replace("torch.", ""),
        "state": [{"kind": s.kind.name, "shape": ["batch", *s.shape], "dtype": "float32", "init": s.kind.init,
                   "bytes_per_row": s.nbytes} for s in per_layer],
        "state_tensors": len(table), "state_bytes_per_row": sum(s.nbytes for s in table),
        "notes": ckpt.notes,
    }


def format_inspect(info: dict) -> str:
    lines = [f"{info['path']}  ({info['format']})",
             f"  RWKV-{info['rwkv_version']}   layers {info['n_layer']}   n_embd {info['n_embd']}   "
             f"dim_att {info['dim_att']}   dim_ffn {info['dim_ffn']}",
             f"  heads {info['n_head']} x {info['head_size']}   vocab {info['vocab_size']}   "
             f"params {info['n_params']:,}   stored as {info['storage_dtype']}"]
    if info["lora"]:
        lines.append("  LoRA widths: " + ", ".join(f"{k}={v}" for k, v in info["lora"].items()))
    lines.append(f"  state per layer ({info['n_layer']} layers, {info['state_tensors']} tensors, "
                 f"{info['state_bytes_per_row']:,} bytes per batch row):")
    for s in info["state"]:
        lines.append(f"    {s['kind']:<6} {str(s['shape']):<24} {s['dtype']:<8} init {s['init']:g}   {s['bytes_per_row']:,} B")
    for n in info["notes"]:
        lines.append(f"  note: {n}")
    return "\n".join(lines)
