"""How often a quantized export picks the same next token as the fp32 export, on a model that has learned something.

Random checkpoints have flat logits (a random head's top two of 50,277 tokens are a fraction of a std apart), so
their top-1 agreement says little about a trained model. No weights are downloaded here; instead this script
trains a small byte-level RWKV for a few minutes on local text (the Python standard library's source, which every
machine running this has), with the package's own reference model and autograd, then exports it at fp32, int8
and int4 and compares, over held-out text the training never saw:

- top-1 agreement with the fp32 export, teacher-forced over --eval-tokens bytes, and along the fp32 export's own
  greedy continuation of a held-out prompt (the free-running case);
- bits per byte of each export on the held-out text (what quantization costs in loss);
- optionally (--verify) each export's parity certificate over --eval-tokens steps.

    python bench/trained_agreement.py [--version 7] [--layers 4] [--embd 256] [--steps 1500] [--dir trained]
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rwkv_deploy.models.synthetic import ALL_VERSIONS

CLI = [sys.executable, "-m", "rwkv_deploy.cli"]
VOCAB = 256  # bytes


def corpus(limit: int) -> tuple[bytes, bytes]:
    """(training text, held-out text) from the standard library's .py files: sorted, every 10th file held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = bytearray(), bytearray()
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.relative_to(root).parts and p.is_file())
    for i, f in enumerate(files):
        (held if i % 10 == 9 else train).extend(f.read_bytes())
        if len(train) >= limit and len(held) >= limit // 10:
            break
    return bytes(train), bytes(held)


def train(a, text: bytes) -> dict[str, torch.Tensor]:
    """A BlinkDL state dict trained on `text` (bytes as tokens), float32."""
    from rwkv_deploy.models.checkpoint import _validate
    from rwkv_deploy.models.model import RWKV
    from rwkv_deploy.models.synthetic import make_checkpoint

    torch.manual_seed(a.seed)
    sd = {k: t.float().requires_grad_() for k, t in
          make_checkpoint(a.version, a.layers, a.embd, a.head_size, VOCAB, seed=a.seed).items()}
    opt = torch.optim.Adam(sd.values(), lr=a.lr)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(a.seed)
    start, seen = time.time(), []
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / 50) * (0.1 + 0.9 * (1 + math.cos(math.pi * step / a.steps)) / 2)
        for group in opt.param_groups:
            group["lr"] = lr
        at = torch.randint(0, len(data) - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([data[i:i + a.seq + 1] for i in at.tolist()])  # [B, T + 1]
        model = RWKV(_validate(Path("trained.pth"), "pth", sd, None), torch.float32)  # weights prepared with grad
        logits, _ = model(x[:, :-1], model.init_state(a.batch))  # [B, T, V]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sd.values(), 1.0)
        opt.step()
        seen.append(loss.detach().item())
        if step % 25 == 0 or step == a.steps:
            print(f"  step {step}/{a.steps}: loss {np.mean(seen[-25:]):.3f} nats/byte "
                  f"({np.mean(seen[-25:]) / math.log(2):.2f} bits), {time.time() - start:.0f}s", flush=True)
    return {k: t.detach().contiguous() for k, t in sd.items()}


def teacher_forced(session, tokens: np.ndarray) -> np.ndarray:
    """Logits [T, V] of a session stepping through `tokens` one at a time."""
    state, out = session.init_state(1), []
    for t in tokens:
        logits, state = session.step(np.array([t]), state)
        out.append(logits[0])
    return np.stack(out)


def greedy(session, prompt: np.ndarray, n: int) -> np.ndarray:
    """The prompt followed by n tokens of greedy continuation."""
    state = session.init_state(1)
    for t in prompt[:-1]:
        _, state = session.step(np.array([t]), state)
    tokens = list(prompt)
    for _ in range(n):
        logits, state = session.step(np.array([tokens[-1]]), state)
        tokens.append(int(logits[0].argmax()))
    return np.array(tokens)


def bits_per_byte(logits: np.ndarray, targets: np.ndarray) -> float:
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float((lse - logits[np.arange(len(targets)), targets]).mean() / math.log(2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", default="7", choices=ALL_VERSIONS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500, help="training steps (default 1500: ~7 min on 2 cores)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-bytes", type=int, default=8 << 20)
    ap.add_argument("--eval-tokens", type=int, default=1000)
    ap.add_argument("--precisions", nargs="+", default=["int8", "int4"])
    ap.add_argument("--verify", action="store_true", help="also run each export's certificate over --eval-tokens")
    ap.add_argument("--dir", type=Path, default=Path("trained"))
    a = ap.parse_args(argv)
    if min(a.layers, a.embd, a.head_size, a.steps, a.batch, a.seq, a.eval_tokens) < 1 or a.embd % a.head_size:
        ap.error("--layers, --embd, --head-size, --steps, --batch, --seq and --eval-tokens must be positive, and "
                 "--embd a multiple of --head-size")
    from rwkv_deploy.models.synthetic import save_checkpoint
    from rwkv_deploy.runtime.session import open_session

    torch.set_num_threads(max(1, torch.get_num_threads()))
    a.dir.mkdir(parents=True, exist_ok=True)
    ckpt = a.dir / f"v{a.version}-{a.layers}x{a.embd}-trained.pth"
    text, held = corpus(a.corpus_bytes)
    if ckpt.exists():
        print(f"reusing {ckpt} (delete it to train again)")
    else:
        print(f"training RWKV-{a.version} {a.layers}x{a.embd} on {len(text) / 1e6:.1f} MB of the standard library's "
              f"source, {a.steps} steps of {a.batch}x{a.seq} bytes")
        save_checkpoint(train(a, text), ckpt)
    folders = {}
    for p in ["fp32", *a.precisions]:
        folders[p] = a.dir / f"v{a.version}-{p}"
        r = subprocess.run([*CLI, "export", str(ckpt), "-o", str(folders[p]), "--precision", p, "--force"],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: export at {p} failed: {r.stderr.strip()[-500:]}")
    n = a.eval_tokens
    tokens = np.frombuffer(held[:n + 1], dtype=np.uint8).astype(np.int64)
    sessions = {p: open_session(f) for p, f in folders.items()}
    forced = {p: teacher_forced(s, tokens[:-1]) for p, s in sessions.items()}
    path = greedy(sessions["fp32"], tokens[:64], n)  # a held-out prompt, then the fp32 export's own choices
    free = {p: teacher_forced(s, path[:-1])[63:] for p, s in sessions.items()}  # the continuation's steps
    ref_top = forced["fp32"].argmax(-1)
    print(f"\nheld-out text, {n} bytes teacher-forced / {n} steps along the fp32 export's greedy continuation:")
    print(f"{'export':8s} {'bits/byte':>9s} {'top-1 = fp32 (text)':>20s} {'top-1 = fp32 (free)':>20s}")
    for p in folders:
        same = (forced[p].argmax(-1) == ref_top).mean()
        same_free = (free[p].argmax(-1) == free["fp32"].argmax(-1)).mean()
        print(f"{p:8s} {bits_per_byte(forced[p], tokens[1:]):9.3f} {same:19.1%} {same_free:19.1%}")
    sample = bytes(path[64:64 + 200].astype(np.uint8)).decode("utf-8", "replace")
    print(f"\nthe fp32 export's greedy continuation (first 200 bytes):\n{sample}")
    if a.verify:
        for p, f in folders.items():
            r = subprocess.run([*CLI, "verify", str(f), "--steps", str(n)], capture_output=True, text=True)
            print(f"verify {p} ({n} steps): " + next((ln for ln in r.stdout.splitlines()
                                                     if ln.startswith(("PASS", "FAIL"))), r.stderr.strip()[-200:]))


if __name__ == "__main__":
    main()
