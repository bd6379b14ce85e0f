"""BlinkDL's logit metric, written once (design.md §5): max|Δlogit| / std(reference logits).

numpy only: the torch-free runtime, the tests and bench/ all measure with it.
"""
from __future__ import annotations

import numpy as np


def normalised(ours, ref) -> np.ndarray:
    """max|Δlogit| / std(ref logits) per row, in float64: [..., V] -> [...]."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max(-1) / ref.std(-1)


def max_normalised(ours, ref) -> float:
    """The worst row (step, batch row) of `normalised`."""
    return float(normalised(ours, ref).max())
