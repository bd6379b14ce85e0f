"""State memory does not grow with context: resident memory of a process decoding one long sequence.

Steps an export token by token (batch 1, its own state carried) for --steps random tokens and prints the resident
set (current, not the peak) after 100, 1000, ... steps, split as Linux counts it (/proc/self/status): anonymous
memory (the session's arenas, the state, Python) and file-backed pages. ONNX Runtime maps weights.onnx.data, so
each new token's embedding row brings its page in: file-backed memory grows with the number of distinct tokens
seen, up to the embedding table's size, whatever the context length. The state's memory is anonymous.

    python bench/state_memory.py EXPORT [--steps 10000] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def rss_bytes() -> dict[str, int]:
    """{"RssAnon": bytes, "RssFile": bytes, "VmRSS": bytes} from /proc/self/status."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    from rwkv_deploy import open_session

    sess = open_session(a.folder, providers="cpu", threads=a.threads)
    vocab = int(sess.manifest["vocab_size"])
    tokens = np.random.default_rng(0).integers(0, vocab, a.steps)
    marks = sorted({m for m in (100, 1000, 2000, 5000, a.steps) if m <= a.steps} | {a.steps})
    state, seen, t0 = sess.init_state(1), {}, time.time()
    for t in range(a.steps):
        logits, state = sess.step(tokens[t:t + 1], state)
        if t + 1 in marks:
            m = seen[t + 1] = rss_bytes()
            print(f"after {t + 1:>6} steps: RSS {m['VmRSS'] / 1e6:8.1f} MB = anonymous {m['RssAnon'] / 1e6:7.1f} + "
                  f"file-backed {m['RssFile'] / 1e6:7.1f}  ({(t + 1) / (time.time() - t0):.0f} tok/s)", flush=True)
    first, last = seen[min(seen)], seen[a.steps]
    for k, what in (("RssAnon", "anonymous (state, arenas)"), ("RssFile", "file-backed (mapped weights)"),
                    ("VmRSS", "all")):
        print(f"{what:<30} step {min(seen)} -> {a.steps}: {(last[k] - first[k]) / 1e6:+7.1f} MB "
              f"({last[k] / first[k] - 1:+.2%})")


if __name__ == "__main__":
    main()
