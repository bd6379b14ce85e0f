"""The C# client (clients/csharp, built with mono's mcs, ONNX Runtime through its C API) against the Python runtime:
the same logits on every version and precision (state-tuned and fused exports too); the golden check; bad input;
generation; and the tokenizers, id for id and byte for byte.

Most commands go through `rwkv-deploy-cs.exe batch`, which runs many command lines in one mono process through the
same code as the command line; a few run as real processes to hold the process itself to the contract (exit
status, one `error:` line on stderr, no stack trace). The C# client loads the libonnxruntime.so that ships in the
Python onnxruntime wheel (or $RWKV_ORT_LIB), so both sides run the same ONNX Runtime.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from clients_common import (CORPUS, REPO, assert_same_logits, client_batch, client_error_line, damage_weights,
                            hf_20b_tokenizer, parse_score, python_greedy, python_score, score_tokens)
from conftest import VERSIONS

CS = REPO / "clients" / "csharp"
EXE = CS / "bin" / "rwkv-deploy-cs.exe"
PRECISIONS = ("fp32", "fp16", "int8", "int4")


def _python_ort_lib() -> str | None:
    """The ONNX Runtime shared library inside the Python onnxruntime wheel (what the Python runtime runs)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
    return libs[0] if libs else None


ORT_LIB = os.environ.get("RWKV_ORT_LIB") or _python_ort_lib()


def _missing() -> str | None:
    if shutil.which("mono") is None or shutil.which("mcs") is None:
        return "mono and mcs are not installed (apt-get install mono-devel)"
    if ORT_LIB is None or not Path(ORT_LIB).is_file():
        return "no libonnxruntime.so: install the onnxruntime wheel or set RWKV_ORT_LIB"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

ENV = {**os.environ, "RWKV_ORT_LIB": ORT_LIB or ""}


@pytest.fixture(scope="session", autouse=True)
def build():
    """bash clients/csharp/build.sh, once per session."""
    r = subprocess.run(["bash", str(CS / "build.sh")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert EXE.is_file()


def cs(*args, input: str | None = None, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["mono", str(EXE), *map(str, args)], input=input, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


def batch(commands: list[list]) -> list[dict]:
    return client_batch(cs, commands)


def one_error_line(r, *words) -> str:
    return client_error_line(r, *words, trace_marks=("   at ", "Exception"))


def same_ort_as_python() -> bool:
    import onnxruntime

    return ORT_LIB == _python_ort_lib() or ORT_LIB.endswith(".so." + onnxruntime.__version__)


def score_bound(precision: str) -> float:
    """1e-5 (max|Δ|/std): the C# client runs the Python wheel's own ONNX Runtime, so even fp16 graphs run the same
    kernels. With another ONNX Runtime ($RWKV_ORT_LIB) fp16 kernels may differ between releases (measured for the
    JavaScript client: 1.3e-4...7.8e-4 between 1.30 and 1.32): then fp16 is held to 2e-3, two fp16 roundings."""
    return 1e-5 if precision == "fp32" or same_ort_as_python() else 2e-3


def _vocab(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["vocab_size"]


# --- the same logits as the Python runtime, and the golden check ------------------------------------------------

# (version, precision, wkv, state-tuned): every version and precision, state-tuned exports (init_file), and a fused
# export (its custom-op library loaded with --trust-custom-ops)
CASES = [(v, p, "portable", False) for v in VERSIONS for p in PRECISIONS]
CASES += [("6", p, "portable", True) for p in PRECISIONS] + [("7", "fp32", "fused", False)]
IDS = [f"v{v}-{p}{'-fused' if wkv == 'fused' else ''}{'-tuned' if tuned else ''}" for v, p, wkv, tuned in CASES]
WORST: dict = {}  # precision -> the worst distance from the Python runtime seen


@pytest.fixture(scope="module")
def parity(exported):
    """score and check of every export, in one mono process."""
    folders = {c: exported(c[0], c[1], wkv=c[2], time_state=c[3]) for c in CASES}
    commands, keys = [], []
    for c, folder in folders.items():
        trust = ["--trust-custom-ops"] if c[2] == "fused" else []
        tokens = score_tokens(_vocab(folder))
        commands += [["score", folder, "--tokens", ",".join(map(str, tokens)), *trust], ["check", folder, *trust]]
        keys += [("score", c), ("check", c)]
    return folders, dict(zip(keys, batch(commands)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_score_matches_python(parity, case):
    folders, results = parity
    folder, r = folders[case], results[("score", case)]
    assert r["rc"] == 0, r["stderr"]
    tokens = score_tokens(_vocab(folder))
    precision = case[1]
    d = assert_same_logits(parse_score(r["stdout"], tokens, _vocab(folder)), python_score(folder, tokens),
                           score_bound(precision))
    WORST[precision] = max(d, WORST.get(precision, 0.0))
    print(f"\n{folder.name}: max|Δ|/std = {d:.3g} (worst so far at {precision}: {WORST[precision]:.3g})")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_check_passes(parity, case):
    r = parity[1][("check", case)]
    assert r["rc"] == 0 and r["stdout"].rstrip().endswith("PASS"), r["stdout"] + r["stderr"]
    assert "max|Δ|/std" in r["stdout"] and "tolerance:" in r["stdout"]


@pytest.fixture(scope="module")
def damaged(exported, tmp_path_factory):
    """A copy of every export with one weight matrix scaled by 1.5."""
    root, out = tmp_path_factory.mktemp("damaged"), {}
    for v in VERSIONS:
        for p in PRECISIONS:
            folder = root / f"v{v}-{p}"
            shutil.copytree(exported(v, p), folder)
            damage_weights(folder)
            out[(v, p)] = folder
    return out


def test_damaged_exports_fail_check(damaged):
    keys = list(damaged)
    for key, r in zip(keys, batch([["check", damaged[k]] for k in keys])):
        assert r["rc"] == 1, (key, r)
        assert "FAIL: " in r["stdout"] and "from the golden logits" in r["stdout"], (key, r["stdout"])
        assert r["stderr"].startswith("verification failed: "), (key, r["stderr"])


def test_check_process_exit_codes(exported, damaged):
    """The real process: PASS exits 0, FAIL exits 1 (not only through `batch`)."""
    ok = cs("check", exported("7"))
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("PASS"), ok.stdout + ok.stderr
    bad = cs("check", damaged[("7", "fp16")])
    assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout + bad.stderr


# --- custom operators: loaded only when trusted, and only the library the manifest pins --------------------------


def _edit(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_fused_export_needs_trust_and_the_pinned_library(exported, tmp_path):
    fused = exported("7", wkv="fused")
    lib = json.loads((fused / "manifest.json").read_text())["requires"]["custom_ops"]["libraries"]
    for args in (["check", fused], ["score", fused, "--tokens", "1,2"]):
        one_error_line(cs(*args), "--trust-custom-ops", "native code")
    other = _edit(fused, tmp_path / "other", lambda m: m["requires"]["custom_ops"]["libraries"]["CPUExecutionProvider"]
                  .update(sha256="0" * 64))
    missing = tmp_path / "missing"
    shutil.copytree(fused, missing)
    (missing / lib["CPUExecutionProvider"]["path"]).unlink()
    results = batch([["check", other, "--trust-custom-ops"], ["check", missing, "--trust-custom-ops"]])
    one_error_line(results[0], "sha256", "not the library this folder was exported with")
    one_error_line(results[1], "missing")


# --- bad input: one error line, exit 2 ------------------------------------------------------------------------


def test_bad_input(exported, tmp_path):
    good = exported("7")
    outside = tmp_path / "outside.onnx"
    shutil.copy(good / "model.onnx", outside)
    cases = {  # name -> (argv, words the error line must hold)
        "no command": ([], ["COMMAND"]),
        "missing folder": (["score", tmp_path / "nope", "--tokens", "1"], ["does not exist"]),
        "not a folder": (["check", outside], ["not an export folder"]),
        "no manifest": (["check", tmp_path], ["has no manifest.json"]),
        "bad tokens": (["score", good, "--tokens", "1,x"], ["--tokens"]),
        "empty tokens": (["score", good, "--tokens", ""], ["--tokens"]),
        "negative token": (["score", good, "--tokens", "-1"], ["out of range"]),
        "token out of range": (["score", good, "--tokens", "1,97"], ["out of range"]),
        "no tokens": (["score", good], ["--tokens"]),
        "unknown command": (["frobnicate", good], ["unknown command"]),
        "unknown option": (["check", good, "--frob"], ["--frob"]),
        "two folders": (["check", good, good], ["unrecognized"]),
        "no tokenizer": (["run", good, "--prompt", "hi"], ["no tokenizer"]),
        "no prompt": (["run", good], ["--prompt"]),
        "bad top-p": (["run", good, "--prompt", "hi", "--top-p", "0"], ["--top-p"]),
        "bad temperature": (["run", good, "--prompt", "hi", "--temperature", "nan"], ["--temperature"]),
        "bad max-tokens": (["run", good, "--prompt", "hi", "--max-tokens", "-1"], ["--max-tokens"]),
        "bad seed": (["run", good, "--prompt", "hi", "--seed", "x"], ["--seed"]),
        "bad threads": (["check", good, "--threads", "0"], ["--threads"]),
        "no ONNX Runtime": (["check", good, "--ort-lib", tmp_path / "libnothere.so"], ["cannot load the ONNX Runtime"]),
        "not ONNX Runtime": (["check", good, "--ort-lib", outside], ["cannot load the ONNX Runtime"]),
    }
    manifests = {"not json": "{", "array": "[]", "deep": "[" * 100000 + "]" * 100000}
    edits = {
        "format 1": lambda m: m.update(format="rwkv-deploy/1"),
        "format 3": lambda m: m.update(format="rwkv-deploy/3"),
        "schema": lambda m: m["state"][0]["shape"].__setitem__(1, "64"),
        "float dim": lambda m: m.update(vocab_size=97.0),
        "no golden": lambda m: m.pop("golden"),
        "escaping path": lambda m: m["graphs"]["step"].update(file="../outside.onnx"),
        "absolute path": lambda m: m["golden"].update(logits_file=str(good / "golden" / "logits.bin")),
        "missing graph": lambda m: m["graphs"]["step"].update(file="nothere.onnx"),
        "wrong state name": lambda m: m["state"][0].update(input="state.0.nope"),
        "wrong state shape": lambda m: m["state"][0]["shape"].__setitem__(1, 65),
        "golden shape": lambda m: m["golden"]["shape"].__setitem__(0, 9),
    }
    words = {"not json": ["not valid JSON"], "array": ["not an object"], "deep": ["not valid JSON", "nested"],
             "format 1": ["rwkv-deploy/1", "re-export"], "format 3": ["rwkv-deploy/3", "newer"],
             "schema": ["$.state[0].shape[1]", "integer"], "float dim": ["$.vocab_size", "integer"],
             "no golden": ["'golden' is a required property"], "escaping path": ["leads outside"],
             "absolute path": ["absolute path"], "missing graph": ["missing"],
             "wrong state name": ["does not match manifest.json", "state.0.nope"],
             "wrong state shape": ["does not match manifest.json", "state.0"], "golden shape": ["golden.shape"]}
    for name in list(manifests) + list(edits):
        folder = tmp_path / name.replace(" ", "_")
        if name in edits:
            _edit(good, folder, edits[name])
        else:
            shutil.copytree(good, folder)
            (folder / "manifest.json").write_text(manifests[name])
        argv = ["check", folder] if name == "golden shape" else ["score", folder, "--tokens", "1"]
        cases[f"manifest: {name}"] = (argv, words[name])
    # a symlink inside the folder that leads out of it
    link = tmp_path / "symlink"
    shutil.copytree(good, link)
    (link / "model.onnx").unlink()
    (link / "model.onnx").symlink_to(outside)
    cases["symlink out"] = (["check", link], ["leads outside"])
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    (truncated / "golden" / "logits.bin").write_bytes(b"\0" * 12)
    cases["truncated golden"] = (["check", truncated], ["holds 3 float32 values"])
    names = list(cases)
    results = batch([cases[n][0] for n in names])
    for n, r in zip(names, results):
        try:
            one_error_line(r, *cases[n][1])
        except AssertionError as e:
            raise AssertionError(f"{n}: {e}") from None
    # the same through real processes (exit status and stderr of the process itself)
    for n in ("no command", "missing folder", "bad tokens", "manifest: schema", "symlink out", "no ONNX Runtime"):
        one_error_line(cs(*cases[n][0]), *cases[n][1])
    usage = cs("--help")
    assert usage.returncode == 0 and "usage:" in usage.stdout and not usage.stderr, usage


# --- generation ----------------------------------------------------------------------------------------------


def _generation_checks(folder: Path, prompt: str):
    n = 24
    results = batch([["run", folder, "--prompt", prompt, "--max-tokens", n, "--temperature", 0]] +
                    [["run", folder, "--prompt", prompt, "--max-tokens", n, "--seed", 7]] * 2 +
                    [["run", folder, "--prompt", prompt, "--max-tokens", n, "--seed", 8]])
    greedy = python_greedy(folder, prompt, n)
    assert greedy, "the Python runtime generated nothing"
    r = results[0]
    assert r["rc"] == 0, r["stderr"]
    # temperature 0 needs no random numbers: the same text as the Python runtime (which also prints the prompt)
    assert r["stdout"] == prompt + greedy + "\n", (r["stdout"], greedy)
    assert "tokens/s" in r["stderr"], r["stderr"]
    sampled = [r["stdout"] for r in results[1:]]
    assert all(r["rc"] == 0 for r in results[1:]), results[1:]
    assert sampled[0] == sampled[1] and sampled[0].startswith(prompt) and sampled[0] != prompt + "\n", sampled
    assert sampled[2] != sampled[0], sampled  # another seed, other text


def test_run_world(world_model):
    _generation_checks(world_model[1], "数据科学 is the 🙂 study of")


def test_run_hf_tokenizer(hf_model):
    _generation_checks(hf_model, "The quick brown fox 🦊 jumps")


def test_run_without_prefill_graph_and_with_all_positions(world_model, tmp_path):
    """The prompt goes through the step graph when a folder has no prefill graph, and through the last position of
    a `--prefill all` graph's logits: the same greedy text as the Python runtime either way."""
    from rwkv_deploy import export

    prompt, n = "Hello 数据科学", 12
    folders = [export(world_model[0], tmp_path / str(mode), prefill=mode) for mode in (None, "all")]
    assert not (folders[0] / "prefill.onnx").exists()
    results = batch([["run", f, "--prompt", prompt, "--max-tokens", n, "--temperature", 0] for f in folders])
    for folder, r in zip(folders, results):
        assert r["rc"] == 0, r["stderr"]
        assert r["stdout"] == prompt + python_greedy(folder, prompt, n) + "\n", (folder.name, r["stdout"])


def test_run_process_streams_text_and_stats(world_model):
    r = cs("run", world_model[1], "--prompt", "Hello", "--max-tokens", 8, "--seed", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n"), r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "tokens/s" in r.stderr, r.stderr


# --- tokenizers ----------------------------------------------------------------------------------------------


def _tokenize(path: Path, inputs: list) -> list[dict]:
    r = cs("tokenize", "--tokenizer", path, input="\n".join(json.dumps(i) for i in inputs))
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == len(inputs)
    return out


def _parity(tok, path: Path):
    """CORPUS encoded to the same ids; streamed pieces identical to Python's TextStream, piece for piece, for those
    ids and for random id sequences (which split characters and make invalid UTF-8); every id's bytes identical."""
    import numpy as np

    from rwkv_deploy.runtime.tokenizer import TextStream

    python_ids = [tok.encode(t) for t in CORPUS]
    rng = np.random.default_rng(0)
    valid = [i for i in range(tok.vocab_size) if _bytes(tok, i) is not None]
    random_ids = [[int(i) for i in rng.choice(valid, 40)] for _ in range(20)]
    every = [{"ids": [i]} for i in range(tok.vocab_size + 2)]
    out = _tokenize(path, CORPUS + [{"ids": ids} for ids in python_ids + random_ids] + every)
    enc, dec, rnd, one = (out[:len(CORPUS)], out[len(CORPUS):2 * len(CORPUS)],
                          out[2 * len(CORPUS):2 * len(CORPUS) + len(random_ids)], out[-len(every):])
    for text, ids, e in zip(CORPUS, python_ids, enc):
        assert "error" not in e, e
        assert e["ids"] == ids, (text[:40], e["ids"][:20], ids[:20])
    for ids, o in zip(python_ids + random_ids, dec + rnd):
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids] + [stream.finish()]
        decoded = tok.decode(ids)
        assert o["pieces"] == pieces, (o["pieces"], pieces)  # held back exactly where Python holds back
        assert o["text"] == o["decoded"] == decoded, o
        assert o["bytes"] == tok.decode_bytes(ids).hex()
    for text, ids, e in zip(CORPUS, python_ids, enc):
        if tok.decode(ids) == text:  # all but "e\u0301": the 20B vocabulary NFC-normalises it to "é"
            assert e["text"] == text, (e["text"], text)
    for i, o in enumerate(one):  # every id's bytes; ids the tokenizer lacks are an error, not silently dropped
        b = _bytes(tok, i)
        if b is None:
            assert "not in" in o.get("error", ""), (i, o)
        else:
            assert o.get("bytes") == b.hex(), (i, o, b)


def _bytes(tok, i: int) -> bytes | None:
    from rwkv_deploy.errors import RWKVDeployError

    try:
        return tok.decode_bytes([i])
    except RWKVDeployError:
        return None


def test_world_tokenizer_parity(world):
    from rwkv_deploy.runtime.tokenizer import world_vocab_path

    assert len(world.id_to_bytes) == 65529  # every vocabulary line is compared, through the bytes of its id
    _parity(world, world_vocab_path())


def test_hf_tokenizer_parity():
    from rwkv_deploy.runtime.tokenizer import HFTokenizer

    path = hf_20b_tokenizer()
    tok = HFTokenizer(path)
    _parity(tok, path)
    r = cs("tokenize", "--tokenizer", path, input="")
    assert r.returncode == 0 and f"{tok.vocab_size} ids" in r.stderr, r.stderr  # what sampling is cut to


def test_tokenize_bad_input(tmp_path):
    one_error_line(cs("tokenize", "--tokenizer", tmp_path / "nope.txt", input=""), "not found")
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'a' 1\n2 'b 1\n")
    one_error_line(cs("tokenize", "--tokenizer", bad, input=""), "vocab.txt:2")
    wrong_length = tmp_path / "len.txt"
    wrong_length.write_text("1 'ab' 3\n")
    one_error_line(cs("tokenize", "--tokenizer", wrong_length, input=""), "has 2 bytes, the file says 3")
    (tmp_path / "x.bin").write_bytes(b"\0")
    one_error_line(cs("tokenize", "--tokenizer", tmp_path / "x.bin", input=""), "unknown tokenizer file type")
    wordpiece = tmp_path / "wp.json"
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    one_error_line(cs("tokenize", "--tokenizer", wordpiece, input=""), "WordPiece")
    good = tmp_path / "good.txt"
    good.write_text("1 'a' 1\n")
    r = cs("tokenize", "--tokenizer", good, input='[1,\n{"ids": [1, -1]}\n{"ids": [5]}\n"a"\n')
    assert r.returncode == 0, r.stderr  # a line that fails is an error object, the others still run
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert "not valid JSON" in out[0]["error"] and "-1" in out[1]["error"] and "token id 5" in out[2]["error"], out
    assert out[3]["ids"] == [1] and out[3]["text"] == "a", out
