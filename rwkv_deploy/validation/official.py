"""Logits from the official `rwkv` PyPI package (spec §10), always in a child process.

The package is configured by environment variables read at import time, and its v7 mode replaces the
RWKV class, so each call gets a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError


def official_logits(pth: str | Path, version: str, tokens: list[int], strategy: str = "cpu fp32") -> np.ndarray:
    """Feed `tokens` one at a time from the zero state; returns logits [T, V] float32. `pth` must end in .pth."""
    pth = Path(pth)
    if pth.suffix != ".pth":
        raise RWKVDeployError(f"the official package reads .pth files only, got {pth}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0", "RWKV_V7_ON": "1" if version == "7" else "0"}
        args = [sys.executable, "-m", __name__, str(pth.with_suffix("")), version, json.dumps(tokens), str(out), strategy]
        r = subprocess.run(args, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"official rwkv package failed:\n{r.stderr[-3000:]}")
        return np.load(out)


def _main(stem: str, version: str, tokens: str, out: str, strategy: str) -> None:
    from rwkv.model import RWKV  # environment already set by the parent

    model = RWKV(model=stem, strategy=strategy) if version == "7" else RWKV(model=stem, strategy=strategy, verbose=False)
    state, rows = None, []
    for tok in json.loads(tokens):
        logits, state = model.forward([tok], state)
        rows.append(logits.float().numpy())
    np.save(out, np.stack(rows))


if __name__ == "__main__":
    _main(*sys.argv[1:6])
