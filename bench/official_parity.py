"""Our PyTorch reference against the official `rwkv` package, token by token, every version and storage dtype.

    python bench/official_parity.py [--tokens 1000] [--layers 4 --embd 128]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import add_model_args


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, layers=4, embd=128, head_size=32, vocab=1024)
    ap.add_argument("--tokens", type=int, default=1000)
    a = ap.parse_args()

    import torch

    from rwkv_deploy.models import load_model
    from rwkv_deploy.models.synthetic import ALL_VERSIONS, make_checkpoint, save_checkpoint
    from rwkv_deploy.validation.loop import stepwise
    from rwkv_deploy.validation.metrics import max_normalised
    from rwkv_deploy.validation.official import official_logits

    tokens = np.random.default_rng(0).integers(0, a.vocab, a.tokens).tolist()
    print(f"{a.layers}x{a.embd}, head {a.head_size}, vocab {a.vocab}, {a.tokens} tokens one at a time, "
          "official rwkv 0.8.32 'cpu fp32' vs our float32 reference; the last two columns: each against our "
          "float64 reference (the fp32 floor)")
    print(f"{'version':<8}{'stored':<10}{'max|Δ|/std':>12}{'max|Δ|':>12}{'top-1':>8}"
          f"{'official vs f64':>17}{'ours vs f64':>13}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for v in ALL_VERSIONS:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                path = Path(tmp) / f"v{v}.pth"
                save_checkpoint(make_checkpoint(v, a.layers, a.embd, a.head_size, a.vocab, dtype=dtype), path)
                ref = official_logits(path, v, tokens)
                ours, exact = (stepwise(load_model(path, dt), torch.tensor([tokens]))[0][0]
                               for dt in ("float32", "float64"))
                print(f"{v:<8}{str(dtype)[6:]:<10}{max_normalised(ours, ref):>12.3g}{np.abs(ours - ref).max():>12.3g}"
                      f"{(ours.argmax(-1) == ref.argmax(-1)).mean():>8.1%}"
                      f"{max_normalised(ref, exact):>17.3g}{max_normalised(ours, exact):>13.3g}")


if __name__ == "__main__":
    main()
