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
        for round_ in self._rounds(requests):
            # checked when its round runs: a sequence's second request sees the state its first one left
            by_len: dict[int, list[int]] = {}
            for i in round_:
                error = self._check(requests[i])
                if error:
                    self._fail(requests[i], RWKVDeployError(error), results, i)
                else:
                    by_len.setdefault(len(requests[i].tokens), []).append(i)
            for group in by_len.values():
                self._run_group(requests, group, results, now)
        return results

    @staticmethod
    def _rounds(requests: list[Request]) -> list[list[int]]:
        """Request indices in rounds, each sequence at most once per round: a sequence appearing twice in a batch
        runs its requests in order (Triton does not batch two requests of one sequence; if it did, this holds)."""
        rounds: list[list[int]] = [[]]
        seen: set[int] = set()
        for i, r in enumerate(requests):
            if r.corrid in seen:
                rounds.append([])
                seen = set()
            seen.add(r.corrid)
            rounds[-1].append(i)
        return rounds

    def _fail(self, r: Request, error: RWKVDeployError, results: list, i: int) -> None:
        """A failed request still starts or ends its sequence: a stale state must neither run on after a failed
        start nor wait for the idle timeout after a failed end."""
        results[i] = error
        if r.start or r.end:
            self.states.pop(r.corrid, None)

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
                self._fail(requests[i], e, results, i)
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
