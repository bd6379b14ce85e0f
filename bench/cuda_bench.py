"""CUDA WKV kernels (custom_ops/cuda/wkv_kernels.cu) on a GPU. Needs a CUDA GPU, nvcc and torch with CUDA.

1. Decode step (T = 1): effective bandwidth of the state update (the N x N state per head read once and
   written once) against the card's device-to-device copy bandwidth on the same bytes.
2. Sequence form: tokens/s of each kernel over T tokens (one launch) against models/wkv.py run by torch on
   the same GPU (the reference recurrence, token by token).

    python bench/cuda_bench.py [--batch 64] [--heads 32] [--head-size 64] [--seq 256 --seq-heads 12]
"""
from __future__ import annotations

import argparse
import ctypes

import torch

from rwkv_deploy.custom_ops.build import build_cuda_library
from rwkv_deploy.models.wkv import run_wkv4, run_wkv5, run_wkv7


def seconds(fn, reps: int) -> float:
    """Mean seconds per call of fn, timed with CUDA events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


class Kernels:
    """The three launchers on random fp32 inputs of one shape; `call(kind)` launches one, `torch(kind)` runs the
    reference recurrence on the same tensors."""

    def __init__(self, lib, B: int, T: int, H: int, N: int):
        self.lib, self.B, self.T, self.H, self.N = lib, B, T, H, N
        rand = lambda *s: torch.rand(*s, device="cuda")  # noqa: E731
        A = H * N
        self.seq = [rand(B, T, H, N) for _ in range(6)]  # r, k|w, v|k, w|v, a, b
        self.seq[4] = -torch.nn.functional.normalize(self.seq[4], dim=-1)  # v7: a = -kk, b = kk * a_rate
        self.seq[5] = -self.seq[4] * self.seq[5]
        self.u, self.S = rand(H, N), rand(B, H, N, N) * 0.1
        self.y, self.S_out = torch.empty(B, T, H, N, device="cuda"), torch.empty_like(self.S)
        self.v4_in = [-torch.exp(rand(A)), rand(A), rand(B, T, A), rand(B, T, A), rand(B, A), rand(B, A) + 0.5,
                      rand(B, A)]
        self.v4_out = [torch.empty(B, T, A, device="cuda")] + [torch.empty(B, A, device="cuda") for _ in range(3)]
        self.stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def call(self, kind: str) -> None:
        p = lambda ts: [ctypes.c_void_p(t.data_ptr()) for t in ts]  # noqa: E731
        B, T, H, N = self.B, self.T, self.H, self.N
        if kind == "4":
            rc = self.lib.rwkv_wkv4_cuda(B, T, H * N, *p(self.v4_in), *p(self.v4_out), self.stream)
        elif kind == "5":
            rc = self.lib.rwkv_wkv5_cuda(B, T, H, N, *p(self.seq[:4]), *p([self.u, self.S, self.y, self.S_out]),
                                         self.stream)
        else:
            rc = self.lib.rwkv_wkv7_cuda(B, T, H, N, *p(self.seq), *p([self.S, self.y, self.S_out]), self.stream)
        if rc:
            raise SystemExit(f"wkv{kind} launcher returned CUDA error {rc}")

    def torch(self, kind: str) -> None:
        if kind == "4":
            run_wkv4(*self.v4_in)
        elif kind == "5":
            run_wkv5(*self.seq[:4], self.u, self.S)
        else:
            run_wkv7(*self.seq, self.S)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64, help="decode batch")
    ap.add_argument("--heads", type=int, default=32, help="decode heads (32 x 64 = a 2048-wide model)")
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256, help="sequence length of the prefill comparison")
    ap.add_argument("--seq-heads", type=int, default=12, help="heads in the prefill comparison (12 x 64 = 768)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark only runs on one")
    lib = ctypes.CDLL(str(build_cuda_library()))
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.version.cuda and 'CUDA ' + torch.version.cuda}")

    B, H, N = a.batch, a.heads, a.head_size
    k = Kernels(lib, B, 1, H, N)
    state_bytes = 2 * k.S.numel() * 4  # read once, written once
    print(f"\ndecode step, B={B} H={H} N={N}: state {k.S.numel() * 4 / 1e6:.1f} MB per layer")
    copy = state_bytes / seconds(lambda: k.S_out.copy_(k.S), 500)
    print(f"  device copy of the state (read+write)  {copy / 1e9:8.1f} GB/s")
    for kind in ("5", "7"):
        t = seconds(lambda: k.call(kind), 500)
        print(f"  wkv{kind} step  {t * 1e6:7.1f} us  {state_bytes / t / 1e9:8.1f} GB/s of state traffic  "
              f"({state_bytes / t / copy:.0%} of copy)")
    v4_bytes = sum(t.numel() for t in k.v4_in + k.v4_out) * 4
    t = seconds(lambda: k.call("4"), 500)
    print(f"  wkv4 step  {t * 1e6:7.1f} us  {v4_bytes / t / 1e9:8.1f} GB/s of all its traffic (state is 3 x B x A)")

    T, Hs = a.seq, a.seq_heads
    s = Kernels(lib, 1, T, Hs, N)
    print(f"\nsequence form, batch 1, T={T}, H={Hs} N={N} (one layer): tokens/s")
    for kind in ("4", "5", "7"):
        fused, ref = seconds(lambda: s.call(kind), 50), seconds(lambda: s.torch(kind), 3)
        print(f"  wkv{kind}  kernel {T / fused:12,.0f}   torch models/wkv.py {T / ref:10,.0f}   ({ref / fused:.0f}x)")


if __name__ == "__main__":
    main()
