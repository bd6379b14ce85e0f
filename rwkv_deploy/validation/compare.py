"""Step-by-step parity of an export against the PyTorch reference (design.md §5)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import RWKVDeployError
from ..runtime.manifest import write_json_atomic

log = logging.getLogger(__name__)

# max|Δlogit|/std(ref) bound and minimum top-1 agreement, by export precision
TOLERANCES = {"fp32": {"normalised": 1e-5, "top1": 0.99}, "fp16": {"normalised": 2e-2, "top1": 0.99}}


@dataclass
class ModeResult:
    """One mode (free-running or teacher-forced) over all steps."""

    max_abs: list[float] = field(default_factory=list)  # per step, worst over the batch
    normalised: list[float] = field(default_factory=list)  # per step: max|Δ| / std(ref logits)
    top1: list[float] = field(default_factory=list)  # per step: fraction of rows with the same argmax
    # per step: same argmax, or the reference itself cannot tell the two tokens apart at the tolerance
    # (its logits for them differ by less than tol*std): a near-tie flip is not a parity failure
    top1_ties: list[float] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)  # per step: |top5 ∩ top5_ref| / 5, mean over rows
    state_rel: list[float] = field(default_factory=list)  # per step: max over tensors of max|Δ| / max|ref|

    def add(self, ours: np.ndarray, ref: np.ndarray, s_ours, s_ref, tol: float) -> None:
        d = np.abs(ours.astype(np.float64) - ref)
        self.max_abs.append(float(d.max()))
        self.normalised.append(float((d.max(-1) / ref.std(-1)).max()))
        pick = ours.argmax(-1)
        self.top1.append(float((pick == ref.argmax(-1)).mean()))
        gap = ref.max(-1) - np.take_along_axis(ref, pick[:, None], -1)[:, 0]
        self.top1_ties.append(float((gap <= tol * ref.std(-1)).mean()))
        n = min(5, ref.shape[-1])  # the top-5 as sets: a partial sort finds them without ordering the vocabulary
        t5o, t5r = np.argpartition(-ours, n - 1, -1)[:, :n], np.argpartition(-ref, n - 1, -1)[:, :n]
        self.top5.append(float(np.mean([len(set(a) & set(b)) / n for a, b in zip(t5o, t5r)])))
        self.state_rel.append(max(float(np.abs(o.astype(np.float64) - r).max() / (np.abs(r).max() + 1e-6))
                                  for o, r in zip(s_ours, s_ref)))

    def summary(self) -> dict:
        return {"max_abs": max(self.max_abs), "normalised": max(self.normalised), "top1": float(np.mean(self.top1)),
                "top1_ties": float(np.mean(self.top1_ties)),
                "top5": float(np.mean(self.top5)), "state_rel": max(self.state_rel)}


@dataclass
class Report:
    """Truthy when every mode is within tolerance."""

    precision: str
    backend: str
    steps: int
    batch: int
    tolerance: dict
    free_running: ModeResult
    teacher_forced: ModeResult
    seconds: float = 0.0
    # with floor=True: max|Δ|/std of the float32 reference itself against float64, and of the export against
    # float64 -- how much of the deviation fp32 arithmetic on this model allows at all
    floor: dict | None = None

    def failures(self) -> list[str]:
        out = []
        for name, mode in (("free-running", self.free_running), ("teacher-forced", self.teacher_forced)):
            s = mode.summary()
            if not s["normalised"] <= self.tolerance["normalised"]:
                out.append(f"{name}: normalised deviation {s['normalised']:.3g} > {self.tolerance['normalised']:g}")
            if s["top1_ties"] < self.tolerance["top1"]:
                out.append(f"{name}: top-1 agreement {s['top1_ties']:.1%} (near-ties counted) < "
                           f"{self.tolerance['top1']:.0%}")
        return out

    def __bool__(self) -> bool:
        return not self.failures()

    def would_pass_at(self) -> float:
        return max(self.free_running.summary()["normalised"], self.teacher_forced.summary()["normalised"])

    def to_json(self) -> dict:
        return {"passed": bool(self), "precision": self.precision, "backend": self.backend, "steps": self.steps,
                "batch": self.batch, "tolerance": self.tolerance, "would_pass_at": self.would_pass_at(),
                "failures": self.failures(), "seconds": self.seconds, "floor": self.floor,
                "free_running": {"summary": self.free_running.summary(), "per_step": asdict(self.free_running)},
                "teacher_forced": {"summary": self.teacher_forced.summary(), "per_step": asdict(self.teacher_forced)}}

    def table(self) -> str:
        rows = [f"{'mode':<15} {'max|Δ|':>10} {'|Δ|/std':>10} {'top-1':>7} {'top-1*':>7} {'top-5':>7} {'state rel':>10}"]
        for name, mode in (("free-running", self.free_running), ("teacher-forced", self.teacher_forced)):
            s = mode.summary()
            rows.append(f"{name:<15} {s['max_abs']:>10.3g} {s['normalised']:>10.3g} {s['top1']:>7.1%} {s['top1_ties']:>7.1%} "
                        f"{s['top5']:>7.1%} {s['state_rel']:>10.3g}")
        if self.floor:
            rows.append(f"float64 check: fp32 reference vs float64 {self.floor['reference_vs_float64']:.3g}, "
                        f"export vs float64 {self.floor['export_vs_float64']:.3g} (|Δ|/std, free-running)")
        verdict = "PASS" if self else "FAIL"
        rows.append(f"{verdict}: {self.steps} steps x batch {self.batch}, {self.precision} via {self.backend}; "
                    f"tolerance |Δ|/std <= {self.tolerance['normalised']:g}, top-1* >= {self.tolerance['top1']:.0%} "
                    "(*: near-ties within tolerance count as agreement); "
                    f"would pass at {self.would_pass_at():.3g}")
        return "\n".join(rows)


def verify(folder, checkpoint=None, steps: int = 64, batch: int = 1, seed: int = 0, session=None,
           json_path=None, write: bool = True, floor: bool = False) -> Report:
    """Run the export and the float32 reference side by side; writes OUT/verify.json (and json_path).

    floor=True also runs a float64 reference (twice the reference's memory) and reports how far the float32
    reference and the export each are from it.
    """
    from ..models import load_checkpoint
    from ..models.model import RWKV
    from ..runtime.session import open_session

    t0 = time.time()
    sess = session or open_session(folder)
    m = sess.manifest
    if steps < 1 or batch < 1:
        raise RWKVDeployError(f"--steps and --batch must be positive, got {steps} and {batch}")
    src = checkpoint or m["source"]["path"]
    if not Path(src).exists():
        raise RWKVDeployError(f"reference checkpoint {src} not found; pass --checkpoint PATH")
    ckpt = load_checkpoint(src)
    if ckpt.sha256 != m["source"]["sha256"]:
        raise RWKVDeployError(f"{src} is not the checkpoint this folder was exported from (sha256 "
                              f"{ckpt.sha256[:12]}… vs {m['source']['sha256'][:12]}…)")
    ref = RWKV(ckpt, torch.float32).eval()
    ref64 = RWKV(ckpt, torch.float64).eval() if floor else None
    s64 = ref64.init_state(batch) if floor else None
    floor_ref = floor_exp = 0.0
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, int(m["vocab_size"]), size=(steps, batch))
    free, forced = ModeResult(), ModeResult()
    r_state, o_state = ref.init_state(batch), sess.init_state(batch)
    dtypes = [np.dtype(s.dtype) for s in sess.states]
    tolerance = TOLERANCES.get(m["precision"], TOLERANCES["fp16"])
    tol = tolerance["normalised"]
    with torch.no_grad():
        for t in range(steps):
            before = [x.numpy().astype(dt) for x, dt in zip(r_state, dtypes)]
            r_logits, r_state = ref.step(torch.from_numpy(tokens[t]), r_state)
            r_np, rs_np = r_logits.numpy().astype(np.float64), [x.numpy() for x in r_state]
            o_logits, o_state = sess.step(tokens[t], o_state)  # free-running: own state
            free.add(o_logits, r_np, o_state, rs_np, tol)
            f_logits, f_state = sess.step(tokens[t], before)  # teacher-forced: the reference's state
            forced.add(f_logits, r_np, f_state, rs_np, tol)
            if ref64 is not None:
                l64, s64 = ref64.step(torch.from_numpy(tokens[t]), s64)
                exact = l64.double().numpy()
                floor_ref = max(floor_ref, float((np.abs(r_np - exact).max(-1) / exact.std(-1)).max()))
                floor_exp = max(floor_exp, float((np.abs(o_logits - exact).max(-1) / exact.std(-1)).max()))
            if (t + 1) % 100 == 0:
                log.info("verified %d/%d steps", t + 1, steps)
    report = Report(m["precision"], "onnxruntime " + "/".join(sess.providers), steps, batch, tolerance, free, forced,
                    time.time() - t0,
                    {"reference_vs_float64": floor_ref, "export_vs_float64": floor_exp} if floor else None)
    if write:
        write_json_atomic(Path(folder) / "verify.json", report.to_json())
    if json_path:
        write_json_atomic(Path(json_path).absolute(), report.to_json())
    return report
