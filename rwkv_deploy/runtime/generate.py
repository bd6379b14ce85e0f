"""Sampling and streaming generation over any session with init_state/step/forward. numpy only."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import RWKVDeployError


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_p: float = 0.85) -> int:
    """Nucleus sampling on one row of logits; temperature 0 is greedy."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = (logits.astype(np.float64) - logits.max()) / temperature
    p = np.exp(z)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, top_p)) + 1]  # smallest prefix whose mass reaches top_p
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])


def generate(session, prompt: str, max_tokens: int = 100, temperature: float = 1.0, top_p: float = 0.85,
             seed: int | None = None, stop_at_eos: bool = True) -> Iterator[str]:
    """Yield decoded text pieces as they become valid UTF-8. Reproducible for a fixed seed."""
    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 0:
        raise RWKVDeployError(f"need temperature >= 0, 0 < top_p <= 1, max_tokens >= 0; got {temperature}, {top_p}, "
                              f"{max_tokens}")
    tok = session.get_tokenizer()
    ids = tok.encode(prompt)
    if not ids:
        raise RWKVDeployError("the prompt is empty; pass some text with --prompt")
    rng = np.random.default_rng(seed)
    logits, state = session.forward(np.array([ids]), session.init_state(1))
    pending: list[int] = []
    for _ in range(max_tokens):
        nxt = sample(logits[0], rng, temperature, top_p)
        if nxt == 0 and stop_at_eos:  # id 0 is end-of-text in both RWKV vocabularies
            break
        pending.append(nxt)
        raw = tok.decode_bytes(pending)
        try:
            text = raw.decode("utf-8")
            pending = []
            yield text
        except UnicodeDecodeError:
            if len(pending) > 8:  # not going to become valid: emit with replacement characters
                yield raw.decode("utf-8", errors="replace")
                pending = []
        logits, state = session.step(np.array([nxt]), state)
    if pending:
        yield tok.decode_bytes(pending).decode("utf-8", errors="replace")
