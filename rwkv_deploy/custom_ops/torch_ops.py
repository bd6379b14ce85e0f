"""The rwkv ONNX domain on the PyTorch side: torch custom ops whose eager body is models/wkv.py (the Python
reference of each operator), ONNX symbolics that emit one rwkv::WKV* node per call, and ONNX schemas."""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.wkv import WKVOps, run_wkv4, run_wkv5, run_wkv7

DOMAIN, OPSET = "rwkv", 1


@torch.library.custom_op("rwkv::wkv4", mutates_args=())
def wkv4_op(w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, (aa, bb, pp) = run_wkv4(w, u, k, v, aa, bb, pp)
    return y, aa.clone(), bb.clone(), pp.clone()


@torch.library.custom_op("rwkv::wkv5", mutates_args=())
def wkv5_op(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    y, S = run_wkv5(r, k, v, w, u, S)
    return y, S.clone()


@torch.library.custom_op("rwkv::wkv7", mutates_args=())
def wkv7_op(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    y, S = run_wkv7(r, w, k, v, a, b, S)
    return y, S.clone()


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


def register_for_export() -> None:
    """TorchScript-exporter symbolics and ONNX schemas (so onnx.checker knows the rwkv domain)."""
    import onnx

    for name, fn in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
    for op, (ins, outs) in SIGNATURES.items():
        if onnx.defs.has(op, DOMAIN):
            continue
        P = onnx.defs.OpSchema.FormalParameter
        schema = onnx.defs.OpSchema(
            op, DOMAIN, OPSET, doc=f"RWKV WKV recurrence ({op}); see rwkv_deploy/models/wkv.py",
            inputs=[P(n, "T") for n in ins], outputs=[P(n, "T") for n in outs],
            type_constraints=[("T", ["tensor(float)"], "WKV runs in float32 in every precision")])
        onnx.defs.register_schema(schema)
