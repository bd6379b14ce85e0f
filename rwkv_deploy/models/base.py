"""What every RWKV version module provides. A version states only what differs (design.md §3)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .common import Dims, Params, StateKind
from .wkv import WKVOps

if TYPE_CHECKING:
    from .synthetic import Draw

Shapes = dict[str, tuple[int, ...]]  # key suffix after `blocks.{i}.` -> canonical shape (time_* squeezed)


class Version:
    name: str = ""
    rescalable: bool = True  # halving the residual stream for fp16 (spec §8.1); v7 has none
    ln0_in_storage_dtype: bool = True  # [PKG] folds ln0 before upcasting for v4-v6, in fp32 for v7 (spec §8.4)
    fp32_keys: frozenset[str] = frozenset()  # prepared keys that stay fp32 in an fp16 model (spec §8.2)
    random_lora: dict[str, int] = {}  # LoRA widths of random checkpoints (small: tests run many of them)

    def detect(self, sd: dict[str, Tensor]) -> bool:
        """Whether the keys of `sd` carry this version's signature (spec §2). A newer version's checkpoint can
        carry an older one's keys too (v6 has v5's ln_x and gate), so versions.py tries them newest first."""
        raise NotImplementedError

    def released_lora(self, n_embd: int) -> dict[str, int]:
        """The LoRA widths released models of this width use (benchmarks read as many bytes as a real model)."""
        return dict(self.random_lora)

    def released_dim_ffn(self, n_embd: int) -> int:
        """The FFN width released models of this version use (spec §2); random checkpoints use it too."""
        return 4 * n_embd

    def read_dims(self, sd: dict[str, Tensor], d: Dims) -> None:
        """Fill head count/size and LoRA widths of `d` from the shapes of layer 0."""
        raise NotImplementedError

    def layer_shapes(self, d: Dims, i: int, present: set[str]) -> Shapes:
        """Required keys of layer i (present = the key suffixes layer i has)."""
        raise NotImplementedError

    def optional_shapes(self, d: Dims, i: int) -> Shapes:
        """Keys accepted in layer i when present."""
        return {}

    def random_layer(self, d: Dims, draw: Draw) -> dict[str, Tensor]:
        """One layer's att.* and ffn.* tensors with random values, in the shapes released files store (the
        caller draws ln1/ln2, alike for every version first). For tests and the demo (models/synthetic.py)."""
        raise NotImplementedError

    def prepare(self, p: dict[str, Tensor], d: Dims, i: int) -> dict[str, Tensor]:
        """Load-time preprocessing of one layer (spec §4); float32 or float64 in, same dtype out."""
        raise NotImplementedError

    def wkv_state(self, d: Dims) -> list[StateKind]:
        """The per-layer WKV state tensors, between att_x and ffn_x."""
        raise NotImplementedError

    def initial_wkv_state(self, p: Params, kind: StateKind) -> Tensor | None:
        """A per-layer initial value other than the fill value (state-tuned checkpoints), else None."""
        return None

    def time_mix(self, att: Params, xx: Tensor, sx: Tensor, state: dict[str, Tensor], carry, ops: WKVOps):
        """xx, sx [B, T, C] (normalised input and its shifted copy) -> (out [B, T, C], new wkv state, carry).

        `carry` passes data from layer to layer within a token (v7's v_first); it starts as None.
        `ops` is the WKV implementation to call (portable or fused).
        """
        raise NotImplementedError

    def channel_mix(self, ffn: Params, xx: Tensor, sx: Tensor) -> Tensor:
        raise NotImplementedError
