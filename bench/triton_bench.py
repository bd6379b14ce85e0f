"""Decode throughput through Triton: N concurrent sequences (one client thread each) against the tritonserver
bundled in nvidia-pytriton, serving a `rwkv-deploy triton --backend python` repository on this machine's CPU.

    python bench/triton_bench.py --concurrency 1 4 16 --steps 64

Each sequence sends a 16-token prompt (one request), then --steps single tokens (one request each, waiting for
the logits like a sampler would). Throughput = all sequences' decode tokens / decode wall time. Beside it, the
same model in-process (OnnxSession.step at batch N): what the server's batching and gRPC cost. Client threads,
server and model share the machine's cores. Needs the Triton venv (scripts/test.sh) and tritonclient.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import add_model_args, write_checkpoint

from rwkv_deploy import export, open_session
from rwkv_deploy.triton import write_repository
from rwkv_deploy.triton.client import SequenceClient
from rwkv_deploy.triton.local import LocalTriton

PROMPT = 16


def through_server(url: str, n: int, steps: int, vocab: int) -> tuple[float, float]:
    """(decode tokens/s over all sequences, mean batch size the server ran)."""
    clients = [SequenceClient(url) for _ in range(n)]
    stats0 = clients[0].client.get_inference_statistics("rwkv", as_json=True)["model_stats"][0]
    ready, go, times = threading.Barrier(n + 1), threading.Barrier(n + 1), [0.0] * n
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (n, PROMPT + steps))

    def run(k: int):
        c, seq = clients[k], 1000 + k
        c.feed(seq, tokens[k, :PROMPT], start=True)
        ready.wait()
        go.wait()
        for t in tokens[k, PROMPT:]:
            c.feed(seq, [t])
        times[k] = time.perf_counter()
        c.end(seq)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    stats = clients[0].client.get_inference_statistics("rwkv", as_json=True)["model_stats"][0]
    inferences = int(stats.get("inference_count", 0)) - int(stats0.get("inference_count", 0))
    executions = int(stats.get("execution_count", 0)) - int(stats0.get("execution_count", 0))
    for c in clients:
        c.close()
    return n * steps / (max(times) - t0), inferences / max(executions, 1)


def in_process(folder: Path, n: int, steps: int) -> float:
    sess = open_session(folder, providers="cpu")
    state = sess.init_state(n)
    tokens = np.zeros(n, np.int64)
    _, state = sess.step(tokens, state)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, state = sess.step(tokens, state)
    return n * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, version="7", layers=6, embd=256, head_size=64, vocab=50277)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--venv", help="the Triton venv (default: $RWKV_TRITON_VENV or .venv-triton)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = write_checkpoint(a, tmp / "m.pth")
        folder = export(tmp / "m.pth", tmp / "out", prefill="last")
        repo = write_repository(folder, tmp / "repo", backend="python", max_batch=a.max_batch)
        print(f"RWKV-{a.version} {a.layers} layers x {a.embd}, vocab {a.vocab}: {params / 1e6:.1f}M params, fp32; "
              f"Python backend, oldest strategy, max batch {a.max_batch}; {PROMPT}-token prompt + {a.steps} steps")
        print(f"{'sequences':>9}  {'through Triton tok/s':>21}  {'per sequence':>12}  {'mean batch':>10}  "
              f"{'in-process step tok/s':>21}")
        with LocalTriton(repo, a.venv) as server:
            for n in a.concurrency:
                through_server(server.grpc_url, n, 4, a.vocab)  # warm-up: threads, channels, ORT arenas
                tps, batch = through_server(server.grpc_url, n, a.steps, a.vocab)
                direct = in_process(folder, n, a.steps)
                print(f"{n:>9}  {tps:>21.1f}  {tps / n:>12.1f}  {batch:>10.2f}  {direct:>21.1f}", flush=True)


if __name__ == "__main__":
    main()
