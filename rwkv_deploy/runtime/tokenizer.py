"""Tokenizers: the RWKV World vocabulary (greedy longest match over bytes, spec §9) and HF tokenizers JSON.

Both kinds give `encode(text) -> ids`, `decode(ids) -> str` and `decode_bytes(ids) -> bytes`; `TextStream` turns
token ids into text one token at a time, holding back a character whose UTF-8 bytes are split across tokens.
"""
from __future__ import annotations

import ast
import codecs
import json
from pathlib import Path

from ..errors import RWKVDeployError

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"


def _read_text(path: Path, what: str) -> str:
    """The file as UTF-8 text, or an RWKVDeployError naming it (never a raw OSError/UnicodeDecodeError)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RWKVDeployError(f"cannot read {what} {path}: {e.strerror or e}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RWKVDeployError(f"{what} {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                              f"is it the right file?")


class WorldTokenizer:
    """Ids 1..65529 from `<id> <python literal> <byte length>` lines; id 0 is end-of-text and has no bytes."""

    kind = "rwkv-world"
    bytes_per_token = True  # decode_bytes(ids) is the concatenation of each id's bytes: TextStream can go id by id

    def __init__(self, path: str | Path):
        path = Path(path)
        self.id_to_bytes: dict[int, bytes] = {}
        self.trie: dict = {}  # byte -> (child trie, token id or None)
        for n, line in enumerate(_read_text(path, "RWKV World vocabulary").splitlines(), 1):
            if not line.strip():
                continue
            try:
                idx = int(line[: line.index(" ")])
                lit = line[line.index(" ") + 1: line.rindex(" ")]
                length = int(line[line.rindex(" ") + 1:])
                tok = ast.literal_eval(lit)
                if not isinstance(tok, (str, bytes)):
                    raise ValueError(f"{lit} is neither a str nor a bytes literal")
                tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            except (ValueError, SyntaxError, UnicodeEncodeError) as e:
                raise RWKVDeployError(f"{path}:{n}: not an RWKV World vocabulary line ({e})")
            if len(tok) != length:
                raise RWKVDeployError(f"{path}:{n}: token {idx} has {len(tok)} bytes, the file says {length}")
            self.id_to_bytes[idx] = tok
            node = self.trie
            for i, b in enumerate(tok):
                child, tid = node.get(b, ({}, None))
                node[b] = (child, idx if i == len(tok) - 1 else tid)
                node = child
        if not self.id_to_bytes:
            raise RWKVDeployError(f"{path} has no tokens; expected an RWKV World vocabulary")
        self.vocab_size = max(self.id_to_bytes) + 1

    def encode(self, text: str) -> list[int]:
        src, ids, i = text.encode("utf-8"), [], 0
        while i < len(src):
            node, j, best, best_end = self.trie, i, None, i
            while j < len(src) and src[j] in node:  # walk as deep as the bytes allow, remember the last token
                node, tid = node[src[j]]
                j += 1
                if tid is not None:
                    best, best_end = tid, j
            if best is None:
                raise RWKVDeployError(f"byte {src[i]:#x} has no token in this vocabulary")
            ids.append(best)
            i = best_end
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of the tokens. Id 0 (end of text) has none; any other id outside the vocabulary raises."""
        out = []
        for i in ids:
            b = b"" if i == 0 else self.id_to_bytes.get(int(i))
            if b is None:  # a silent b"" here would drop text (models have more logits than the vocabulary has ids)
                raise RWKVDeployError(f"token id {i} is not in the RWKV World vocabulary (ids 1..{self.vocab_size - 1}, "
                                      f"0 = end of text)")
            out.append(b)
        return b"".join(out)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, byte number n of the others
    (in byte order) for chr(256 + n). Byte-level BPE vocabularies (GPT-2, GPT-NeoX / 20B) spell tokens this way."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


_BYTE_OF_CHAR = _byte_level_alphabet()


def _is_byte_level(decoder: dict | None) -> bool:
    """True for a ByteLevel decoder, or a Sequence of nothing but ByteLevel decoders. A Sequence that also strips or
    replaces text changes it in ways the per-token byte mapping would not reproduce, so it takes the str path."""
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        parts = decoder.get("decoders") or []
        return bool(parts) and all(_is_byte_level(d) for d in parts)
    return decoder.get("type") == "ByteLevel"


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (RWKV-4 Pile models ship GPT-NeoX-20B's byte-level BPE).

    With a ByteLevel decoder every token stands for fixed bytes, so `decode_bytes` returns them exactly, including
    half a character (what streaming needs). Other decoders (Metaspace, WordPiece, byte fallback ...) depend on
    the neighbouring tokens (a leading space dropped at the start, `##` joined), which only the library's own
    decoder gets right: for them `decode_bytes` is the UTF-8 of `decode`, and `TextStream` diffs whole decodes.
    """

    kind = "hf-tokenizers"

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RWKVDeployError("the tokenizers package is needed for this export: pip install tokenizers")
        text = _read_text(path, "tokenizer file")
        try:
            self.tok = Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a plain Exception
            raise RWKVDeployError(f"{path} is not a tokenizers JSON file ({str(e)[:200]})")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bytes_per_token = _is_byte_level(json.loads(self.tok.to_str()).get("decoder"))
        # Added/special tokens are stored as plain text, not in the byte-level alphabet.
        self._added = {i: t.content.encode("utf-8") for i, t in self.tok.get_added_tokens_decoder().items()}
        self._bytes: dict[int, bytes] = {}  # token id -> bytes, filled as ids are seen

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def _token(self, i) -> str:
        i = int(i)
        s = self.tok.id_to_token(i) if 0 <= i < 2 ** 32 else None
        if s is None:  # the library itself skips unknown ids silently, which would drop text
            raise RWKVDeployError(f"token id {i} is not in this tokenizer's vocabulary ({self.vocab_size} tokens)")
        return s

    def _token_bytes(self, i) -> bytes:
        i = int(i)  # numpy integers from sampling
        b = self._bytes.get(i)
        if b is None:
            s = self._token(i)
            b = self._added.get(i)
            if b is None:
                try:
                    b = bytes(_BYTE_OF_CHAR[c] for c in s)
                except KeyError:  # a character outside the alphabet: its own UTF-8, as the ByteLevel decoder does
                    b = s.encode("utf-8")
            self._bytes[i] = b
        return b

    def decode_bytes(self, ids: list[int]) -> bytes:
        if self.bytes_per_token:
            return b"".join(self._token_bytes(i) for i in ids)
        for i in ids:
            self._token(i)  # only to reject unknown ids
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False).encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class TextStream:
    """Token ids in, text out, one token at a time; the pieces join to `tok.decode(all ids)`.

    A character may be split across tokens (a CJK character or an emoji is 3-4 bytes; byte-level vocabularies
    often give it one token per byte). The incremental UTF-8 decoder holds back an unfinished character (at most
    3 bytes) until its next bytes arrive, and writes U+FFFD only for bytes that can never become valid.
    """

    def __init__(self, tok):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # only kept for tokenizers whose text depends on the neighbouring tokens
        self._sent = ""

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes ('' while a character is unfinished)."""
        if getattr(self.tok, "bytes_per_token", True):
            return self._utf8.decode(self.tok.decode_bytes([token_id]))
        # Context-dependent decoders: decode everything and send what is new. A decoder with byte fallback shows
        # an unfinished character as a trailing U+FFFD, so that one is held back until the next token.
        self._ids.append(token_id)
        text = self.tok.decode(self._ids)
        stable = text[:-1] if text.endswith("\ufffd") else text
        if len(stable) <= len(self._sent):
            return ""
        piece, self._sent = stable[len(self._sent):], stable
        return piece

    def finish(self) -> str:
        """What is still held back, with U+FFFD for a character that never got finished."""
        if getattr(self.tok, "bytes_per_token", True):
            return self._utf8.decode(b"", final=True)
        text = self.tok.decode(self._ids)
        piece, self._sent = text[len(self._sent):], text
        return piece


KINDS = {WorldTokenizer.kind: WorldTokenizer, HFTokenizer.kind: HFTokenizer}


def tokenizer_kind(path: Path) -> str:
    """By file name: *.json is an HF tokenizers file, *.txt an RWKV World vocabulary."""
    if path.suffix == ".json":
        return HFTokenizer.kind
    if path.suffix == ".txt":
        return WorldTokenizer.kind
    raise RWKVDeployError(f"{path}: unknown tokenizer file type; expected a tokenizers .json or an RWKV World .txt")


def load_tokenizer(path: str | Path, kind: str | None = None):
    path = Path(path)
    if not path.exists():
        raise RWKVDeployError(f"tokenizer file not found: {path}")
    kind = kind or tokenizer_kind(path)
    if kind not in KINDS:
        raise RWKVDeployError(f"unknown tokenizer kind {kind!r} for {path}; known kinds: {', '.join(KINDS)}")
    return KINDS[kind](path)


def default_tokenizer_file(own: Path | None, vocab_size: int) -> Path | None:
    """The tokenizer a checkpoint implies: an HF folder's own tokenizer.json, else the RWKV World vocabulary for
    a vocabulary of 65536 (when the `rwkv` package that ships it is installed); None when neither."""
    if own is not None:
        return Path(own)
    return world_vocab_path() if vocab_size == 65536 else None


def world_vocab_path() -> Path | None:
    """The World vocabulary that ships in the official `rwkv` wheel, if installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("rwkv")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / WORLD_VOCAB
    return p if p.exists() else None


def manifest_tokenizer(manifest):
    """The tokenizer that an export folder ships, as its manifest (runtime.manifest.Manifest) names it."""
    entry = manifest.get("tokenizer")
    if not entry:
        raise RWKVDeployError(f"{manifest.folder} has no tokenizer; re-export with --tokenizer FILE")
    return load_tokenizer(manifest.path("tokenizer.file", entry["file"]), entry["kind"])
