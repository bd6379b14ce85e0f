"""Blockwise symmetric weight quantization (int8/int4), written once: the export stores q and scale, the references
compute with dequantize(q, scale), so both hold exactly the same weights.

A weight W [out, in] is cut into blocks of `block` consecutive inputs; each block has one float32 scale
max|block| / qmax and integers q = round(W / scale) in [-qmax, qmax] (qmax 127 or 7). ONNX's blocked
DequantizeLinear (opset 21) computes q * scale in float32, as `dequantize` does here, bit for bit.

ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, whose CPU kernel by default (accuracy level 4) also
rounds each product's input to int8 per block of 32, as rwkv.cpp's Q8_0/Q4_0 do: without that, 8-bit products have
no fast kernel (~10x slower than float32). That rounding is part of what these exports compute, so the reference
at their precision does it too (`Int8Input`); the float64 model (exact math) computes with the same dequantized
weights and exact inputs.

The projections of every version (att receptance/key/value/output/gate, ffn key/value/receptance) and the head are
quantized: they are nearly all of a step's bytes. int4 exports keep the head at int8 (`Quant.head_bits`). RWKV-7's
LoRA factors (w1/w2, a1/a2, v1/v2, g1/g2) are int8 in both (`Quant.lora_bits`): float32, they were a quarter of a
169M int4 step's bytes. The embedding is stored in float16; mixing vectors and norms stay float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QUANTIZED = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight", "att.gate.weight",
             "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")
# RWKV-7's LoRA factors: products x @ W, so W is [in, out] (the projections above are F.linear's [out, in])
LORA = ("att.w1", "att.w2", "att.a1", "att.a2", "att.v1", "att.v2", "att.g1", "att.g2")
# how quantization.method names the form rwkv::MatMulQ8/Q4 read; exports from before it stored DequantizeLinear's rows
TILED_FORM = "rwkv::MatMulQ8/MatMulQ4, tiles of 64 columns"


@dataclass(frozen=True)
class Quant:
    bits: int  # 8 or 4
    block: int = 32  # rwkv.cpp's Q8_0/Q4_0 use 32 too
    # int4 keeps the head at 8 bits, as llama.cpp's 4-bit types keep the output matrix at 6: its error lands on the
    # logits directly (a trained 4x256 v7's top-1 agreement with fp32 over held-out text: 93 % with an int4 head,
    # 95-96 % with int8; bench/trained_agreement.py, docs/precision.md)
    head_bits: int | None = None
    # RWKV-7's LoRA factors, None: float32 (exports written before they were quantized). int8 even in int4 exports:
    # the decay's LoRA lands in exp(-exp(.)), and at int8 they cost 1.1 bytes a weight instead of 4
    lora_bits: int | None = None

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def applies(self, key: str, shape) -> bool:
        """Whether the model weight `key` (a layer's "att.key.weight", or "head") is stored quantized."""
        if key in LORA:
            return self.lora_bits is not None and len(shape) == 2 and shape[0] % self.block == 0
        return (key == "head" or key in QUANTIZED) and len(shape) == 2 and shape[1] % self.block == 0

    def of(self, key: str) -> "Quant":
        """How the weight `key` is quantized (the head and LoRA factors may take more bits than the projections)."""
        bits = self.head_bits if key == "head" else self.lora_bits if key in LORA else None
        return Quant(bits, self.block) if bits else self

    def describe(self, lora: bool = True, kernels: bool = False) -> str:
        """The manifest's quantization.method; lora: whether the export has LoRA factors it quantized; kernels:
        whether its products are rwkv::MatMulQ8/MatMulQ4 (weights in their tiles) rather than DequantizeLinear."""
        head = f", the head int{self.head_bits}" if self.head_bits and self.head_bits != self.bits else ""
        factors = f", LoRA factors int{self.lora_bits}" if self.lora_bits and lora else ""
        form = TILED_FORM if kernels else "DequantizeLinear, opset 21"
        return f"blockwise symmetric int{self.bits}{head}{factors} ({form})"

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

    @staticmethod
    def table(emb: Tensor, dtype: torch.dtype) -> Tensor:
        """The embedding as these exports store it: float16 (a step reads one row, so quantizing it would save
        bytes on disk only; float16 halves them exactly and every runtime reads it)."""
        return emb.to(torch.float16).to(dtype)

    def weight(self, w: Tensor, dtype: torch.dtype, key: str = "") -> Tensor:
        """w as a model at `dtype` holds it: dequantized; below float64 also rounding its inputs (Int8Input).
        A LoRA factor (`key` in LORA) is [in, out]: its blocks run along dim 0."""
        w = (self.round_trip(w.T).T if key in LORA else self.round_trip(w)).to(dtype)
        return w if dtype == torch.float64 else Int8Input.wrap(w, self.block)


def int8_blocks(x: Tensor, block: int) -> Tensor:
    """x [..., K] rounded to symmetric int8 per block of `block` along K (scale max|block| / 127) and back."""
    b = x.reshape(*x.shape[:-1], -1, block)  # [..., K/block, block]
    scale = b.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(b / scale) * scale).reshape(x.shape)


MATMULS = (torch.nn.functional.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__)  # x @ W, F.linear(x, W)
MOVES = (Tensor.to, Tensor.cuda, Tensor.cpu)  # a model moved to a device keeps computing as the export does


class Int8Input(Tensor):
    """A dequantized weight whose F.linear first rounds its input with int8_blocks, as ONNX Runtime's MatMulNBits
    does at its default accuracy level. Moving it (.to(device), .cuda(), .cpu(), so nn.Module.to too) keeps the
    wrapper; every other op sees a plain tensor and returns one."""

    block: int

    @staticmethod
    def wrap(w: Tensor, block: int) -> Tensor:
        w = w.as_subclass(Int8Input)
        w.block = block
        return w

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func in MATMULS and len(args) > 1 and isinstance(args[1], Int8Input):  # x W or F.linear(x, W)
                x, w = args[0], args[1]
                return func(int8_blocks(x, w.block), w.as_subclass(Tensor), *args[2:], **kwargs)
            out = func(*args, **kwargs)
        if func in MOVES and isinstance(args[0], Int8Input) and out.dtype == args[0].dtype:
            return Int8Input.wrap(out, args[0].block)
        return out


QUANTS = {"int8": Quant(8, lora_bits=8), "int4": Quant(4, head_bits=8, lora_bits=8)}

# an export's precision -> (the dtype it computes in, its weight quantization or None)
PRECISIONS = {"fp32": (torch.float32, None), "fp16": (torch.float16, None),
              "int8": (torch.float32, QUANTS["int8"]), "int4": (torch.float32, QUANTS["int4"])}


def manifest_quant(m) -> Quant | None:
    """The Quant an export was written with, from its manifest: an int4 export from before the head was kept at
    int8 has no quantization.head_bits, and its head is int4; one from before the LoRA factors were quantized has
    no quantization.lora_bits, and they are float32 (verify holds each export to its own weights)."""
    q, base = m.get("quantization"), PRECISIONS[m["precision"]][1]
    if not q or base is None:
        return None
    return Quant(base.bits, q.get("block_size", base.block), q.get("head_bits", base.bits), q.get("lora_bits"))
