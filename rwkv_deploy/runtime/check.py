"""`rwkv-deploy check`: replay an export's golden logits (manifest "golden", design.md §2). Imports no torch.

The golden logits were computed by the float64 PyTorch reference when the folder was exported; replaying their
tokens through ONNX Runtime and holding the result to the manifest's tolerance certifies this installation (its
onnxruntime, CPU, custom-op library) without the checkpoint or PyTorch. Other clients do the same from the
manifest alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RWKVDeployError
from ..validation.metrics import normalised  # numpy only
from .manifest import read_manifest
from .session import open_session


@dataclass
class CheckResult:
    """Per golden row: the normalised distance and whether the top token agrees. Truthy on pass."""

    tokens: list[int]
    distance: np.ndarray  # [T]: max|Δlogit| / std(golden row)
    top1: np.ndarray  # [T] bool: argmax agrees, near-ties counted
    tolerance: dict  # manifest golden.tolerance: {"normalised", "top1"}

    def __bool__(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        out = []
        worst = int(self.distance.argmax())
        if not self.distance[worst] <= self.tolerance["normalised"]:  # `not <=`: a NaN fails
            out.append(f"logits of row {worst} are {self.distance[worst]:.3g} (max|Δ|/std) from the golden logits, "
                       f"more than the tolerance {self.tolerance['normalised']:g}")
        if self.top1.mean() < self.tolerance["top1"]:
            out.append(f"top-1 agrees on {self.top1.mean():.0%} of rows, less than {self.tolerance['top1']:.0%}")
        return out

    def reason(self) -> str:
        """One line: why it failed ('' on pass)."""
        return "; ".join(self.failures())

    def table(self) -> str:
        lines = [f"{'row':>4} {'token':>7} {'max|Δ|/std':>11}  top-1"]
        lines += [f"{t:>4} {tok:>7} {d:>11.3g}  {'ok' if a else 'DIFFERS'}"
                  for t, (tok, d, a) in enumerate(zip(self.tokens, self.distance, self.top1))]
        lines.append(f"tolerance: max|Δ|/std <= {self.tolerance['normalised']:g}, top-1 >= {self.tolerance['top1']:.0%}"
                     " (near-ties count)")
        lines.append("PASS" if self else f"FAIL: {self.reason()}")
        return "\n".join(lines)


def compare(ours: np.ndarray, golden: np.ndarray, tokens: list[int], tolerance: dict) -> CheckResult:
    """Hold logits [T, V] against the golden ones by the rule the manifest's schema states."""
    ours, golden = ours.astype(np.float64), golden.astype(np.float64)
    std = golden.std(-1)
    distance = normalised(ours, golden)
    # a near-tie is no disagreement: golden's logit at our pick within the allowed distance of golden's maximum
    at_pick = np.take_along_axis(golden, ours.argmax(-1)[:, None], -1)[:, 0]
    top1 = golden.max(-1) - at_pick <= tolerance["normalised"] * std
    return CheckResult(list(tokens), distance, top1, tolerance)


def golden_logits(manifest) -> tuple[list[int], np.ndarray]:
    """The golden tokens and logits [T, V] of an export folder; a folder without them is bad input."""
    golden = manifest.get("golden") if manifest["format"] != "rwkv-deploy/1" else None
    if not golden:
        raise RWKVDeployError(f"{manifest.folder} has no golden logits (manifest format {manifest['format']}); "
                              "re-export it with this rwkv-deploy to add them")
    path = manifest.path("golden.logits_file", golden["logits_file"])
    T, V = golden["shape"]
    if T != len(golden["tokens"]) or V != manifest["vocab_size"]:
        raise RWKVDeployError(f"{manifest.folder / 'manifest.json'} golden.shape {golden['shape']} does not match "
                              f"{len(golden['tokens'])} tokens x vocab_size {manifest['vocab_size']}; re-export it")
    try:
        logits = np.fromfile(path, dtype="<f4")
    except OSError as e:
        raise RWKVDeployError(f"cannot read the golden logits {path} ({e.strerror or e}); re-export the model")
    if logits.size != T * V:
        raise RWKVDeployError(f"{path} holds {logits.size} float32 values, golden.shape {golden['shape']} needs "
                              f"{T * V}; re-export the model")
    return golden["tokens"], logits.reshape(T, V)


def check(folder: str | Path, session=None, *, trust_custom_ops: bool = False) -> CheckResult:
    """Feed the golden tokens one at a time (batch 1, from the initial state) through the step graph of `folder`
    (or through `session`, any Session of that folder) and compare with the golden logits."""
    manifest = read_manifest(folder)
    tokens, golden = golden_logits(manifest)  # before opening the session: a format-1 folder fails fast
    if session is None:
        session = open_session(folder, trust_custom_ops=trust_custom_ops)
    state, rows = session.init_state(1), []
    for t in tokens:
        logits, state = session.step(np.array([t], dtype=np.int64), state)
        rows.append(logits[0])
    return compare(np.stack(rows), golden, tokens, manifest["golden"]["tolerance"])
