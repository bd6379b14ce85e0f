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
    """The newest version whose signature (Version.detect) the keys carry: spec §2's table. Newest first because
    a later version can carry an earlier one's keys; v4 matches anything, as the table's last row."""
    return next(v.name for v in reversed(VERSIONS.values()) if v.detect(sd))
