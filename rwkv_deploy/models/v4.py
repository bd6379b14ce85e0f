"""RWKV-4 (spec §3, §5.1, §5.5): scalar-per-channel decay, state (aa, bb, pp) in the stable "pp" form."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Version
from .common import Dims, Params, StateKind, mix, relu_sq


def channel_mix_v4(ffn: Params, xx: Tensor, sx: Tensor) -> Tensor:
    """Shared by v4 and v5.x."""
    r = torch.sigmoid(F.linear(mix(xx, sx, ffn.time_mix_r), ffn.receptance.weight))  # [B, T, C]
    k = relu_sq(F.linear(mix(xx, sx, ffn.time_mix_k), ffn.key.weight))  # [B, T, F]
    return r * F.linear(k, ffn.value.weight)  # [B, T, C]


def ffn_shapes_v4(d: Dims):
    C, F_ = d.n_embd, d.dim_ffn
    return {"ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F_, C),
            "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, F_)}


def projection_shapes(d: Dims, names=("key", "value", "receptance")):
    return {**{f"att.{n}.weight": (d.dim_att, d.n_embd) for n in names}, "att.output.weight": (d.n_embd, d.dim_att)}


def random_projections(d: Dims, draw) -> dict[str, Tensor]:
    """att receptance/key/value/output weights, drawn in that order by every version (before its other att.*)."""
    C, A = d.n_embd, d.dim_att
    return {"att.receptance.weight": draw.linear(A, C), "att.key.weight": draw.linear(A, C),
            "att.value.weight": draw.linear(A, C), "att.output.weight": draw.linear(C, A, 0.5)}


def random_ffn_v4(d: Dims, draw, mix_k="ffn.time_mix_k", mix_r="ffn.time_mix_r") -> dict[str, Tensor]:
    """v4-v6 channel mix (v6 names its coefficients time_maa_*)."""
    C, F_ = d.n_embd, d.dim_ffn
    return {mix_k: draw.mix(C), mix_r: draw.mix(C), "ffn.key.weight": draw.linear(F_, C),
            "ffn.receptance.weight": draw.linear(C, C), "ffn.value.weight": draw.linear(C, F_, 0.5)}


class V4(Version):
    name = "4"
    fp32_keys = frozenset({"att.w", "att.u"})

    def detect(self, sd):
        return True  # tried last: a checkpoint with none of the later versions' keys (spec §2)

    def read_dims(self, sd, d):
        d.n_head, d.head_size = 1, d.dim_att  # v4 has no heads; every channel is its own recurrence

    def layer_shapes(self, d, i, present):
        C, A = d.n_embd, d.dim_att
        return {"att.time_mix_k": (C,), "att.time_mix_v": (C,), "att.time_mix_r": (C,),
                "att.time_decay": (A,), "att.time_first": (A,), **projection_shapes(d), **ffn_shapes_v4(d)}

    def random_layer(self, d, draw):
        proj = random_projections(d, draw)
        p = {f"att.time_mix_{x}": draw.mix(d.n_embd) for x in "kvr"}
        p.update({"att.time_decay": draw.uniform(-5, 2, d.dim_att), "att.time_first": draw.uniform(-2, 0.5, d.dim_att),
                  **proj})
        return {**p, **random_ffn_v4(d, draw)}

    def prepare(self, p, d, i):
        p["att.w"] = -torch.exp(p.pop("att.time_decay"))  # [A], < 0
        p["att.u"] = p.pop("att.time_first")  # [A]
        return p

    def wkv_state(self, d):
        A = d.dim_att
        # pp starts at -1e30 so that the first token gives wkv = v exactly (spec §6)
        return [StateKind("aa", (A,)), StateKind("bb", (A,)), StateKind("pp", (A,), init=-1e30)]

    def time_mix(self, att, xx, sx, state, carry, ops):
        aa = state["aa"]
        r = torch.sigmoid(F.linear(mix(xx, sx, att.time_mix_r), att.receptance.weight))  # [B, T, A]
        # k, v in fp32 even in fp16 models: exp(u + k) overflows otherwise (spec §8.2)
        k = F.linear(mix(xx, sx, att.time_mix_k), att.key.weight).to(aa.dtype)  # [B, T, A]
        v = F.linear(mix(xx, sx, att.time_mix_v), att.value.weight).to(aa.dtype)  # [B, T, A]
        wkv, (aa, bb, pp) = ops.v4(att.w, att.u, k, v, aa, state["bb"], state["pp"])  # [B, T, A]
        out = F.linear(r * wkv.to(r.dtype), att.output.weight)  # [B, T, C]
        return out, {"aa": aa, "bb": bb, "pp": pp}, carry

    def channel_mix(self, ffn, xx, sx):
        return channel_mix_v4(ffn, xx, sx)
