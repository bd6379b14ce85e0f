"""The token-at-a-time loop, written once: every comparison of step-by-step logits runs through `stepwise`."""
from __future__ import annotations

import numpy as np


def stepwise(model, tokens, state=None):
    """Feed tokens [B, T] one position at a time, `model.step(tokens[:, t], state)`, from `state` (default: the
    model's initial state). Returns the logits [B, T, V] as float64 numpy and the final state.

    `model` is anything with init_state(batch) and step(tokens [B], state) -> (logits [B, V], state): our torch
    reference (pass torch tokens), an ONNX Runtime session (numpy tokens), the official package (OfficialModel).
    """
    if state is None:
        state = model.init_state(len(tokens))
    rows = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        rows.append(_float64(logits))
    return np.stack(rows, 1), state


def replay_layers(model, tokens, state=None) -> LayerReplay:
    """`stepwise(model, tokens, state)` for our torch reference, computed layer by layer (`.result()` gives what
    stepwise returns, `.top1()` only the top tokens): layer i runs every token (one at a time, its state carried)
    before layer i+1 starts, so a lazy model (RWKV(..., lazy=True)) prepares each layer's weights once and holds one
    layer at a time. The same per-token arithmetic as model.step, so the same numbers."""
    replay = LayerReplay(model, tokens, state)
    for i, blk in enumerate(model.blocks):
        replay.layer(i, blk)
    return replay


class LayerReplay:
    """replay_layers with the caller handing over each layer's weights, in order: `layer(i, blk)` for i = 0..L-1,
    then `result()`. An export feeds it the layers it is writing, so the checkpoint is read once."""

    def __init__(self, model, tokens, state=None):
        import torch

        self.model, self.torch, self.n = model, torch, len(model.kinds)
        B, T = tokens.shape
        self.state = model.init_state(B) if state is None else state
        with torch.no_grad():
            self.xs = [model.embed(tokens[:, t:t + 1]) for t in range(T)]  # per token [B, 1, C]
        self.carry, self.new = [None] * T, []

    def layer(self, i: int, blk) -> None:
        if i * self.n != len(self.new):
            raise ValueError(f"layer {i} out of order (expected {len(self.new) // self.n})")
        st = self.state[i * self.n:(i + 1) * self.n]
        with self.torch.no_grad():
            for t in range(len(self.xs)):
                self.xs[t], st, self.carry[t] = self.model.layer(i, blk, self.xs[t], st, self.carry[t],
                                                                 single_step=True)
        self.new += st

    def result(self):
        """(logits [B, T, V] float64, final state)."""
        with self.torch.no_grad():
            logits = np.stack([_float64(y[:, 0]) for y in self.model.logits_each(self.xs)], 1)
        return logits, self.new

    def top1(self, chunk: int = 64) -> np.ndarray:
        """The top token of every position [B, T], the logits made `chunk` positions at a time: a long stream's
        logits (T x V float64) need not fit in memory."""
        with self.torch.no_grad():
            picks = [y[:, 0].argmax(-1).cpu().numpy() for a in range(0, len(self.xs), chunk)
                     for y in self.model.logits_each(self.xs[a:a + chunk])]
        return np.stack(picks, 1)


def _float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU; torch itself is not imported here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)
