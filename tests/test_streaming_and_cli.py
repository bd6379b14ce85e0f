"""Byte-exact streaming for every tokenizer kind, tokenizer input errors, and the CLI's error boundary."""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from rwkv_deploy.cli import main
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.runtime.generate import generate
from rwkv_deploy.runtime.tokenizer import HFTokenizer, TextStream, load_tokenizer

TEXTS = ["数据科学", "🙂👍🏽", "Hello 数据科学, 🙂👍🏽!"]
CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog.", "数据科学 and 机器学习 are fields",
          "emoji 🙂👍🏽 and 🙂 again 👍!", "hello there 数据"] * 4


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A GPT-NeoX style tokenizer (byte-level BPE, id 0 = <|endoftext|>), trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|endoftext|>", "<|padding|>"]))
    tok.add_tokens(["    "])  # like 20B's runs of spaces: an added token whose text is outside the byte alphabet
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory):
    """A SentencePiece-style tokenizer: its decoder depends on context (the first token loses its space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        special_tokens=["<|endoftext|>", "<unk>"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)




@pytest.fixture(params=["world", "byte_level", "metaspace"])
def tok(request):
    return request.getfixturevalue(request.param)


def stream(tok, ids):
    s = TextStream(tok)
    return [s.push(i) for i in ids] + [s.finish()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_is_exact(tok, text):
    pieces = stream(tok, tok.encode(text))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_byte_level_splits_characters_and_matches_the_library(byte_level):
    ids = byte_level.encode("飞")  # not in the training text: one token per byte
    assert stream(byte_level, ids) == ["", "", "飞", ""]
    assert byte_level.bytes_per_token
    for text in TEXTS + ["    indented", "<|endoftext|>"]:
        ids = byte_level.encode(text)
        assert byte_level.decode_bytes(ids) == text.encode("utf-8")
        assert byte_level.decode(ids) == byte_level.tok.decode(ids, skip_special_tokens=False)


def test_invalid_bytes_become_replacement_only_when_final(world, byte_level):
    def byte_id(tok, b: int) -> int:
        if tok is world:
            return next(i for i, v in world.id_to_bytes.items() if v == bytes([b]))
        from rwkv_deploy.runtime.tokenizer import _BYTE_OF_CHAR
        return tok.tok.token_to_id(next(c for c, v in _BYTE_OF_CHAR.items() if v == b))

    for tok in (world, byte_level):
        e6, a = byte_id(tok, 0xE6), byte_id(tok, ord("A"))
        assert stream(tok, [e6, a]) == ["", "\ufffdA", ""]  # a lead byte followed by ASCII: never valid
        assert stream(tok, [e6]) == ["", "\ufffd"]  # still unfinished at the end


class ForcedSession:
    """A session whose logits are one-hot on a given token sequence: generation must reproduce it exactly."""

    def __init__(self, tok, forced, vocab=None):
        self.tok, self.forced, self.vocab = tok, list(forced), vocab or tok.vocab_size
        self.steps = 0

    def get_tokenizer(self):
        return self.tok

    def init_state(self, batch):
        return [np.zeros((batch, 1), np.float32)]

    def _logits(self, n):
        logits = np.full((1, self.vocab), -10.0, np.float32)
        logits[0, self.forced[n] if n < len(self.forced) else 0] = 10.0
        return logits

    def forward(self, tokens, state):
        return self._logits(0), state

    def step(self, tokens, state):
        self.steps += 1
        return self._logits(self.steps), state


@pytest.mark.parametrize("text", TEXTS)
def test_generate_streams_exact_text(tok, text):
    ids = tok.encode(text)
    pieces = list(generate(ForcedSession(tok, ids + [0]), "Hello", max_tokens=len(ids) + 5, temperature=0))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert all(pieces)  # no empty pieces are yielded
    # Sampling at temperature 1 with one-hot logits this sharp picks the same tokens.
    assert "".join(generate(ForcedSession(tok, ids + [0]), "Hello", max_tokens=50, seed=3)) == text


def test_out_of_range_ids_raise(world, byte_level, metaspace):
    assert world.decode_bytes([0]) == b""  # end of text has no bytes
    for tok in (world, byte_level, metaspace):
        for bad in (tok.vocab_size + 10, -1, 10 ** 12):
            with pytest.raises(RWKVDeployError, match="not in"):
                tok.decode_bytes([bad])
    # A model with more logits than the vocabulary has ids (World: 65536 vs 65530): those ids are never sampled,
    # even where they are the model's top choice; the next-best id the tokenizer has is taken instead.
    a, b = world.encode("a")[0], world.encode("b")[0]
    sess = ForcedSession(world, [a, 65533, 0], vocab=65536)
    sess._logits = lambda n, f=sess._logits: f(n) + (np.arange(65536) == b) * 5.0  # "b" is the runner-up
    assert "".join(generate(sess, "Hello", max_tokens=3, temperature=0)) == "ab"


def test_prompt_must_be_utf8(world):
    with pytest.raises(RWKVDeployError, match="not valid UTF-8.*0xff"):
        list(generate(ForcedSession(world, [0]), "ab\udcffc", temperature=0))


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(seed=-1),
                                dict(seed=2 ** 63), dict(top_p=0.0), dict(max_tokens=-5)])
def test_generate_rejects_bad_settings(world, kw):
    with pytest.raises(RWKVDeployError):
        list(generate(ForcedSession(world, [0]), "Hello", **kw))


def test_unknown_kind(tmp_path):
    (tmp_path / "v.txt").write_text("1 'a' 1\n")
    with pytest.raises(RWKVDeployError, match="rwkv-world.*hf-tokenizers"):
        load_tokenizer(tmp_path / "v.txt", "sentencepiece")


@pytest.mark.parametrize("name,data", [("vocab.txt", b"1 'a' 1\n2 '\xff\xfe' 2\n"),
                                       ("tokenizer.json", b'{"version": "1.0", "model": "\xff"}')])
def test_tokenizer_file_not_utf8(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(RWKVDeployError, match=f"{name}.*not UTF-8"):
        load_tokenizer(tmp_path / name)


def test_tokenizer_file_unreadable(tmp_path):
    (tmp_path / "dir.txt").mkdir()  # reading a folder is an OSError (running as root defeats chmod)
    with pytest.raises(RWKVDeployError, match="dir.txt"):
        load_tokenizer(tmp_path / "dir.txt")


# --- the CLI ---------------------------------------------------------------------------------------------------

def cli(*args):
    """Like conftest.run_cli, but keeps bytes arguments as bytes (non-UTF-8 argv)."""
    return subprocess.run([sys.executable, "-m", "rwkv_deploy.cli", *args], capture_output=True)


@pytest.mark.parametrize("args", [["--temperature", "nan"], ["--temperature", "-1"], ["--temperature", "inf"],
                                  ["--seed", "-1"], ["--seed", "1.5"], ["--top-p", "0"], ["--top-p", "nan"],
                                  ["--max-tokens", "-5"], ["--prompt", b"\xff\xfe"]])
def test_run_rejects_bad_arguments(tmp_path, args):
    prompt = [] if "--prompt" in args else ["--prompt", "Hello"]
    r = cli("run", str(tmp_path), *prompt, *args)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if "--prompt" in args:
        assert "not valid UTF-8" in err


def _raise(exc):
    def fn(*a, **k):
        logging.getLogger("rwkv_deploy.test").info("opening the folder")
        raise exc
    return fn


@pytest.mark.parametrize("exc,expect", [
    (PermissionError(13, "Permission denied", "/models/x/manifest.json"), "/models/x/manifest.json: Permission denied"),
    (MemoryError(), "out of memory while running `run`"),
    (RecursionError("maximum recursion depth exceeded"), "recursion limit"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "invalid start byte"),
    (RWKVDeployError("bad folder"), "bad folder"),
])
def test_boundary_errors_are_one_line(monkeypatch, capsys, tmp_path, exc, expect):
    import rwkv_deploy.runtime.session as session

    monkeypatch.setattr(session, "open_session", _raise(exc))
    assert main(["run", str(tmp_path), "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"{expect}\n") or expect in err.splitlines()[-1]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]
    with pytest.raises(type(exc)):  # --debug shows the real exception
        main(["--debug", "run", str(tmp_path), "--prompt", "Hello"])


def test_main_twice_does_not_duplicate_logs(monkeypatch, capsys, tmp_path):
    import rwkv_deploy.runtime.session as session

    monkeypatch.setattr(session, "open_session", _raise(RWKVDeployError("stop")))
    log = logging.getLogger("rwkv_deploy")
    handlers, level = list(log.handlers), log.level
    for _ in range(2):
        assert main(["run", str(tmp_path), "--prompt", "Hello"]) == 2
        assert capsys.readouterr().err.splitlines() == ["opening the folder", "error: stop"]
    assert log.handlers == handlers and log.level == level  # main() leaves the logger as it found it
