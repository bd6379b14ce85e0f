"""RWKV-7 "Goose" (spec §3, §5.4): generalised delta rule, state S [H, value, key], value residual."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Version
from .common import StateKind, group_norm_heads, lerp, relu_sq
from .v4 import random_projections
from .v5 import heads

NORMALIZE_EPS = 1e-12  # F.normalize default, as in [PKG]
DECAY_SCALE = math.exp(-0.5)  # decay = exp(-e^-0.5 * sigmoid(w)): soft-clamps log-decay to (-inf, -0.5)


class V7(Version):
    name = "7"
    rescalable = False
    ln0_in_storage_dtype = False
    fp32_keys = frozenset({"att.w0", "att.ln_x.weight", "att.ln_x.bias"})
    random_lora = {"Dw": 16, "Da": 16, "Dv": 8, "Dg": 32}

    def detect(self, sd):
        return any(f"blocks.0.att.{k}" in sd for k in ("r_k", "x_r", "w0", "k_k"))

    def released_lora(self, n_embd):
        # BlinkDL's RWKV-7 training code: 0.1B (768) has 64/64/32/128, 1.5B (2048) 96/96/64/256
        def width(x):
            return max(32, int(round(x / 32) * 32))
        return {"Dw": width(1.8 * n_embd ** 0.5), "Da": width(1.8 * n_embd ** 0.5), "Dv": width(1.3 * n_embd ** 0.5),
                "Dg": width(0.6 * n_embd ** 0.8)}

    def read_dims(self, sd, d):
        d.n_head, d.head_size = sd["blocks.0.att.r_k"].shape
        d.lora = {f"D{x}": sd[f"blocks.0.att.{x}1"].shape[1] for x in "wavg"}

    def _lora_shapes(self, d, which):
        C = d.n_embd
        return {f"att.{x}1": (C, d.lora[f"D{x}"]) for x in which} | {f"att.{x}2": (d.lora[f"D{x}"], C) for x in which}

    def layer_shapes(self, d, i, present):
        C, F_ = d.n_embd, d.dim_ffn
        s = {**{f"att.x_{x}": (C,) for x in "rwkvag"}, "att.w0": (C,), "att.a0": (C,),
             **self._lora_shapes(d, "wag"), "att.k_k": (C,), "att.k_a": (C,), "att.r_k": (d.n_head, d.head_size),
             **{f"att.{n}.weight": (C, C) for n in ("receptance", "key", "value", "output")},
             "att.ln_x.weight": (C,), "att.ln_x.bias": (C,),
             "ffn.x_k": (C,), "ffn.key.weight": (F_, C), "ffn.value.weight": (C, F_)}
        if i > 0:  # layer 0 makes v_first; the others mix it in through the v LoRA
            s.update({"att.v0": (C,), **self._lora_shapes(d, "v")})
        return s

    def optional_shapes(self, d, i):
        return {"att.v0": (d.n_embd,), **self._lora_shapes(d, "v")} if i == 0 else {}

    def random_layer(self, d, draw):
        C, F_, lora = d.n_embd, d.dim_ffn, d.lora
        proj = random_projections(d, draw)
        p = {f"att.x_{x}": draw.mix(C) for x in "rwkvag"}
        for x, lo, hi in (("w", -5, 2), ("a", -1, 1), ("v", -1, 1)):  # v0..v2 in layer 0 too, as released
            D = lora[f"D{x}"]
            p.update({f"att.{x}0": draw.uniform(lo, hi, 1, 1, C), f"att.{x}1": draw.lora(C, D),
                      f"att.{x}2": draw.lora(D, C)})
        p.update({"att.g1": draw.lora(C, lora["Dg"]), "att.g2": draw.normal(lora["Dg"], C) / lora["Dg"] ** 0.5,
                  "att.k_k": draw.uniform(0.5, 1, 1, 1, C), "att.k_a": draw.uniform(0.5, 1.5, 1, 1, C),
                  "att.r_k": draw.normal(d.n_head, d.head_size) * 0.2, **proj, **draw.layer_norm("att.ln_x", C)})
        return {**p, "ffn.x_k": draw.mix(C), "ffn.key.weight": draw.linear(F_, C),
                "ffn.value.weight": draw.linear(C, F_, 0.5)}

    def prepare(self, p, d, i):
        if i == 0:  # present in layer 0 of released files but unused ([PKG] empties them)
            for k in ("att.v0", "att.v1", "att.v2"):
                p.pop(k, None)
        return p

    def wkv_state(self, d):
        return [StateKind("S", (d.n_head, d.head_size, d.head_size))]

    def time_mix(self, att, xx, sx, state, carry, ops):
        S = state["S"]
        hn = att.r_k.shape  # (H, N)
        xr, xw, xk, xv, xa, xg = (lerp(xx, sx, mu) for mu in (att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g))
        r = F.linear(xr, att.receptance.weight)  # [B, T, C]
        k = F.linear(xk, att.key.weight)
        v = F.linear(xv, att.value.weight)
        wl = att.w0 + (torch.tanh(xw @ att.w1) @ att.w2).to(S.dtype)  # [B, T, C], fp32
        w = torch.exp(-DECAY_SCALE * torch.sigmoid(wl))  # decay in (e^-e^-0.5, 1)
        a = torch.sigmoid(att.a0 + (xa @ att.a1) @ att.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ att.g1) @ att.g2  # no sigmoid after g2
        kk = F.normalize(heads(k * att.k_k, hn), dim=-1, eps=NORMALIZE_EPS)  # [B, T, H, N]
        k = k * (1 + (a - 1) * att.k_a)
        if carry is None:
            carry = v  # layer 0: v_first, used by every later layer of this token
        else:
            v = v + (carry - v) * torch.sigmoid(att.v0 + (xv @ att.v1) @ att.v2)
        r, w, k, v, a = (heads(t.to(S.dtype), hn) for t in (r, w, k, v, a))  # [B, T, H, N] fp32
        kk = kk.to(S.dtype)
        y, S = ops.v7(r, w, k, v, -kk, kk * a, S)  # [B, T, H, N]
        y = group_norm_heads(y, att.ln_x, hn)  # [B, T, C]
        y = y + ((r * k * att.r_k).sum(-1, keepdim=True) * v).flatten(-2)  # per-head bonus for the current token
        return F.linear(y.to(xx.dtype) * g, att.output.weight), {"S": S}, carry

    def channel_mix(self, ffn, xx, sx):
        return F.linear(relu_sq(F.linear(lerp(xx, sx, ffn.x_k), ffn.key.weight)), ffn.value.weight)
