"""The PyTorch reference model, one class for every version; the version module supplies what differs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RWKVDeployError, check_batch
from .checkpoint import Checkpoint, load_checkpoint
from .common import Dims, Params, StateKind, layer_norm
from .quant import PRECISIONS
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
                 wkv: str = "portable", lazy: bool = False, quant=None):
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
        self.ckpt, self.dims, self.version, self.dtype = ckpt, d, V, dtype
        self.quant = quant  # models.quant.Quant: compute as an int8/int4 export does (models/quant.py)
        if rescale_every is None:
            rescale_every = ckpt.rescale_every or (6 if dtype == torch.float16 else 0)
        self.rescale_every = rescale_every if V.rescalable else 0
        self.states = state_table(d, dtype)
        self.kinds = [k.name for k in state_kinds(d)]  # per layer: att_x, <wkv state>, ffn_x
        self.lazy = lazy
        if not lazy:
            self.register_buffer("emb", self.embedding())  # [V, C]
        # lazy: one layer's weights at a time, prepared from the checkpoint when a block is used (a float64
        # reference of a 3B model does not fit in memory; one layer of it does)
        self.blocks = LazyBlocks(self.prepare_block, d.n_layer) if lazy else nn.ModuleList(
            Params(self.prepare_block(i)) for i in range(d.n_layer))
        self.ln_out = Params({"weight": ckpt.checked("ln_out.weight").to(dtype),
                              "bias": ckpt.checked("ln_out.bias").to(dtype)})
        if not lazy:
            self.register_buffer("head", self.head_weight())  # [V, C]

    @property
    def _work(self) -> torch.dtype:
        """The dtype of load-time maths."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def embedding(self, rows=slice(None)) -> Tensor:
        """The embedding table (those rows of it) with ln0 folded in (spec §1). v4-v6 fold in the storage dtype,
        then upcast, as the official package does even for fp32 strategies; v7 folds in float32, as RWKV_x070
        does (spec §8.4). LayerNorm is per row: a row folded alone equals that row of the folded table."""
        emb, ln0w, ln0b = (self.ckpt.checked(k) for k in ("emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"))
        fold = emb.dtype if self.version.ln0_in_storage_dtype else self._work
        if self.quant is not None and not self.version.ln0_in_storage_dtype:
            fold = torch.float32  # int8/int4 store this float32 fold in float16: float64 holds the same table
        emb = F.layer_norm(emb[rows].to(fold), (self.dims.n_embd,), ln0w.to(fold), ln0b.to(fold), 1e-5)
        return emb.to(self.dtype) if self.quant is None else self.quant.table(emb, self.dtype)

    def head_weight(self, rows=slice(None)) -> Tensor:
        head = self.ckpt.checked("head.weight")[rows]  # [V, C]
        if self.quant is not None and self.quant.applies("head", head.shape):  # blocks run along C: rows are free
            return self.quant.of("head").weight(head, self.dtype)
        return head.to(self.dtype)

    def prepare_block(self, i: int) -> dict[str, Tensor]:
        """Layer i's tensors as the model uses them: load-time preprocessing, rescaling and dtypes applied."""
        d, V, dtype, pre = self.dims, self.version, self.dtype, f"blocks.{i}."
        p = {k[len(pre):]: self.ckpt.checked(k).to(self._work) for k in self.ckpt.weights
             if k.startswith(pre) and ".ln0." not in k}
        p = V.prepare(p, d, i)
        if self.rescale_every:
            scale = 2 ** (i // self.rescale_every)
            p["att.output.weight"] = p["att.output.weight"] / scale
            p["ffn.value.weight"] = p["ffn.value.weight"] / scale
        keep32 = V.fp32_keys | {"att.time_state"} if dtype == torch.float16 else frozenset()
        q = self.quant
        return {k: q.of(k).weight(t, dtype, k) if q is not None and q.applies(k, t.shape) else
                t.to(torch.float32 if k in keep32 else dtype) for k, t in p.items()}

    def prepared_weights(self, on_layer=None):
        """(name, tensor) of every weight as the model holds it, named as its buffers are (ONNX initializers
        get these names), one layer at a time: what a streamed export writes. on_layer(i, tensors) runs after
        layer i's are yielded, while its pages are still in memory (an export replays its golden tokens then)."""
        yield "emb", self.emb if not self.lazy else self.embedding()
        for i in range(self.dims.n_layer):
            block = self.prepare_block(i)
            for k, t in block.items():
                yield f"blocks.{i}.{k}", t
            if on_layer is not None:
                on_layer(i, block)
        yield "ln_out.weight", self.ln_out.weight
        yield "ln_out.bias", self.ln_out.bias
        yield "head", self.head if not self.lazy else self.head_weight()

    def init_state(self, batch: int = 1) -> list[Tensor]:
        """The initial state on the model's device (zeros, v4 pp = -1e30, or the tuned time_state)."""
        batch = check_batch(batch)
        out = []
        for s in self.states:
            tuned = s.kind.name == "S" and f"blocks.{s.layer}.att.time_state" in self.ckpt.weights
            init = self.version.initial_wkv_state(self.blocks[s.layer], s.kind) if tuned else None
            if init is not None:
                out.append(init.to(s.dtype).expand(batch, *s.shape).clone())
            else:
                out.append(torch.full((batch, *s.shape), s.kind.init, dtype=s.dtype, device=self.ln_out.weight.device))
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
        x = self.embed(tokens)  # [B, T, C]
        carry, new, n = None, [], len(self.kinds)
        for i, blk in enumerate(self.blocks):
            x, st, carry = self.layer(i, blk, x, state[i * n:(i + 1) * n], carry, single_step)
            new += st
        if last_only:
            x = x[:, -1:]  # [B, 1, C]: a prompt needs only its last position's logits
        return self.logits(x), new

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] -> x [B, T, C]."""
        if not self.lazy:
            return self.emb[tokens]
        rows, inverse = torch.unique(tokens, return_inverse=True)
        return self.embedding(rows)[inverse]

    def layer(self, i: int, blk: Params, x: Tensor, state: list[Tensor], carry, single_step: bool = False
              ) -> tuple[Tensor, list[Tensor], object]:
        """Layer i (weights `blk`) on x [B, T, C] from its state tensors (att_x, the WKV state, ffn_x) ->
        (x, the layer's new state tensors, carry for the next layer)."""
        ops = self.step_ops if single_step else self.wkv_ops
        st = dict(zip(self.kinds, state))
        xx = layer_norm(x, blk.ln1)  # [B, T, C]
        sx = self.shift(st["att_x"], xx, single_step)  # token shift: previous normalised input
        out, wkv_state, carry = self.version.time_mix(blk.att, xx, sx, st, carry, ops)
        x = x + out
        xf = layer_norm(x, blk.ln2)  # [B, T, C]
        sf = self.shift(st["ffn_x"], xf, single_step)
        x = x + self.version.channel_mix(blk.ffn, xf, sf)
        if self.rescale_every and (i + 1) % self.rescale_every == 0:
            x = x / 2  # keeps fp16 from overflowing; weights were pre-divided to match (spec §8.1)
        return x, [xx[:, -1], *(wkv_state[k] for k in self.kinds[1:-1]), xf[:, -1]], carry

    @staticmethod
    def shift(last: Tensor, x: Tensor, single_step: bool) -> Tensor:
        """Token shift: x [B, T, C] moved one token later, `last` [B, C] (the state) first. A step graph gets the
        state alone, so T stays a static 1 there (x[:, :-1] would leave T unknown to shape inference)."""
        if single_step:
            return last.unsqueeze(1)  # [B, 1, C]
        return torch.cat([last.unsqueeze(1), x[:, :-1]], 1)  # [B, T, C]

    def logits(self, x: Tensor) -> Tensor:
        """x [B, T, C] after the last layer -> logits [B, T, V], float32 (float64 for a float64 model)."""
        return self.logits_each([x])[0]

    def logits_each(self, xs: list[Tensor]) -> list[Tensor]:
        """[self.logits(x) for x in xs], each x in its own product with the head (the same numbers as one step at
        a time: batching rows would change the rounding). A lazy model reads the head in slices, each slice once
        for all of xs: a float64 head of a World model is 1.3 GB at 2560 wide."""
        xs = [layer_norm(x, self.ln_out) for x in xs]
        if not self.lazy:
            out = [F.linear(x, self.head) for x in xs]  # [B, T, V]
        else:
            step = max(1, (64 << 20) // (torch.finfo(self.dtype).bits // 8 * self.dims.n_embd))
            parts = [[] for _ in xs]
            for a in range(0, self.dims.vocab_size, step):
                w = self.head_weight(slice(a, a + step))  # [step, C]
                for p, x in zip(parts, xs):
                    p.append(F.linear(x, w))
            out = [torch.cat(p, -1) for p in parts]  # slicing the vocabulary leaves every product as it was
        return [y if y.dtype == torch.float64 else y.float() for y in out]

    def step(self, tokens: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """tokens [B] int64 -> logits [B, V] float32 and the new state."""
        logits, state = self.forward(tokens[:, None], state, single_step=True)
        return logits[:, 0], state


class LazyBlocks:
    """The layers of a lazy RWKV: block i is prepared from the checkpoint each time it is asked for."""

    def __init__(self, build, n: int):
        self.build, self.n = build, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Params:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return Params(self.build(i))

    def __iter__(self):
        return (self[i] for i in range(self.n))


def at_precision(ckpt: Checkpoint, precision: str, exact: bool = False, quant=None, **kw) -> RWKV:
    """The reference that computes what an export at `precision` computes; exact=True: float64 with the same
    weights (exact math for that export). quant: the export's own quantization (models.quant.manifest_quant) where it
    differs from what `precision` means today."""
    if precision not in PRECISIONS:
        raise RWKVDeployError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    dtype, default = PRECISIONS[precision]
    quant = quant if quant is not None else default
    return RWKV(ckpt, torch.float64 if exact else dtype, quant=quant, **kw).eval()


def load_model(source, dtype: str | torch.dtype = "float32", **kw) -> RWKV:
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    return RWKV(ckpt, DTYPES[dtype] if isinstance(dtype, str) else dtype, **kw).eval()
