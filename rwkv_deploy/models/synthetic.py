"""Tiny random checkpoints with BlinkDL keys, for tests and the demo (no downloaded weights anywhere).

Values are drawn in the ranges trained models have (spec §3): decays spread over fast and slow channels,
mixing coefficients in (0, 1), projections scaled by 1/sqrt(fan_in), LayerNorm weights around 1.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

ALL_VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7")


def make_checkpoint(version: str, n_layer: int = 2, n_embd: int = 64, head_size: int = 16, vocab_size: int = 97,
                    dtype: torch.dtype = torch.float32, time_state: bool = False, seed: int = 0) -> dict[str, Tensor]:
    if version not in ALL_VERSIONS:
        raise ValueError(f"unknown RWKV version {version!r}; expected one of {ALL_VERSIONS}")
    g = torch.Generator().manual_seed(seed)
    C, A = n_embd, n_embd
    H, N = A // head_size, head_size
    F_ = 4 * C if version in ("4", "7") else int(3.5 * C) // 32 * 32

    def U(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    def lin(out, inp, scale=1.0):  # Linear weight [out, in]
        return torch.randn(out, inp, generator=g) * scale / inp ** 0.5

    def lora(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def ln(prefix, n):
        return {f"{prefix}.weight": U(0.5, 1.5, n), f"{prefix}.bias": U(-0.2, 0.2, n)}

    sd = {"emb.weight": torch.randn(vocab_size, C, generator=g) * 0.5, **ln("blocks.0.ln0", C),
          **ln("ln_out", C), "head.weight": lin(vocab_size, C, 2.0)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        p = {**ln("ln1", C), **ln("ln2", C)}
        proj = {"att.receptance.weight": lin(A, C), "att.key.weight": lin(A, C), "att.value.weight": lin(A, C),
                "att.output.weight": lin(C, A, 0.5)}
        if version == "4":
            p.update({f"att.time_mix_{x}": U(0, 1, 1, 1, C) for x in "kvr"})
            p.update({"att.time_decay": U(-5, 2, A), "att.time_first": U(-2, 0.5, A), **proj})
        elif version.startswith("5"):
            hw = (H, N) if version == "5.2" else (H,)
            p.update({f"att.time_mix_{x}": U(0, 1, 1, 1, C) for x in "kvr"})
            p.update({"att.time_decay": U(-6, 1, *hw), **proj, **ln("att.ln_x", A)})
            # 5.0 files carry time_first (exp'd at load); 5.1/5.2 carry time_faaaa (used as is)
            p["att.time_first" if version == "5.0" else "att.time_faaaa"] = U(-1, 1, *hw)
            if version != "5.0":
                p.update({"att.time_mix_g": U(0, 1, 1, 1, C), "att.gate.weight": lin(A, C)})
        elif version == "6":
            Dm, Dd = 8, 16
            p.update({f"att.time_maa_{x}": U(0, 1, 1, 1, C) for x in "xwkvrg"})
            p.update({"att.time_maa_w1": lora(C, 5 * Dm), "att.time_maa_w2": lora(5, Dm, C),
                      "att.time_decay": U(-6, 1, 1, 1, A), "att.time_decay_w1": lora(C, Dd),
                      "att.time_decay_w2": lora(Dd, A), "att.time_faaaa": U(-1, 1, H, N), **proj,
                      "att.gate.weight": lin(A, C), **ln("att.ln_x", A)})
        else:  # 7
            Dw, Da, Dv, Dg = 16, 16, 8, 32
            p.update({f"att.x_{x}": U(0, 1, 1, 1, C) for x in "rwkvag"})
            p.update({"att.w0": U(-5, 2, 1, 1, C), "att.w1": lora(C, Dw), "att.w2": lora(Dw, C),
                      "att.a0": U(-1, 1, 1, 1, C), "att.a1": lora(C, Da), "att.a2": lora(Da, C),
                      "att.v0": U(-1, 1, 1, 1, C), "att.v1": lora(C, Dv), "att.v2": lora(Dv, C),
                      "att.g1": lora(C, Dg), "att.g2": torch.randn(Dg, C, generator=g) / Dg ** 0.5,
                      "att.k_k": U(0.5, 1, 1, 1, C), "att.k_a": U(0.5, 1.5, 1, 1, C),
                      "att.r_k": torch.randn(H, N, generator=g) * 0.2, **proj, **ln("att.ln_x", C)})
        if version == "7":
            p.update({"ffn.x_k": U(0, 1, 1, 1, C), "ffn.key.weight": lin(F_, C), "ffn.value.weight": lin(C, F_, 0.5)})
        else:
            mk, mr = ("ffn.time_maa_k", "ffn.time_maa_r") if version == "6" else ("ffn.time_mix_k", "ffn.time_mix_r")
            p.update({mk: U(0, 1, 1, 1, C), mr: U(0, 1, 1, 1, C), "ffn.key.weight": lin(F_, C),
                      "ffn.receptance.weight": lin(C, C), "ffn.value.weight": lin(C, F_, 0.5)})
        if time_state:
            if not version.startswith(("5", "6")):
                raise ValueError("time_state exists only in v5/v6 checkpoints")
            p["att.time_state"] = torch.randn(H, N, N, generator=g) * 0.5  # [H, value, key] as trained
        sd.update({b + k: t for k, t in p.items()})
    return {k: t.to(dtype).contiguous() for k, t in sd.items()}


def corrupt_matrix(sd: dict[str, Tensor], key: str, fraction: float = 0.01, seed: int = 1) -> dict[str, Tensor]:
    """A copy of `sd` with `fraction` of `key`'s entries replaced by fresh values of the same scale: the damage a
    parity certificate must catch (a bad conversion, a flipped block of a file)."""
    t = sd[key].clone()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(t.numel(), generator=g)[: max(1, int(t.numel() * fraction))]
    t.view(-1)[idx] = (torch.randn(len(idx), generator=g) * t.float().std()).to(t.dtype)
    return {**sd, key: t}


def save_checkpoint(sd: dict[str, Tensor], path) -> None:
    """As .pth (torch.save) or, by suffix, .safetensors; written to a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
