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


def stepwise_layers(model, tokens, state=None):
    """What `stepwise(model, tokens, state)` returns for our torch reference, computed layer by layer: layer i runs
    every token (one at a time, its state carried) before layer i+1 starts, so a lazy model (RWKV(..., lazy=True))
    prepares each layer's weights once and holds one layer at a time. The same per-token arithmetic as
    model.step, so the same numbers."""
    import torch

    B, T = tokens.shape
    state = model.init_state(B) if state is None else state
    n = len(model.kinds)
    with torch.no_grad():
        xs = [model.embed(tokens[:, t:t + 1]) for t in range(T)]  # per token [B, 1, C]
        carry, new = [None] * T, []
        for i, blk in enumerate(model.blocks):
            st = state[i * n:(i + 1) * n]
            for t in range(T):
                xs[t], st, carry[t] = model.layer(i, blk, xs[t], st, carry[t], single_step=True)
            new += st
        logits = np.stack([_float64(y[:, 0]) for y in model.logits_each(xs)], 1)  # [B, T, V]
    return logits, new


def _float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU; torch itself is not imported here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)
