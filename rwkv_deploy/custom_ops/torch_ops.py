"""The rwkv ONNX domain on the PyTorch side: torch custom ops whose eager body is models/wkv.py (the Python
reference of each operator), ONNX symbolics that emit one rwkv::WKV* node per call, and ONNX schemas.

On CUDA tensors the ops run the kernels of cuda/wkv_kernels.cu instead (compiled with nvcc on first use): the
launchers the ONNX Runtime CUDA-provider op calls, so `RWKV(..., wkv="fused")` on a GPU exercises them."""
from __future__ import annotations

import ctypes
import logging

import torch
from torch import Tensor

from ..errors import RWKVDeployError
from ..models.wkv import WKVOps, run_wkv4, run_wkv5, run_wkv7, step_wkv4, step_wkv5, step_wkv7

log = logging.getLogger(__name__)

DOMAIN, OPSET = "rwkv", 1


def _eager4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, (aa, bb, pp) = (step_wkv4 if k.shape[1] == 1 else run_wkv4)(w, u, k, v, aa, bb, pp)  # eager: never traced
    return y, aa.clone(), bb.clone(), pp.clone()  # custom ops may not return views of their inputs


def _eager5(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    y, S = (step_wkv5 if r.shape[1] == 1 else run_wkv5)(r, k, v, w, u, S)
    return y, S.clone()


def _eager7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    y, S = (step_wkv7 if r.shape[1] == 1 else run_wkv7)(r, w, k, v, a, b, S)
    return y, S.clone()


wkv4_op = torch.library.custom_op("rwkv::wkv4", _eager4, mutates_args=())
wkv5_op = torch.library.custom_op("rwkv::wkv5", _eager5, mutates_args=())
wkv7_op = torch.library.custom_op("rwkv::wkv7", _eager7, mutates_args=())


CUDA_HEAD_SIZES = (16, 32, 64, 128)  # the head sizes wkv_kernels.cu instantiates
_cuda_lib: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable


def _launch(name: str, dims: tuple[int, ...], ins: list[Tensor], outs: list[Tensor]) -> bool:
    """Run launcher `name` of the CUDA library on fp32 device tensors; False where the library cannot be built."""
    global _cuda_lib
    if _cuda_lib is None:
        from .build import build_cuda_library

        try:
            _cuda_lib = ctypes.CDLL(str(build_cuda_library()))
        except RWKVDeployError as e:
            log.warning("CUDA WKV kernels unavailable, using the PyTorch recurrence on the GPU: %s", e)
            _cuda_lib = False
    if not _cuda_lib:
        return False
    ins = [t.contiguous() for t in ins]  # e.g. v5.0-5.2's per-channel decay arrives broadcast over [B, T]
    with torch.cuda.device(ins[0].device):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        rc = getattr(_cuda_lib, name)(*dims, *(ctypes.c_void_p(t.data_ptr()) for t in ins + outs), stream)
    if rc:
        raise RuntimeError(f"{name} failed with CUDA error {rc}")
    return True


def _on_cuda(op, launcher: str, eager, shapes) -> None:
    """Register `op` for CUDA tensors: the kernel where it covers the inputs (fp32, a head size it was built for),
    else the eager body. shapes(*inputs) -> (launcher dims, output shapes, whether the kernel covers them)."""

    def kernel(*ins: Tensor):
        dims, out_shapes, covered = shapes(*ins)
        if covered and all(t.dtype == torch.float32 for t in ins):
            outs = [torch.empty(s, device=ins[0].device) for s in out_shapes]
            if _launch(launcher, dims, list(ins), outs):
                return tuple(outs)
        return eager(*ins)

    op.register_kernel("cuda")(kernel)


def _v4_shapes(w, u, k, *_):
    B, T, A = k.shape
    return (B, T, A), [(B, T, A), (B, A), (B, A), (B, A)], True


def _head_shapes(r, *_):  # wkv5 and wkv7: r first, [B, T, H, N]
    B, T, H, N = r.shape
    return (B, T, H, N), [(B, T, H, N), (B, H, N, N)], N in CUDA_HEAD_SIZES


_on_cuda(wkv4_op, "rwkv_wkv4_cuda", _eager4, _v4_shapes)
_on_cuda(wkv5_op, "rwkv_wkv5_cuda", _eager5, _head_shapes)
_on_cuda(wkv7_op, "rwkv_wkv7_cuda", _eager7, _head_shapes)


@wkv4_op.register_fake
def _(w, u, k, v, aa, bb, pp):
    return torch.empty_like(k), torch.empty_like(aa), torch.empty_like(bb), torch.empty_like(pp)


@wkv5_op.register_fake
def _(r, k, v, w, u, S):
    return torch.empty_like(r), torch.empty_like(S)


@wkv7_op.register_fake
def _(r, w, k, v, a, b, S):
    return torch.empty_like(r), torch.empty_like(S)


def _fused4(w, u, k, v, aa, bb, pp):
    y, aa, bb, pp = wkv4_op(w, u, k, v, aa, bb, pp)
    return y, (aa, bb, pp)


FUSED = WKVOps(_fused4, wkv5_op, wkv7_op)


def _symbolic(op_type: str, n_out: int, like: list[int]):
    """ONNX node rwkv::<op_type>; output i has the type of input like[i]."""

    def symbolic(g, *inputs):
        outs = g.op(f"{DOMAIN}::{op_type}", *inputs, outputs=n_out)
        for o, i in zip(outs, like):
            o.setType(inputs[i].type())
        return outs

    return symbolic


SYMBOLICS = {"rwkv::wkv4": _symbolic("WKV4", 4, [2, 4, 5, 6]), "rwkv::wkv5": _symbolic("WKV5", 2, [0, 5]),
             "rwkv::wkv7": _symbolic("WKV7", 2, [0, 6])}

# name -> (inputs, outputs), as the C++ library (custom_ops/cpu/wkv_ops.cc) implements them
SIGNATURES = {
    "WKV4": (["w", "u", "k", "v", "aa", "bb", "pp"], ["y", "aa_out", "bb_out", "pp_out"]),
    "WKV5": (["r", "k", "v", "w", "u", "S"], ["y", "S_out"]),
    "WKV7": (["r", "w", "k", "v", "a", "b", "S"], ["y", "S_out"]),
}


# fused int8/int4 exports' products y = x W, W as q and scale (models/quant.py; int4: two a byte) -> q's type
QUANTIZED_PRODUCTS = {"MatMulQ8": "tensor(int8)", "MatMulQ4": "tensor(uint8)"}


def register_for_export() -> None:
    """TorchScript-exporter symbolics and ONNX schemas (so onnx.checker knows the rwkv domain)."""
    import onnx

    P = onnx.defs.OpSchema.FormalParameter
    if not onnx.defs.has("MatMulF16", DOMAIN):
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "MatMulF16", DOMAIN, OPSET, doc="y = x W, float16 in and out, float32 sums, W stored in tiles of 64 "
            "columns; see custom_ops/cpu/wkv_ops.cc", inputs=[P("x", "T"), P("w", "T")], outputs=[P("y", "T")],
            type_constraints=[("T", ["tensor(float16)"], "float16")],
            attributes=[onnx.defs.OpSchema.Attribute("n", onnx.defs.OpSchema.AttrType.INT, "y's columns")]))
    for op, q in QUANTIZED_PRODUCTS.items():
        if not onnx.defs.has(op, DOMAIN):
            onnx.defs.register_schema(onnx.defs.OpSchema(
                op, DOMAIN, OPSET, doc=f"y = x W with W blockwise-quantized ({op}; q in [-127, 127], int4 [-8, 7]), stored "
                "in tiles of 64 columns; see custom_ops/cpu/wkv_ops.cc", inputs=[P("x", "T"), P("q", "Q"), P("scale", "T")],
                outputs=[P("y", "T")],
                type_constraints=[("T", ["tensor(float)"], "float32"), ("Q", [q], "the stored integers")],
                attributes=[onnx.defs.OpSchema.Attribute("n", onnx.defs.OpSchema.AttrType.INT, "y's columns")]))

    for name, fn in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
    for op, (ins, outs) in SIGNATURES.items():
        if onnx.defs.has(op, DOMAIN):
            continue
        schema = onnx.defs.OpSchema(
            op, DOMAIN, OPSET, doc=f"RWKV WKV recurrence ({op}); see rwkv_deploy/models/wkv.py",
            inputs=[P(n, "T") for n in ins], outputs=[P(n, "T") for n in outs],
            type_constraints=[("T", ["tensor(float)"], "WKV runs in float32 in every precision")])
        onnx.defs.register_schema(schema)
