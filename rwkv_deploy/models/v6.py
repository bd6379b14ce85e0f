"""RWKV-6 (spec §3, §5.3): v5.2's recurrence with a data-dependent decay and LoRA token shift ("maa")."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import lerp, relu_sq
from .v4 import projection_shapes, random_ffn_v4, random_projections
from .v5 import V5, attend_v5, heads


class V6(V5):
    fp32_keys = frozenset({"att.time_decay", "att.u", "att.ln_x.weight", "att.ln_x.bias"})
    random_lora = {"Dm": 8, "Dd": 16}

    def __init__(self):
        super().__init__("5.2")  # gate and per-channel decay
        self.name = "6"

    def detect(self, sd):
        return any("time_maa" in k for k in sd)

    def released_lora(self, n_embd):
        return {"Dm": 32, "Dd": 64} if n_embd < 4096 else {"Dm": 64, "Dd": 128}  # BlinkDL's RWKV-6 training code

    def read_dims(self, sd, d):
        d.n_head, d.head_size = sd["blocks.0.att.time_faaaa"].squeeze().shape
        d.lora = {"Dm": sd["blocks.0.att.time_maa_w1"].shape[1] // 5, "Dd": sd["blocks.0.att.time_decay_w1"].shape[1]}

    def layer_shapes(self, d, i, present):
        C, A, F_, H, N = d.n_embd, d.dim_att, d.dim_ffn, d.n_head, d.head_size
        Dm, Dd = d.lora["Dm"], d.lora["Dd"]
        return {**{f"att.time_maa_{x}": (C,) for x in "xwkvrg"},
                "att.time_maa_w1": (C, 5 * Dm), "att.time_maa_w2": (5, Dm, C),
                "att.time_decay": (A,), "att.time_decay_w1": (C, Dd), "att.time_decay_w2": (Dd, A),
                "att.time_faaaa": (H, N), **projection_shapes(d, ("key", "value", "receptance", "gate")),
                "att.ln_x.weight": (A,), "att.ln_x.bias": (A,),
                "ffn.time_maa_k": (C,), "ffn.time_maa_r": (C,), "ffn.key.weight": (F_, C),
                "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, F_)}

    def random_layer(self, d, draw):
        C, A, H, N = d.n_embd, d.dim_att, d.n_head, d.head_size
        Dm, Dd = d.lora["Dm"], d.lora["Dd"]
        proj = random_projections(d, draw)
        p = {f"att.time_maa_{x}": draw.mix(C) for x in "xwkvrg"}
        p.update({"att.time_maa_w1": draw.lora(C, 5 * Dm), "att.time_maa_w2": draw.lora(5, Dm, C),
                  "att.time_decay": draw.uniform(-6, 1, 1, 1, A), "att.time_decay_w1": draw.lora(C, Dd),
                  "att.time_decay_w2": draw.lora(Dd, A), "att.time_faaaa": draw.uniform(-1, 1, H, N), **proj,
                  "att.gate.weight": draw.linear(A, C), **draw.layer_norm("att.ln_x", A)})
        return {**p, **random_ffn_v4(d, draw, "ffn.time_maa_k", "ffn.time_maa_r")}

    def prepare(self, p, d, i):
        p["att.u"] = p.pop("att.time_faaaa")  # [H, N]; time_decay stays raw: the LoRA is added per token
        if "att.time_state" in p:
            p["att.time_state"] = p["att.time_state"].transpose(1, 2).contiguous()
        return p

    def time_mix(self, att, xx, sx, state, carry, ops):
        S = state["S"]
        hn = att.u.shape  # (H, N)
        dx = sx - xx  # [B, T, C]
        m = torch.tanh(lerp(xx, sx, att.time_maa_x) @ att.time_maa_w1)  # [B, T, 5*Dm]
        m = m.reshape(*m.shape[:-1], 5, 1, -1) @ att.time_maa_w2  # [B, T, 5, 1, C]
        mw, mk, mv, mr, mg = m.squeeze(-2).unbind(-2)  # each [B, T, C]
        xw = xx + dx * (att.time_maa_w + mw)
        xk = xx + dx * (att.time_maa_k + mk)
        xv = xx + dx * (att.time_maa_v + mv)
        xr = xx + dx * (att.time_maa_r + mr)
        xg = xx + dx * (att.time_maa_g + mg)
        r = heads(F.linear(xr, att.receptance.weight).to(S.dtype), hn)  # [B, T, H, N]
        k = heads(F.linear(xk, att.key.weight).to(S.dtype), hn)
        v = heads(F.linear(xv, att.value.weight).to(S.dtype), hn)
        g = F.silu(F.linear(xg, att.gate.weight))  # [B, T, A]
        wl = att.time_decay + (torch.tanh(xw @ att.time_decay_w1) @ att.time_decay_w2).to(S.dtype)  # [B, T, A]
        w = heads(torch.exp(-torch.exp(wl)), hn)  # [B, T, H, N], decay per token and channel
        y, S = attend_v5(att, r, k, v, w, S, xx.dtype, ops)
        return F.linear(y * g, att.output.weight), {"S": S}, carry

    def channel_mix(self, ffn, xx, sx):
        r = torch.sigmoid(F.linear(lerp(xx, sx, ffn.time_maa_r), ffn.receptance.weight))  # [B, T, C]
        k = relu_sq(F.linear(lerp(xx, sx, ffn.time_maa_k), ffn.key.weight))  # [B, T, F]
        return r * F.linear(k, ffn.value.weight)
