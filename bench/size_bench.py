"""Export and verify at real sizes: peak RSS and wall time, each command in its own process.

For each version and shape: a random bf16 checkpoint (as released files are stored; World vocabulary 65536), then
per precision `rwkv-deploy export --prefill` and `rwkv-deploy verify --steps N`, each timed with its peak RSS
(ru_maxrss of the child), the export's weight bytes and the bound export must stay under (1.3 x weights + 1.5 GB).
`--bad P...` also exports, in those precisions, a copy with 1 % of a middle layer's value matrix replaced and
verifies it against the intact checkpoint: the verdict must fail it at every size.

    python bench/size_bench.py [--versions 7 6] [--shapes 12x768 24x2048 32x2560] [--precisions fp32 fp16]
        [--bad fp16] [--steps 16] [--dir DIR] [--json F]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def damaged_key(n_layer: int) -> str:
    return f"blocks.{n_layer // 2}.att.value.weight"


def make(version: str, n_layer: int, n_embd: int, path: Path, damaged: bool = False) -> None:
    """One layer at a time (make_checkpoint holds fp32 copies of everything: 17 GB at 2.9B), stored as bf16;
    `damaged`: the same draws with 1 % of damaged_key's entries replaced."""
    import torch

    from rwkv_deploy.models.synthetic import corrupt_matrix, make_checkpoint, save_checkpoint

    sd = {}
    for i in range(n_layer):
        one = make_checkpoint(version, n_layer=1, n_embd=n_embd, head_size=64, vocab_size=65536, seed=i)
        for k, t in one.items():
            if k.startswith("blocks.0."):
                if i and ".ln0." in k:
                    continue
                sd[f"blocks.{i}." + k[len("blocks.0."):]] = t.to(torch.bfloat16)
            elif i == 0:
                sd[k] = t.to(torch.bfloat16)
        del one
    if damaged:
        sd = corrupt_matrix(sd, damaged_key(n_layer))
    save_checkpoint(sd, path)


def timed(cmd: list[str]) -> dict:
    """Run cmd; its wall time, exit code, peak RSS in bytes (this child's own, from wait4; Linux starts a child's
    ru_maxrss at its parent's RSS, so this parent stays small: it imports neither torch nor the package) and last
    output lines."""
    import os
    import tempfile

    t = time.time()
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().strip().splitlines()[-3:]
    return {"cmd": " ".join(cmd), "rc": p.returncode, "seconds": time.time() - t, "peak_rss": usage.ru_maxrss * 1024,
            "tail": tail}


def main() -> None:
    if sys.argv[1:2] == ["--make"]:
        v, L, C, path = sys.argv[2:6]
        return make(v, int(L), int(C), Path(path), damaged=sys.argv[6:] == ["damaged"])
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", nargs="+", default=["7", "6"])
    ap.add_argument("--shapes", nargs="+", default=["12x768", "24x2048", "32x2560"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--bad", nargs="*", default=[], help="precisions to also export from a damaged copy")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--dir", default="size-bench")
    ap.add_argument("--json")
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(exist_ok=True)
    rows = []
    cli = [sys.executable, "-m", "rwkv_deploy.cli"]
    print("(a precision marked ! is the damaged copy, verified against the intact checkpoint: it must FAIL)")
    print(f"{'ver':<4}{'shape':<9}{'prec':<6}{'weights GB':>11}{'export s':>9}{'export RSS GB':>14}{'bound GB':>9}"
          f"{'verify s':>9}{'verify RSS GB':>14}  verdict", flush=True)
    for v in a.versions:
        for shape in a.shapes:
            L, C = map(int, shape.split("x"))
            ckpt = root / f"v{v}-{shape}.pth"
            if not ckpt.exists():  # in a child: a parent's RSS at fork counts in every later child's ru_maxrss
                subprocess.run([sys.executable, __file__, "--make", v, str(L), str(C), str(ckpt)], check=True)
            bad = root / f"v{v}-{shape}-damaged.pth"
            if a.bad and not bad.exists():
                subprocess.run([sys.executable, __file__, "--make", v, str(L), str(C), str(bad), "damaged"], check=True)
            for precision, damaged in [(p, False) for p in a.precisions] + [(p, True) for p in a.bad]:
                out = root / f"v{v}-{shape}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                source = bad if damaged else ckpt
                ex = timed([*cli, "export", str(source), "-o", str(out), "--precision", precision, "--prefill"])
                weights = sum(f.stat().st_size for f in out.glob("*.onnx*")) if ex["rc"] == 0 else 0
                # a damaged export is verified against the intact checkpoint, as a user's bad conversion would be
                ve = timed([*cli, "verify", str(out), "--steps", str(a.steps), "--checkpoint", str(ckpt)]
                           ) if ex["rc"] == 0 else {}
                report = json.loads((out / "verify.json").read_text()) if (out / "verify.json").exists() else {}
                row = {"version": v, "shape": shape, "precision": precision, "damaged": damaged and damaged_key(L),
                       "weights_bytes": weights, "bound_bytes": 1.3 * weights + 1.5e9, "export": ex, "verify": ve,
                       "passed": report.get("passed"), "largest_ratio": report.get("largest_ratio"),
                       "verify_peak_rss_reported": report.get("peak_rss_bytes"), "method": report.get("method"),
                       "failures": report.get("failures"),
                       "summary": {m: report[m]["summary"] for m in ("free_running", "teacher_forced") if m in report}}
                rows.append(row)
                gb = lambda x: f"{x / 1e9:.2f}" if x else "-"  # noqa: E731
                print(f"{v:<4}{shape:<9}{precision + ('!' if damaged else ''):<6}{gb(weights):>11}"
                      f"{ex['seconds']:>9.0f}{gb(ex['peak_rss']):>14}"
                      f"{gb(row['bound_bytes']):>9}{ve.get('seconds', 0):>9.0f}{gb(report.get('peak_rss_bytes')):>14}  "
                      f"{'PASS' if row['passed'] else 'FAIL' if ve else 'export failed: ' + ' '.join(ex['tail'])}",
                      flush=True)
                if a.json:
                    Path(a.json).write_text(json.dumps(rows, indent=1))
                shutil.rmtree(out, ignore_errors=True)
            ckpt.unlink()
            bad.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
