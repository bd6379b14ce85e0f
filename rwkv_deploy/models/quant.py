"""Blockwise symmetric weight quantization (int8/int4), written once: the export stores q and scale, the references
compute with dequantize(q, scale), so both hold exactly the same weights.

A weight W [out, in] is cut into blocks of `block` consecutive inputs; each block has one float32 scale
max|block| / qmax and integers q = round(W / scale) in [-qmax, qmax] (qmax 127 or 7). ONNX's blocked
DequantizeLinear (opset 21) computes q * scale in float32, as `dequantize` does here, bit for bit.

The projections of every version (att receptance/key/value/output/gate, ffn key/value/receptance) and the head are
quantized: they are nearly all of a step's bytes. LoRA factors, mixing vectors, norms and the embedding stay float.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QUANTIZED = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight", "att.gate.weight",
             "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")


@dataclass(frozen=True)
class Quant:
    bits: int  # 8 or 4
    block: int = 32  # rwkv.cpp's Q8_0/Q4_0 use 32 too

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def applies(self, key: str, shape) -> bool:
        """Whether the model weight `key` (a layer's "att.key.weight", or "head") is stored quantized."""
        return (key == "head" or key in QUANTIZED) and len(shape) == 2 and shape[1] % self.block == 0

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """w [out, in] -> (q int8 [out, in], scale float32 [out, in / block])."""
        blocks = w.float().reshape(w.shape[0], -1, self.block)  # [out, in/block, block]
        scale = blocks.abs().amax(-1) / self.qmax  # [out, in/block]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: any scale, q = 0
        q = torch.round(blocks / scale[..., None]).clamp(-self.qmax, self.qmax).to(torch.int8)
        return q.reshape(w.shape), scale

    def dequantize(self, q: Tensor, scale: Tensor) -> Tensor:
        """float32 q * scale, as DequantizeLinear computes it."""
        return (q.reshape(q.shape[0], -1, self.block).float() * scale[..., None]).reshape(q.shape)

    def round_trip(self, w: Tensor) -> Tensor:
        """The float32 weight the export computes with."""
        return self.dequantize(*self.quantize(w))


QUANTS = {"int8": Quant(8), "int4": Quant(4)}
