"""The PyTorch reference model, one class for every version; the version module supplies what differs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RWKVDeployError, check_batch
from .checkpoint import Checkpoint, load_checkpoint
from .common import Dims, Params, StateKind, layer_norm
from .versions import VERSIONS
from .wkv import PORTABLE, PORTABLE_STEP

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class StateTensor:
    """One entry of the state table: layer i's tensor of one kind. Drives ONNX names, inits, clients."""

    layer: int
    kind: StateKind
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"state.{self.layer}.{self.kind.name}"

    @property
    def shape(self) -> tuple[int, ...]:  # without the batch dim
        return self.kind.shape

    @property
    def nbytes(self) -> int:  # per batch row
        return int(torch.tensor(self.shape).prod()) * torch.finfo(self.dtype).bits // 8


def state_kinds(d: Dims) -> list[StateKind]:
    """Per layer, in [PKG] order: att_x, the version's WKV state, ffn_x (token-shift vectors are activations)."""
    shift = (d.n_embd,)
    return [StateKind("att_x", shift, fp32=False), *VERSIONS[d.version].wkv_state(d),
            StateKind("ffn_x", shift, fp32=False)]


def state_table(d: Dims, dtype: torch.dtype = torch.float32) -> list[StateTensor]:
    island = torch.float32 if dtype == torch.float16 else dtype  # fp32 islands of an fp16 model (spec §8.2)
    return [StateTensor(i, k, island if k.fp32 else dtype) for i in range(d.n_layer) for k in state_kinds(d)]


class RWKV(nn.Module):
    """`step(tokens [B], state) -> (logits [B, V], state)` and `forward(tokens [B, T], state)`.

    dtype float32/float64 is the reference; float16 keeps the WKV state, decays and GroupNorm in float32 and,
    for v4-v6, halves the residual stream every `rescale_every` layers (default: the checkpoint's own runtime
    convention, i.e. an HF folder's config value, else 6 in fp16 and off otherwise).
    """

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32, rescale_every: int | None = None,
                 wkv: str = "portable"):
        super().__init__()
        if wkv not in ("portable", "fused"):
            raise RWKVDeployError(f"unknown wkv mode {wkv!r}; expected portable or fused")
        if wkv == "fused":
            from ..custom_ops.torch_ops import FUSED as ops
        else:
            ops = PORTABLE
        self.wkv, self.wkv_ops = wkv, ops
        self.step_ops = PORTABLE_STEP if wkv == "portable" else ops  # a fused operator takes any T
        d = ckpt.dims
        V = VERSIONS[d.version]
        self.dims, self.version, self.dtype = d, V, dtype
        if rescale_every is None:
            rescale_every = ckpt.rescale_every or (6 if dtype == torch.float16 else 0)
        self.rescale_every = rescale_every if V.rescalable else 0
        self.states = state_table(d, dtype)
        self.kinds = [k.name for k in state_kinds(d)]  # per layer: att_x, <wkv state>, ffn_x
        work = torch.float64 if dtype == torch.float64 else torch.float32  # load-time maths
        w = ckpt.weights
        emb, ln0w, ln0b = w["emb.weight"], w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"]
        # ln0 is folded into the table (spec §1). v4-v6: in the storage dtype, then upcast, as the official
        # package does even for fp32 strategies; v7: in float32, as RWKV_x070 does (spec §8.4).
        fold = emb.dtype if V.ln0_in_storage_dtype else work
        emb = F.layer_norm(emb.to(fold), (d.n_embd,), ln0w.to(fold), ln0b.to(fold), 1e-5)
        self.register_buffer("emb", emb.to(dtype))  # [V, C]
        blocks = []
        for i in range(d.n_layer):
            pre = f"blocks.{i}."
            p = {k[len(pre):]: t.to(work) for k, t in w.items() if k.startswith(pre) and ".ln0." not in k}
            p = V.prepare(p, d, i)
            if self.rescale_every:
                scale = 2 ** (i // self.rescale_every)
                p["att.output.weight"] = p["att.output.weight"] / scale
                p["ffn.value.weight"] = p["ffn.value.weight"] / scale
            keep32 = V.fp32_keys | {"att.time_state"} if dtype == torch.float16 else frozenset()
            blocks.append(Params({k: t.to(torch.float32 if k in keep32 else dtype) for k, t in p.items()}))
        self.blocks = nn.ModuleList(blocks)
        self.ln_out = Params({"weight": w["ln_out.weight"].to(dtype), "bias": w["ln_out.bias"].to(dtype)})
        self.register_buffer("head", w["head.weight"].to(dtype))  # [V, C]

    def init_state(self, batch: int = 1) -> list[Tensor]:
        """The initial state on the model's device (zeros, v4 pp = -1e30, or the tuned time_state)."""
        batch = check_batch(batch)
        out = []
        for s in self.states:
            init = self.version.initial_wkv_state(self.blocks[s.layer], s.kind) if s.kind.name == "S" else None
            if init is not None:
                out.append(init.to(s.dtype).expand(batch, *s.shape).clone())
            else:
                out.append(torch.full((batch, *s.shape), s.kind.init, dtype=s.dtype, device=self.emb.device))
        return out

    def check_state(self, state: list[Tensor], batch: int) -> None:
        if len(state) != len(self.states):
            raise RWKVDeployError(f"state has {len(state)} tensors, expected {len(self.states)}")
        for s, t in zip(self.states, state):
            if tuple(t.shape) != (batch, *s.shape) or t.dtype != s.dtype:
                raise RWKVDeployError(f"{s.name}: expected {s.dtype} {[batch, *s.shape]}, got {t.dtype} {list(t.shape)}")

    def forward(self, tokens: Tensor, state: list[Tensor], last_only: bool = False, single_step: bool = False
                ) -> tuple[Tensor, list[Tensor]]:
        """tokens [B, T] int64 -> logits [B, T, V] ([B, 1, V] if last_only) and the state after the last token.

        Logits are float32, or float64 for a float64 model. single_step (T = 1) runs the recurrence's cell
        instead of its sequence form: chosen here, not from T inside the recurrence, so that tracing never bakes
        a shape test into a graph."""
        ops = self.step_ops if single_step else self.wkv_ops
        kinds = self.kinds
        x = self.emb[tokens]  # [B, T, C]
        carry, new = None, []
        for i, blk in enumerate(self.blocks):
            st = dict(zip(kinds, state[i * len(kinds):(i + 1) * len(kinds)]))
            xx = layer_norm(x, blk.ln1)  # [B, T, C]
            sx = torch.cat([st["att_x"].unsqueeze(1), xx[:, :-1]], 1)  # token shift: previous normalised input
            out, wkv_state, carry = self.version.time_mix(blk.att, xx, sx, st, carry, ops)
            x = x + out
            xf = layer_norm(x, blk.ln2)  # [B, T, C]
            sf = torch.cat([st["ffn_x"].unsqueeze(1), xf[:, :-1]], 1)
            x = x + self.version.channel_mix(blk.ffn, xf, sf)
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2  # keeps fp16 from overflowing; weights were pre-divided to match (spec §8.1)
            new += [xx[:, -1], *(wkv_state[k] for k in kinds[1:-1]), xf[:, -1]]
        if last_only:
            x = x[:, -1:]  # [B, 1, C]: a prompt needs only its last position's logits
        logits = F.linear(layer_norm(x, self.ln_out), self.head)  # [B, T, V]
        return (logits if logits.dtype == torch.float64 else logits.float()), new

    def step(self, tokens: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """tokens [B] int64 -> logits [B, V] float32 and the new state."""
        logits, state = self.forward(tokens[:, None], state, single_step=True)
        return logits[:, 0], state


def load_model(source, dtype: str | torch.dtype = "float32", **kw) -> RWKV:
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    return RWKV(ckpt, DTYPES[dtype] if isinstance(dtype, str) else dtype, **kw).eval()
