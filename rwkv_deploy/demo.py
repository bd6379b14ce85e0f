"""`rwkv-deploy demo`: the whole pipeline on an embedded default, with no files needed."""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO = {"version": "7", "n_layer": 4, "n_embd": 128, "head_size": 32, "vocab_size": 65536}
PROMPT = "The Eiffel tower is in the city of"


def demo(folder: str | Path = "rwkv-deploy-demo", steps: int = 64, max_tokens: int = 24, echo=print) -> bool:
    """Build a small random RWKV-7 with the World vocabulary, export, verify and generate. Returns the verdict."""
    from .exporters.export import export
    from .models.synthetic import make_checkpoint, save_checkpoint
    from .runtime.generate import GenerationStats, generate
    from .runtime.session import open_session
    from .validation.compare import verify

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "demo-rwkv7.pth"
    t = time.time()
    save_checkpoint(make_checkpoint(DEMO["version"], n_layer=DEMO["n_layer"], n_embd=DEMO["n_embd"],
                                    head_size=DEMO["head_size"], vocab_size=DEMO["vocab_size"]), ckpt)
    echo(f"1. made {ckpt.name}: RWKV-{DEMO['version']}, {DEMO['n_layer']} layers x {DEMO['n_embd']}, World vocabulary, "
         f"random weights ({time.time() - t:.1f}s)")
    t = time.time()
    out = export(ckpt, folder / "export", force=True, prefill="last")
    echo(f"2. exported to {out} ({time.time() - t:.1f}s): model.onnx, prefill.onnx, manifest.json, tokenizer")
    sess = open_session(out)
    report = verify(out, steps=steps, session=sess)
    echo(f"3. verified against the PyTorch reference ({report.seconds:.1f}s):")
    echo("   " + report.table().replace("\n", "\n   "))
    echo(f"4. generating {max_tokens} tokens from {PROMPT!r} (seed 0; random weights, so the text is noise):")
    sess.get_tokenizer()  # load it outside the timing
    stats = GenerationStats()
    text = "".join(generate(sess, PROMPT, max_tokens=max_tokens, temperature=1.0, top_p=0.85, seed=0, stats=stats))
    echo(f"   {PROMPT}{text!r}")
    echo(f"   {stats.line()} on {sess.backend}; the prompt through prefill.onnx, then one step per token")
    echo(f"done: {'parity certified' if report else 'PARITY FAILED'}; see {out / 'verify.json'}")
    return bool(report)
