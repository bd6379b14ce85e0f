"""Prefill tokens/s and decode tokens/s: portable vs fused ONNX exports vs the official `rwkv` package.

    python bench/prefill_bench.py --version 7 --layers 12 --embd 768 --tokens 256

All three run on this machine in one run, from the same random bf16 checkpoint (a 169M-shaped model by
default), batch 1, fp32, ONNX Runtime CPU with its default threads. Decode: 64 single steps carrying the
state, through the same loop (validation.loop.stepwise) for every runtime.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_model_args, write_checkpoint


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
    from rwkv_deploy.validation.loop import stepwise
    from rwkv_deploy.validation.official import DECODE_STEPS, official_speed

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "m.pth"
        write_checkpoint(a, ckpt)
        tokens = np.random.default_rng(0).integers(0, a.vocab, (1, a.tokens))
        steps = tokens[:, :DECODE_STEPS]
        for wkv in ("portable", "fused"):
            out = export(ckpt, Path(tmp) / wkv, wkv=wkv, prefill="last")
            s = open_session(out)
            pre = a.tokens / timed(lambda: s.prefill(tokens, s.init_state(1)), a.reps)
            _, state = s.prefill(tokens[:, :1], s.init_state(1))
            dec = steps.shape[1] / timed(lambda: stepwise(s, steps, state), 1)
            rows.append((f"onnxruntime {wkv}", pre, dec))
        try:
            o = official_speed(ckpt, a.version, tokens[0].tolist(), a.reps)
            rows.append(("official rwkv 'cpu fp32'", o["prefill"], o["decode"]))
        except RuntimeError as e:
            print(e, file=sys.stderr)
    print(f"RWKV-{a.version} {a.layers}x{a.embd} vocab {a.vocab}, batch 1, prefill T={a.tokens}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'runtime':<28}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for name, pre, dec in rows:
        print(f"{name:<28}{pre:>15.1f}{dec:>14.1f}")


if __name__ == "__main__":
    main()
