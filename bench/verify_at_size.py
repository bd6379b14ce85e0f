"""The certificate at a real size, both ways: correct exports pass, a corrupted one fails.

For each version: a random checkpoint (default 12x768, 169M-shaped; vocab 50277 for v4, 65536 otherwise), its
fp32 portable, fp32 fused and fp16 exports verified over --steps tokens, and the same three exports of a copy
with 1 % of one matrix's entries replaced, verified against the original checkpoint over --bad-steps tokens.

    python bench/verify_at_size.py [--versions 7 4 ...] [--steps 1000] [--bad-steps 64] [--variants fp32-fused ...]
        [--json F]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

VARIANTS = (("fp32", "portable"), ("fp32", "fused"), ("fp16", "portable"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", nargs="+", default=["7", "4", "5.2", "6", "5.0", "5.1"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--bad-steps", type=int, default=64)
    ap.add_argument("--other-steps", type=int, help="steps for the fused and fp16 exports (default: --steps)")
    ap.add_argument("--variants", nargs="+", default=[f"{p}-{w}" for p, w in VARIANTS],
                    help="which exports of the correct checkpoint to verify (precision-wkv; the bad copy gets all)")
    ap.add_argument("--json", help="write every report summary here")
    a = ap.parse_args()

    from rwkv_deploy import export
    from rwkv_deploy.models.synthetic import corrupt_matrix, make_checkpoint, save_checkpoint
    from rwkv_deploy.validation.compare import verify

    rows = []
    print(f"{'version':<8}{'export':<14}{'ckpt':<6}{'steps':>6}  {'median ratio':>13}{'worst ratio':>12}"
          f"{'export worst':>13}{'ref worst':>11}{'state ratio':>12}  verdict", flush=True)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        for v in a.versions:
            sd = make_checkpoint(v, n_layer=a.layers, n_embd=a.embd, head_size=64,
                                 vocab_size=50277 if v == "4" else 65536)
            good, bad = tmp / f"v{v}.pth", tmp / f"v{v}-bad.pth"
            save_checkpoint(sd, good)
            save_checkpoint(corrupt_matrix(sd, f"blocks.{a.layers // 2}.att.value.weight"), bad)
            del sd
            for ckpt, steps in ((good, a.steps), (bad, a.bad_steps)):
                for precision, wkv in VARIANTS:
                    if ckpt == good and f"{precision}-{wkv}" not in a.variants:
                        continue
                    if ckpt == good and (precision, wkv) != VARIANTS[0] and a.other_steps:
                        steps = a.other_steps
                    out = tmp / "out"
                    export(ckpt, out, precision=precision, wkv=wkv, force=True)
                    t = time.time()
                    r = verify(out, checkpoint=good, steps=steps, write=False)
                    s = [m.summary(r.gate) for _, m in r.modes()]
                    row = {"version": v, "precision": precision, "wkv": wkv, "checkpoint": ckpt.name, "steps": steps,
                           "passed": bool(r), "seconds": time.time() - t,
                           "free_running": s[0], "teacher_forced": s[1], "failures": r.failures()}
                    rows.append(row)
                    worst = lambda k: max(x[k] for x in s)  # noqa: E731
                    print(f"{v:<8}{precision + ' ' + wkv:<14}{'bad' if ckpt == bad else 'good':<6}{steps:>6}  "
                          f"{worst('ratio_median'):>13.2f}{worst('ratio_worst'):>12.2f}{worst('export_worst'):>13.3g}"
                          f"{worst('reference_worst'):>11.3g}"
                          f"{max(x['state_export'] / max(x['state_reference'], 1e-300) for x in s):>12.2f}  "
                          f"{'PASS' if r else 'FAIL'}", flush=True)
                    if a.json:
                        Path(a.json).write_text(json.dumps(rows, indent=1))
            shutil.rmtree(tmp / "out", ignore_errors=True)
            good.unlink()
            bad.unlink()


if __name__ == "__main__":
    main()
