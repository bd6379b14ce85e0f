"""Tokenizers: the RWKV World vocabulary (greedy longest match over bytes, spec §9) and HF tokenizers JSON."""
from __future__ import annotations

import ast
from pathlib import Path

from ..errors import RWKVDeployError

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"


class WorldTokenizer:
    """Ids 1..65529 from `<id> <python literal> <byte length>` lines; id 0 is end-of-text and has no bytes."""

    kind = "rwkv-world"

    def __init__(self, path: str | Path):
        self.id_to_bytes: dict[int, bytes] = {}
        self.trie: dict = {}  # byte -> (child trie, token id or None)
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                idx = int(line[: line.index(" ")])
                lit = line[line.index(" ") + 1: line.rindex(" ")]
                length = int(line[line.rindex(" ") + 1:])
                tok = ast.literal_eval(lit)
            except (ValueError, SyntaxError) as e:
                raise RWKVDeployError(f"{path}:{n}: not an RWKV World vocabulary line ({e})")
            tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            if len(tok) != length:
                raise RWKVDeployError(f"{path}:{n}: token {idx} has {len(tok)} bytes, the file says {length}")
            self.id_to_bytes[idx] = tok
            node = self.trie
            for i, b in enumerate(tok):
                child, tid = node.get(b, ({}, None))
                node[b] = (child, idx if i == len(tok) - 1 else tid)
                node = child
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
        return b"".join(self.id_to_bytes.get(i, b"") for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    kind = "hf-tokenizers"

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RWKVDeployError("the tokenizers package is needed for this export: pip install tokenizers")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise RWKVDeployError(f"{path} is not a tokenizers JSON file ({str(e)[:200]})")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.tok.decode(ids, skip_special_tokens=False).encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


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
    return KINDS[kind or tokenizer_kind(path)](path)


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
