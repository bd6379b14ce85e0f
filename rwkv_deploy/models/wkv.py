"""The WKV recurrences, written once (spec §5, §7).

Every function here takes one token per batch row; `scan` runs a cell over a sequence. The reference
model, the portable ONNX export (traced), the custom-op reference kernels and the tests all call these.
Shapes: B batch, A attention width, H heads, N head size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor]):
    """RWKV-4 in the stable "pp" form (spec §5.1).

    w = -exp(time_decay) [A]; u = time_first [A]; k, v [B, A]; state = (aa, bb, pp), each [B, A], where the
    running numerator/denominator are aa*e^pp and bb*e^pp. Returns wkv [B, A] and the new state.
    """
    aa, bb, pp = state
    ww = u + k  # [B, A]: the current token's bonus weight
    p = torch.maximum(pp, ww)
    e1 = torch.exp(pp - p)
    e2 = torch.exp(ww - p)
    wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)  # [B, A]
    ww = w + pp  # decay the past by one step
    p = torch.maximum(ww, k)
    e1 = torch.exp(ww - p)
    e2 = torch.exp(k - p)
    return wkv, (e1 * aa + e2 * v, e1 * bb + e2, p)


def wkv5(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, S: Tensor):
    """RWKV-5.x/6 (spec §5.2, §5.3): linear attention with per-key-channel decay and a bonus for the current token.

    r, k, v [B, H, N]; w decay in (0, 1) [B, H, N] or [H, N]; u [H, N]; S [B, H, N(key), N(value)].
    The output reads the OLD state. Returns y [B, H, N] and the new S.
    """
    kv = k[..., :, None] * v[..., None, :]  # [B, H, N, N]
    y = (r[..., None, :] @ (u[..., :, None] * kv + S)).squeeze(-2)  # [B, H, N]
    return y, kv + w[..., :, None] * S


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, S: Tensor):
    """RWKV-7 generalised delta rule (spec §5.4): S' = S·diag(w) + (S a) bᵀ + v kᵀ, y = S' r.

    r, w, k, v, a, b [B, H, N]; S [B, H, N(value), N(key)]. v7 uses a = -kk and b = kk*a_rate.
    The output reads the UPDATED state. Returns y [B, H, N] and the new S.
    """
    S = S * w[..., None, :] + (S @ a[..., :, None]) * b[..., None, :] + v[..., :, None] * k[..., None, :]
    return (S @ r[..., :, None]).squeeze(-1), S  # [B, H, N], [B, H, N, N]


def scan(cell: Callable, xs: tuple[Tensor, ...], state):
    """Run `cell(*x_t, state) -> (y_t, state)` over dim 1 of every x in xs; returns (y [B, T, ...], state)."""
    ys = []
    for t in range(xs[0].shape[1]):
        y, state = cell(*(x[:, t] for x in xs), state)
        ys.append(y)
    return torch.stack(ys, 1), state
