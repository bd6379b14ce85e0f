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


def _float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU; torch itself is not imported here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)
