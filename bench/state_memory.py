"""State memory does not grow with context: resident memory of a process decoding one long sequence.

Steps an export token by token (batch 1, its own state carried) for --steps tokens and prints the resident set
(current, from /proc/self/statm, not the peak) after 100, 1000, ... steps, and the change from step 100 on.

    python bench/state_memory.py EXPORT [--steps 10000] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
            seen[t + 1] = rss_bytes()
            print(f"after {t + 1:>6} steps: RSS {seen[t + 1] / 1e6:8.1f} MB  ({(t + 1) / (time.time() - t0):.0f} tok/s)",
                  flush=True)
    base = seen[min(seen)]
    print(f"change from step {min(seen)} to step {a.steps}: {(seen[a.steps] - base) / 1e6:+.1f} MB "
          f"({(seen[a.steps] / base - 1):+.2%})")


if __name__ == "__main__":
    main()
