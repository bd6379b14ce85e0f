"""RWKV-5.0 / 5.1 / 5.2 (spec §3, §5.2): multi-head matrix state S [H, key, value], constant decay.

5.0: one decay per head.  5.1: adds the silu gate.  5.2: one decay per head and key channel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Version
from .common import Params, StateKind, group_norm_heads, mix
from .v4 import channel_mix_v4, ffn_shapes_v4, projection_shapes, random_ffn_v4, random_projections


def attend_v5(att: Params, r: Tensor, k: Tensor, v: Tensor, w: Tensor, S: Tensor, out_dtype, ops):
    """Shared by v5.x and v6: WKV over the sequence then the head-wise GroupNorm.

    r, k, v [B, T, H, N] fp32; w decay [B, T, H, N]; S [B, H, N, N]. Returns y [B, T, A] and S.
    """
    y, S = ops.v5(r, k, v, w, att.u, S)  # [B, T, H, N]
    return group_norm_heads(y, att.ln_x, att.u.shape).to(out_dtype), S  # GroupNorm in fp32 (spec §8.2)


def heads(x: Tensor, hn: torch.Size) -> Tensor:
    # [..., A] -> [..., H, N]. Not unflatten: the tracer freezes its whole output shape, batch and T included
    return x.reshape(*x.shape[:-1], *hn)


class V5(Version):
    fp32_keys = frozenset({"att.decay", "att.u", "att.ln_x.weight", "att.ln_x.bias"})

    def __init__(self, name: str):
        self.name = name
        self.gate = name != "5.0"
        self.per_channel_decay = name == "5.2"

    def detect(self, sd):
        """ln_x present; the gate from 5.1 on; 5.2's decay per head and key channel [H, N], 5.1's per head [H]."""
        if "blocks.0.att.ln_x.weight" not in sd or ("blocks.0.att.gate.weight" in sd) != self.gate:
            return False
        td = sd.get("blocks.0.att.time_decay")
        per_channel = td is not None and td.squeeze().dim() == 2
        return not self.gate or per_channel == self.per_channel_decay

    def released_dim_ffn(self, n_embd):
        return int(3.5 * n_embd) // 32 * 32

    def read_dims(self, sd, d):
        td = sd["blocks.0.att.time_decay"].squeeze()
        if self.per_channel_decay:
            d.n_head, d.head_size = td.shape
        else:
            d.n_head = td.numel()
            d.head_size = d.dim_att // d.n_head

    def layer_shapes(self, d, i, present):
        C, A, H, N = d.n_embd, d.dim_att, d.n_head, d.head_size
        hw = (H, N) if self.per_channel_decay else (H,)
        # the bonus is stored as time_faaaa (used as is) or, in early 5.0/5.1 files, as time_first (exp'd)
        bonus = "att.time_first" if "att.time_first" in present and "att.time_faaaa" not in present else "att.time_faaaa"
        s = {"att.time_mix_k": (C,), "att.time_mix_v": (C,), "att.time_mix_r": (C,),
             "att.time_decay": hw, bonus: hw, "att.ln_x.weight": (A,), "att.ln_x.bias": (A,),
             **projection_shapes(d), **ffn_shapes_v4(d)}
        if self.gate:
            s.update({"att.time_mix_g": (C,), "att.gate.weight": (A, C)})
        return s

    def optional_shapes(self, d, i):
        return {"att.time_state": (d.n_head, d.head_size, d.head_size)}

    def random_layer(self, d, draw):
        C, A = d.n_embd, d.dim_att
        hw = (d.n_head, d.head_size) if self.per_channel_decay else (d.n_head,)
        proj = random_projections(d, draw)
        p = {f"att.time_mix_{x}": draw.mix(C) for x in "kvr"}
        p.update({"att.time_decay": draw.uniform(-6, 1, *hw), **proj, **draw.layer_norm("att.ln_x", A)})
        # 5.0 files carry time_first (exp'd at load); 5.1/5.2 carry time_faaaa (used as is)
        p["att.time_first" if self.name == "5.0" else "att.time_faaaa"] = draw.uniform(-1, 1, *hw)
        if self.gate:
            p.update({"att.time_mix_g": draw.mix(C), "att.gate.weight": draw.linear(A, C)})
        return {**p, **random_ffn_v4(d, draw)}

    def prepare(self, p, d, i):
        H, N = d.n_head, d.head_size
        p["att.decay"] = torch.exp(-torch.exp(p.pop("att.time_decay"))).reshape(H, -1).expand(H, N).contiguous()
        u = p.pop("att.time_faaaa") if "att.time_faaaa" in p else torch.exp(p.pop("att.time_first"))
        p["att.u"] = u.reshape(H, -1).expand(H, N).contiguous()  # [H, N]
        if "att.time_state" in p:  # trained as [H, value, key]; we work in [H, key, value] (spec §6)
            p["att.time_state"] = p["att.time_state"].transpose(1, 2).contiguous()
        return p

    def wkv_state(self, d):
        return [StateKind("S", (d.n_head, d.head_size, d.head_size))]

    def initial_wkv_state(self, p, kind):
        return getattr(p.att, "time_state", None)

    def time_mix(self, att, xx, sx, state, carry, ops):
        S = state["S"]
        hn = att.u.shape  # (H, N)
        r = heads(F.linear(mix(xx, sx, att.time_mix_r), att.receptance.weight).to(S.dtype), hn)  # [B, T, H, N]
        k = heads(F.linear(mix(xx, sx, att.time_mix_k), att.key.weight).to(S.dtype), hn)
        v = heads(F.linear(mix(xx, sx, att.time_mix_v), att.value.weight).to(S.dtype), hn)
        w = att.decay.expand_as(r)  # [B, T, H, N]
        y, S = attend_v5(att, r, k, v, w, S, xx.dtype, ops)  # [B, T, A]
        if self.gate:
            y = y * F.silu(F.linear(mix(xx, sx, att.time_mix_g), att.gate.weight))
        return F.linear(y, att.output.weight), {"S": S}, carry

    def channel_mix(self, ffn, xx, sx):
        return channel_mix_v4(ffn, xx, sx)
