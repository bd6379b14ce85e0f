"""fp16 at size: every vocabulary id (or every --stride-th) as the first token, the fp16 export's distance from
exact math against the fp16 PyTorch reference's own, per id. An outlier is an id where the export is further than
the certificate's worst-step factor allows given the reference's worst over the sweep.

    python bench/fp16_sweep.py [--versions 7 4 ...] [--layers 12 --embd 768] [--stride 1] [--exact float32|float64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", nargs="+", default=["7", "4", "5.2", "6", "5.0", "5.1"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--stride", type=int, default=1, help="sweep every n-th id (1 = the whole vocabulary)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--exact", default="float32", choices=["float32", "float64"],
                    help="what stands in for exact math (float32's error is ~1000x below fp16's)")
    a = ap.parse_args()

    from rwkv_deploy import export
    from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint
    from rwkv_deploy.validation.compare import GATES, first_token_sweep

    print(f"{'version':<8}{'ids':>7}  {'export worst':>13}{'ref worst':>11}{'ratio':>7}{'export p99':>12}{'ref p99':>10}"
          f"{'outliers':>9}  worst ids (export / ref)", flush=True)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for v in a.versions:
            ckpt = Path(tmp) / f"v{v}.pth"
            save_checkpoint(make_checkpoint(v, n_layer=a.layers, n_embd=a.embd, head_size=64,
                                            vocab_size=50277 if v == "4" else 65536), ckpt)
            out = export(ckpt, Path(tmp) / "out", precision="fp16", force=True)
            t = time.time()
            s = first_token_sweep(out, np.arange(0, 50277 if v == "4" else 65536, a.stride), a.chunk,
                                  getattr(torch, a.exact),
                                  progress=lambda n, total: print(f"\r  {n}/{total} ids, {time.time() - t:.0f}s",
                                                                  end="", file=sys.stderr, flush=True))
            print(file=sys.stderr)
            worst = np.argsort(-s.export)[:3]
            print(f"{v:<8}{len(s.ids):>7}  {s.export.max():>13.3g}{s.reference.max():>11.3g}"
                  f"{s.export.max() / s.reference.max():>7.2f}{np.quantile(s.export, .99):>12.3g}"
                  f"{np.quantile(s.reference, .99):>10.3g}{len(s.outliers(GATES['fp16'])):>9}  "
                  + ", ".join(f"{s.ids[i]} ({s.export[i]:.3g} / {s.reference[i]:.3g})" for i in worst), flush=True)
            ckpt.unlink()


if __name__ == "__main__":
    main()
