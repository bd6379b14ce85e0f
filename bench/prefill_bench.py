"""Prefill tokens/s and decode tokens/s: portable vs fused ONNX exports vs the official `rwkv` package.

    python bench/prefill_bench.py --version 7 --layers 12 --embd 768 --tokens 256

All three run on this machine in one run, from the same random bf16 checkpoint (a 169M-shaped model by
default), batch 1, fp32, ONNX Runtime CPU with its default threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_model_args, write_checkpoint

OFFICIAL = """
import json, os, sys, time, torch
os.environ["RWKV_JIT_ON"] = "1"; os.environ["RWKV_CUDA_ON"] = "0"
os.environ["RWKV_V7_ON"] = "1" if sys.argv[2] == "7" else "0"
from rwkv.model import RWKV
kw = {} if sys.argv[2] == "7" else {"verbose": False}
m = RWKV(model=sys.argv[1], strategy="cpu fp32", **kw)
toks = json.loads(sys.argv[3]); reps = int(sys.argv[4])
m.forward(toks[:8], None)  # warm up
t = time.perf_counter()
for _ in range(reps):
    m.forward(toks, None)
prefill = len(toks) * reps / (time.perf_counter() - t)
out, state = m.forward(toks[:1], None)
t = time.perf_counter()
for tok in toks[:64]:
    out, state = m.forward([tok], state)
print(json.dumps({"prefill": prefill, "decode": 64 / (time.perf_counter() - t)}))
"""


def timed(fn, reps):
    fn()  # warm up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    from rwkv_deploy import export, open_session

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "m.pth"
        write_checkpoint(a, ckpt)
        tokens = np.random.default_rng(0).integers(0, a.vocab, (1, a.tokens))
        for wkv in ("portable", "fused"):
            out = export(ckpt, Path(tmp) / wkv, wkv=wkv, prefill="last")
            s = open_session(out)
            pre = a.tokens / timed(lambda: s.prefill(tokens, s.init_state(1)), a.reps)
            _, state = s.prefill(tokens[:, :1], s.init_state(1))
            step_tok = tokens[:, 0]
            dec = 1 / timed(lambda: s.step(step_tok, state), 64)
            rows.append((f"onnxruntime {wkv}", pre, dec))
        r = subprocess.run([sys.executable, "-c", OFFICIAL, str(ckpt.with_suffix("")), a.version,
                            json.dumps(tokens[0].tolist()), str(a.reps)], capture_output=True, text=True,
                           env={**os.environ})
        if r.returncode != 0:
            print("official package failed:", r.stderr[-1500:], file=sys.stderr)
        else:
            o = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(("official rwkv 'cpu fp32'", o["prefill"], o["decode"]))
    print(f"RWKV-{a.version} {a.layers}x{a.embd} vocab {a.vocab}, batch 1, prefill T={a.tokens}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'runtime':<28}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for name, pre, dec in rows:
        print(f"{name:<28}{pre:>15.1f}{dec:>14.1f}")


if __name__ == "__main__":
    main()
