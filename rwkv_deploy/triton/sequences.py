"""Per-sequence state for the Python-backend model (model.py): one State row per correlation id, batched.

Triton's Python backend does not carry implicit state, so the model keeps it: each sequence's state (host numpy
arrays, batch 1) under its correlation id. One `run` takes the requests Triton batched (at most one per
sequence), stacks the states of the requests with the same token count into one batch, runs it through the
Session contract (step for one token, forward = prefill for a prompt), and splits the new state back. Uses only
the contract (runtime/contract.py): any Session works, which is also how it is tested without Triton.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import RWKVDeployError
from ..runtime.contract import Session


@dataclass
class Request:
    corrid: int
    start: bool
    end: bool
    tokens: np.ndarray  # [T] integer ids, T >= 1


class SequenceTable:
    """Sequence state keyed by correlation id; a sequence idle longer than `idle_seconds` is dropped (Triton
    aborts it too: max_sequence_idle_microseconds), so abandoned conversations do not accumulate."""

    def __init__(self, session: Session, idle_seconds: float, clock=time.monotonic):
        self.session, self.idle_seconds, self.clock = session, idle_seconds, clock
        self.initial = session.init_state(1).to_numpy()
        self.states: dict[int, tuple[dict[str, np.ndarray], float]] = {}  # corrid -> (state, last used)

    def __len__(self) -> int:
        return len(self.states)

    def run(self, requests: list[Request]) -> list[np.ndarray | RWKVDeployError]:
        """Logits [V] of each request's last token, or the error of that request alone."""
        now = self.clock()
        for corrid in [c for c, (_, used) in self.states.items() if now - used > self.idle_seconds]:
            del self.states[corrid]
        results: list = [None] * len(requests)
        for group in self._groups(requests, results):
            self._run_group(requests, group, results, now)
        return results

    def _groups(self, requests: list[Request], results: list) -> list[list[int]]:
        """Indices of valid requests grouped by token count, in rounds so that a sequence appearing twice runs
        its requests in order (Triton never batches two requests of one sequence, but nothing breaks if it does)."""
        rounds: list[dict[int, list[int]]] = [{}]
        seen: set[int] = set()
        for i, r in enumerate(requests):
            error = self._check(r)
            if error:
                results[i] = RWKVDeployError(error)
                continue
            if r.corrid in seen:
                rounds.append({})
                seen = set()
            seen.add(r.corrid)
            rounds[-1].setdefault(len(r.tokens), []).append(i)
        return [group for by_len in rounds for group in by_len.values()]

    def _check(self, r: Request) -> str | None:
        if not r.corrid:
            return "no sequence id: send requests with sequence_id (correlation id) != 0 and sequence_start"
        if not r.start and r.corrid not in self.states:
            return (f"sequence {r.corrid} is not open (never started, ended, or idle longer than "
                    f"{self.idle_seconds:.0f}s): start it again with sequence_start=True")
        t = r.tokens
        if t.ndim != 1 or t.size == 0 or t.dtype.kind not in "iu":
            return f"tokens must be a non-empty row of integer ids, got {t.dtype} {list(t.shape)}"
        if t.min() < 0 or t.max() >= self.session.vocab_size:
            return f"token id {int(t[(t < 0) | (t >= self.session.vocab_size)][0])} is out of range " \
                   f"[0, {self.session.vocab_size})"
        return None

    def _run_group(self, requests: list[Request], group: list[int], results: list, now: float) -> None:
        rows = [self.initial if requests[i].start else self.states[requests[i].corrid][0] for i in group]
        tokens = np.stack([requests[i].tokens.astype(np.int64) for i in group])  # [B, T]
        try:
            state = self.session.state_from_numpy({n: np.concatenate([r[n] for r in rows]) for n in self.initial})
            if tokens.shape[1] == 1:
                logits, state = self.session.step(tokens[:, 0], state)
            else:
                logits, state = self.session.forward(tokens, state)  # the prefill graph when the export has one
        except RWKVDeployError as e:
            for i in group:
                results[i] = e
            return
        new = state.to_numpy()
        for k, i in enumerate(group):
            r = requests[i]
            if r.end:
                self.states.pop(r.corrid, None)
            else:
                # copies: a view would keep the whole batch array alive as long as any of its rows
                self.states[r.corrid] = ({n: a[k:k + 1].copy() for n, a in new.items()}, now)
            results[i] = logits[k]
