"""Shared by the benchmarks: the model-shape arguments and the random checkpoint they describe."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_model_args(ap: argparse.ArgumentParser, version="7", layers=12, embd=768, head_size=64, vocab=50277) -> None:
    ap.add_argument("--version", default=version)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--embd", type=int, default=embd)
    ap.add_argument("--head-size", type=int, default=head_size)
    ap.add_argument("--vocab", type=int, default=vocab)


def write_checkpoint(a: argparse.Namespace, path: Path, version: str | None = None) -> int:
    """A bf16 random checkpoint of the requested shape (LoRA widths as released) at `path`; returns its parameter
    count."""
    import torch

    from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint

    sd = make_checkpoint(version or a.version, a.layers, a.embd, a.head_size, a.vocab, dtype=torch.bfloat16,
                         released_lora=True)
    save_checkpoint(sd, path)
    return sum(t.numel() for t in sd.values())
