"""Sampling and streaming generation over any Session (runtime/contract.py): ONNX Runtime, the PyTorch
reference, or anything with init_state/step/forward and get_tokenizer. numpy only."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import RWKVDeployError
from .tokenizer import TextStream


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


def check_prompt(prompt: str) -> None:
    """Reject text that cannot be encoded. On Linux, command-line bytes that are not UTF-8 reach Python as lone
    surrogates ('\\udcff' for byte 0xff), which no tokenizer can encode."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(prompt[e.start])
        what = f"byte {bad - 0xDC00:#04x}" if 0xDC80 <= bad <= 0xDCFF else f"character U+{bad:04X}"
        raise RWKVDeployError(f"the prompt is not valid UTF-8 ({what} at position {e.start}); pass UTF-8 text")


@dataclass
class GenerationStats:
    """What generate() did, filled in as it runs: the prompt (one forward call) and the generated tokens
    (sampling, decoding and the steps between them), in wall-clock seconds."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        """e.g. "24 tokens in 0.51 s: 47.1 tokens/s (prompt 8 tokens in 0.02 s)"."""
        rate = f"{self.tokens / self.seconds:.1f}" if self.seconds > 0 else "-"
        return (f"{self.tokens} tokens in {self.seconds:.2f} s: {rate} tokens/s "
                f"(prompt {self.prompt_tokens} tokens in {self.prompt_seconds:.2f} s)")


def generate(session, prompt: str, max_tokens: int = 100, temperature: float = 1.0, top_p: float = 0.85,
             seed: int | None = None, stop_at_eos: bool = True,
             stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield decoded text pieces as they become valid UTF-8. Reproducible for a fixed seed.

    The pieces join to exactly the decoded text: a character split across tokens comes out whole, once its last
    byte has been generated (see TextStream). Pass a GenerationStats as `stats` to get counts and timings.
    """
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1 or max_tokens < 0:
        raise RWKVDeployError(f"need a finite temperature >= 0, 0 < top_p <= 1, max_tokens >= 0; got {temperature}, "
                              f"{top_p}, {max_tokens}")
    if seed is not None and not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2 ** 63):  # numpy: ValueError
        raise RWKVDeployError(f"the seed must be an integer in [0, 2**63); got {seed}")
    check_prompt(prompt)
    tok = session.get_tokenizer()
    ids = tok.encode(prompt)
    if not ids:
        raise RWKVDeployError("the prompt is empty; pass some text with --prompt")
    rng = np.random.default_rng(seed)
    stats = stats if stats is not None else GenerationStats()
    t0 = time.perf_counter()
    logits, state = session.forward(np.array([ids]), session.init_state(1))  # [1, V] after the whole prompt
    stats.prompt_tokens, stats.prompt_seconds = len(ids), time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = TextStream(tok)
    for n in range(max_tokens):
        # models have more logits than their tokenizer has ids (World: 65536 vs 65530): those are never sampled
        nxt = sample(logits[0][:tok.vocab_size], rng, temperature, top_p)
        if nxt == 0 and stop_at_eos:  # id 0 is end-of-text in both RWKV vocabularies
            break
        stats.tokens, stats.seconds = n + 1, time.perf_counter() - t0
        piece = stream.push(nxt)
        if piece:
            yield piece
        if n + 1 < max_tokens:  # the logits after the last token would never be used
            logits, state = session.step(np.array([nxt]), state)
    tail = stream.finish()
    if tail:
        yield tail
