"""Export time, peak memory and size for realistically shaped random checkpoints.

    python bench/export_bench.py --version 7 --layers 12 --embd 768 --vocab 50277 --precision fp32
    python bench/export_bench.py --version 7 --layers 12 --embd 2048 --vocab 65536   # > 2 GB: external data

Each export runs in a child process so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_model_args, write_checkpoint

CHILD = """
import json, sys, time, resource
from rwkv_deploy import export
t = time.time()
out = export(sys.argv[1], sys.argv[2], precision=sys.argv[3])
print(json.dumps({"seconds": time.time() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--dir", help="working folder (default: a temporary one, removed)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        ckpt = Path(tmp) / "model.pth"
        t = time.time()
        n_params = write_checkpoint(a, ckpt)
        print(f"checkpoint: RWKV-{a.version} {a.layers}x{a.embd} vocab {a.vocab}, {n_params / 1e6:.0f}M params, "
              f"bf16 {ckpt.stat().st_size / 1e9:.2f} GB (made in {time.time() - t:.0f}s)")
        out = Path(tmp) / "export"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), a.precision], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        secs = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
        files = {f.name: f.stat().st_size for f in out.iterdir() if f.is_file()}
        print(f"export {a.precision}: {secs:.1f}s, peak RSS {max(peak_kb, before) / 1e6:.2f} GB, "
              + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in sorted(files.items()) if v > 1e6))


if __name__ == "__main__":
    main()
