"""Building blocks shared by every RWKV version: dimensions, state kinds, weight containers, norms."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-5  # every LayerNorm (ln0, ln1, ln2, ln_out), spec §1
GN_EPS = 64e-5  # ln_x GroupNorm for v5.0..v7: 1e-5 on y/8 during training, spec §5.2


@dataclass
class Dims:
    """Sizes read off a checkpoint's shapes (spec §2)."""

    version: str  # "4", "5.0", "5.1", "5.2", "6", "7"
    n_layer: int  # L
    n_embd: int  # C
    dim_att: int  # A
    dim_ffn: int  # F
    n_head: int  # H
    head_size: int  # N
    vocab_size: int  # V
    lora: dict[str, int] = field(default_factory=dict)  # v6: Dm, Dd; v7: Dw, Da, Dv, Dg


@dataclass(frozen=True)
class StateKind:
    """One per-layer recurrent state tensor: its name, shape without batch, and initial fill value."""

    name: str
    shape: tuple[int, ...]
    init: float = 0.0
    fp32: bool = True  # stays float32 even in an fp16 model (spec §8.2)


class Params(nn.Module):
    """Tensors addressed by their checkpoint names: Params({'key.weight': t}).key.weight is t.

    They are buffers, so ONNX initializers keep the checkpoint's names.
    """

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        groups: dict[str, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            head, _, rest = name.partition(".")
            if rest:
                groups.setdefault(head, {})[rest] = t
            else:
                self.register_buffer(head, t)
        for head, sub in groups.items():
            self.add_module(head, Params(sub))


def layer_norm(x: Tensor, ln: Params) -> Tensor:
    return F.layer_norm(x, ln.weight.shape, ln.weight, ln.bias, LN_EPS)  # weight's shape: static when traced


def group_norm_heads(y: Tensor, ln_x: Params, hn: torch.Size) -> Tensor:
    """GN_H of spec §1: normalise each head of y [..., H, N], then the per-channel affine; returns [..., H*N]."""
    y = F.layer_norm(y, hn[1:], eps=GN_EPS)  # [..., H, N]
    y = y.flatten(-2)  # [..., A]
    return y * ln_x.weight + ln_x.bias


def mix(xx: Tensor, sx: Tensor, mu: Tensor) -> Tensor:
    """v4/v5 token-shift interpolation: xx*mu + sx*(1-mu)."""
    return xx * mu + sx * (1 - mu)


def lerp(xx: Tensor, sx: Tensor, mu: Tensor) -> Tensor:
    """v6/v7 token-shift interpolation: xx + (sx-xx)*mu."""
    return xx + (sx - xx) * mu


def relu_sq(x: Tensor) -> Tensor:
    r = torch.relu(x)
    return r * r  # not `** 2`: ONNX Runtime leaves the int8/int4 product before a Pow unfused (~40 % of a step)
