"""The parity table: every version x precision, exported and verified against the reference.

    python bench/parity_table.py [--steps 256] [--batch 4] [--layers 4 --embd 128] [--wkv fused]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import add_model_args, write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, layers=4, embd=128, head_size=32, vocab=1024)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--wkv", default="portable")
    a = ap.parse_args()

    from rwkv_deploy import export
    from rwkv_deploy.models.synthetic import ALL_VERSIONS
    from rwkv_deploy.validation.compare import verify

    print(f"{a.layers}x{a.embd}, head {a.head_size}, vocab {a.vocab}, bf16-stored random weights, wkv {a.wkv}; "
          f"{a.steps} steps x batch {a.batch}, free-running / teacher-forced")
    print(f"{'version':<8}{'prec':<6}{'|Δ|/std free':>14}{'|Δ|/std forced':>16}{'max|Δ|':>10}{'top-1':>8}{'top-1*':>8}"
          f"{'export s':>10}{'size MB':>9}  verdict")
    with tempfile.TemporaryDirectory() as tmp:
        for v in ALL_VERSIONS:
            ckpt = Path(tmp) / f"v{v}.pth"
            write_checkpoint(a, ckpt, version=v)
            for prec in ("fp32", "fp16"):
                t = time.time()
                out = export(ckpt, Path(tmp) / f"{v}-{prec}", precision=prec, wkv=a.wkv)
                secs = time.time() - t
                size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
                r = verify(out, steps=a.steps, batch=a.batch)
                f, g = r.summaries().values()
                print(f"{v:<8}{prec:<6}{f['normalised']:>14.3g}{g['normalised']:>16.3g}"
                      f"{max(f['max_abs'], g['max_abs']):>10.3g}{min(f['top1'], g['top1']):>8.1%}"
                      f"{min(f['top1_ties'], g['top1_ties']):>8.1%}{secs:>10.1f}{size:>9.1f}  {'PASS' if r else 'FAIL'}")


if __name__ == "__main__":
    main()
