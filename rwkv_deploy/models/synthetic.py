"""Tiny random checkpoints with BlinkDL keys, for tests and the demo (no downloaded weights anywhere).

Values are drawn in the ranges trained models have (spec §3): decays spread over fast and slow channels,
mixing coefficients in (0, 1), projections scaled by 1/sqrt(fan_in), LayerNorm weights around 1.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .common import Dims
from .versions import VERSIONS

ALL_VERSIONS = tuple(VERSIONS)  # every registered version can be made: each draws its own layers


class Draw:
    """Random tensors in the ranges trained models have, all from one generator: the order of the calls fixes
    the values, so a version module must not reorder its draws (tests/test_synthetic.py pins them)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g)

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g)

    def mix(self, n: int) -> Tensor:
        """A token-shift coefficient in (0, 1), stored [1, 1, n] as trained."""
        return self.uniform(0, 1, 1, 1, n)

    def linear(self, out: int, inp: int, scale: float = 1.0) -> Tensor:
        """A Linear weight [out, in] with std scale / sqrt(fan_in)."""
        return self.normal(out, inp) * scale / inp ** 0.5

    def lora(self, *shape: int) -> Tensor:
        return self.normal(*shape) * 0.1

    def layer_norm(self, prefix: str, n: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": self.uniform(0.5, 1.5, n), f"{prefix}.bias": self.uniform(-0.2, 0.2, n)}


def make_checkpoint(version: str, n_layer: int = 2, n_embd: int = 64, head_size: int = 16, vocab_size: int = 97,
                    dtype: torch.dtype = torch.float32, time_state: bool = False, seed: int = 0,
                    released_lora: bool = False) -> dict[str, Tensor]:
    """A BlinkDL state dict of `version` with random weights; time_state adds a tuned initial state (v5/v6);
    released_lora: LoRA widths as released models of this width have them (else small ones, for tests)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown RWKV version {version!r}; expected one of {ALL_VERSIONS}")
    V = VERSIONS[version]
    C = A = n_embd
    d = Dims(version, n_layer, C, A, V.released_dim_ffn(C), A // head_size, head_size, vocab_size,
             V.released_lora(C) if released_lora else dict(V.random_lora))
    draw = Draw(seed)
    sd = {"emb.weight": draw.normal(vocab_size, C) * 0.5, **draw.layer_norm("blocks.0.ln0", C),
          **draw.layer_norm("ln_out", C), "head.weight": draw.linear(vocab_size, C, 2.0)}
    for i in range(n_layer):
        p = {**draw.layer_norm("ln1", C), **draw.layer_norm("ln2", C), **V.random_layer(d, draw)}
        if time_state:
            shape = V.optional_shapes(d, i).get("att.time_state")
            if shape is None:
                raise ValueError(f"RWKV-{version} checkpoints carry no att.time_state (a tuned initial state)")
            p["att.time_state"] = draw.normal(*shape) * 0.5  # [H, value, key] as trained
        sd.update({f"blocks.{i}.{k}": t for k, t in p.items()})
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
