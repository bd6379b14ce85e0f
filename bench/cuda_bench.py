"""CUDA WKV kernels: effective bandwidth of the decode step (state read + written once) against the card's
device-to-device copy bandwidth. Needs a CUDA GPU, nvcc and torch with CUDA.

    python bench/cuda_bench.py [--batch 64] [--heads 32] [--head-size 64]
"""
from __future__ import annotations

import argparse
import ctypes

import torch

from rwkv_deploy.custom_ops.build import build_cuda_library


def gbps(nbytes: float, fn, reps: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-size", type=int, default=64)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark only runs on one")
    lib = ctypes.CDLL(str(build_cuda_library()))
    B, H, N, T = a.batch, a.heads, a.head_size, 1
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    seq = [torch.rand(B, T, H, N, device="cuda") for _ in range(6)]
    S, S_out = torch.rand(B, H, N, N, device="cuda"), torch.empty(B, H, N, N, device="cuda")
    y = torch.empty(B, T, H, N, device="cuda")
    u = torch.rand(H, N, device="cuda")
    state_bytes = 2 * S.numel() * 4  # read once, written once
    print(f"B={B} H={H} N={N}: state {S.numel() * 4 / 1e6:.1f} MB")
    copy = gbps(state_bytes, lambda: S_out.copy_(S))
    print(f"device copy (read+write)   {copy:8.1f} GB/s")
    v5 = gbps(state_bytes, lambda: lib.rwkv_wkv5_cuda(B, T, H, N, *map(p, seq[:4]), p(u), p(S), p(y), p(S_out), stream))
    print(f"wkv5 step (state traffic)  {v5:8.1f} GB/s  ({v5 / copy:.0%} of copy)")
    v7 = gbps(state_bytes, lambda: lib.rwkv_wkv7_cuda(B, T, H, N, *map(p, seq), p(S), p(y), p(S_out), stream))
    print(f"wkv7 step (state traffic)  {v7:8.1f} GB/s  ({v7 / copy:.0%} of copy)")


if __name__ == "__main__":
    main()
