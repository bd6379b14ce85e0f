"""The official `rwkv` PyPI package (spec §10): its logits and its speed, always in a child process.

The package is configured by environment variables read at import time, and its v7 mode replaces the
RWKV class, so each call gets a fresh interpreter. This module is the only place that runs the package.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError
from .loop import stepwise

DECODE_STEPS = 64  # single steps timed by official_speed


def official_logits(pth: str | Path, version: str, tokens: list[int], strategy: str = "cpu fp32") -> np.ndarray:
    """Feed `tokens` one at a time from the zero state; returns logits [T, V] float32. `pth` must end in .pth."""
    return _in_child(pth, version, {"task": "logits", "tokens": list(tokens), "strategy": strategy}, jit=False)


def official_speed(pth: str | Path, version: str, tokens: list[int], reps: int = 3,
                   strategy: str = "cpu fp32") -> dict[str, float]:
    """Tokens/s of the package, TorchScript on as users run it: "prefill" (all of `tokens` in one forward,
    `reps` times) and "decode" (up to DECODE_STEPS single steps)."""
    prefill, decode = _in_child(pth, version, {"task": "speed", "tokens": list(tokens), "strategy": strategy,
                                               "reps": reps}, jit=True)
    return {"prefill": float(prefill), "decode": float(decode)}


def _in_child(pth: str | Path, version: str, request: dict, jit: bool) -> np.ndarray:
    """Run `request` in a fresh interpreter configured for `version`; returns the array it saved."""
    pth = Path(pth)
    if pth.suffix != ".pth":
        raise RWKVDeployError(f"the official package reads .pth files only, got {pth}")
    with tempfile.TemporaryDirectory() as tmp:
        # the request goes through a file: a long token list would not fit on a command line
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.npy"
        req.write_text(json.dumps({**request, "model": str(pth.with_suffix("")), "version": version, "out": str(out)}))
        env = {**os.environ, "RWKV_JIT_ON": "1" if jit else "0", "RWKV_CUDA_ON": "0",
               "RWKV_V7_ON": "1" if version == "7" else "0"}
        r = subprocess.run([sys.executable, "-m", __name__, str(req)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"official rwkv package failed:\n{r.stderr[-3000:]}")
        return np.load(out)


class OfficialModel:
    """The package's RWKV behind the step interface of `stepwise` (batch 1; its initial state is None)."""

    def __init__(self, model):
        self.model = model

    def init_state(self, batch: int = 1):
        return None

    def step(self, tokens, state):
        logits, state = self.model.forward([int(tokens[0])], state)  # logits [V]
        return logits[None], state


def _speed(model: OfficialModel, tokens: np.ndarray, reps: int) -> np.ndarray:
    m, toks = model.model, tokens[0].tolist()
    m.forward(toks[:8], None)  # warm up
    t = time.perf_counter()
    for _ in range(reps):
        m.forward(toks, None)
    prefill = len(toks) * reps / (time.perf_counter() - t)
    _, state = m.forward(toks[:1], None)
    steps = tokens[:, :DECODE_STEPS]
    stepwise(model, steps, state)  # warm up: TorchScript optimises a function after its first calls
    t = time.perf_counter()
    stepwise(model, steps, state)
    return np.array([prefill, steps.shape[1] / (time.perf_counter() - t)])


def _child(request_file: str) -> None:
    from rwkv.model import RWKV  # environment already set by the parent

    req = json.loads(Path(request_file).read_text())
    kw = {} if req["version"] == "7" else {"verbose": False}  # the package's v7 class takes no `verbose`
    model = OfficialModel(RWKV(model=req["model"], strategy=req["strategy"], **kw))
    tokens = np.array([req["tokens"]], dtype=np.int64)  # [1, T]
    if req["task"] == "logits":
        result = stepwise(model, tokens)[0][0].astype(np.float32)  # exact: its logits are float32 or narrower
    else:
        result = _speed(model, tokens, req["reps"])
    np.save(req["out"], result)


if __name__ == "__main__":
    _child(sys.argv[1])
