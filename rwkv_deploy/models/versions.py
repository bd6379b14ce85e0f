"""The version registry and detection from checkpoint keys (spec §2)."""
from __future__ import annotations

from torch import Tensor

from .base import Version
from .v4 import V4
from .v5 import V5
from .v6 import V6
from .v7 import V7

VERSIONS: dict[str, Version] = {v.name: v for v in (V4(), V5("5.0"), V5("5.1"), V5("5.2"), V6(), V7())}


def detect_version(sd: dict[str, Tensor]) -> str:
    """First match wins, in the order of spec §2's table."""
    if any(f"blocks.0.att.{k}" in sd for k in ("r_k", "x_r", "w0", "k_k")):
        return "7"
    if any("time_maa" in k for k in sd):
        return "6"
    if "blocks.0.att.ln_x.weight" in sd:
        if "blocks.0.att.gate.weight" not in sd:
            return "5.0"
        td = sd.get("blocks.0.att.time_decay")
        return "5.2" if td is not None and td.squeeze().dim() == 2 else "5.1"
    return "4"
