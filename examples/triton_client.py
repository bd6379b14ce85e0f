"""A conversation with an RWKV model served by Triton (a repository from `rwkv-deploy triton`), over gRPC.

    rwkv-deploy triton OUT -o repo --backend python          # or onnxruntime / tensorrt on GPUs (docs/triton.md)
    tritonserver --model-repository repo                      # gRPC on port 8001
    python examples/triton_client.py --url 127.0.0.1:8001 --export OUT "Hello!" "Tell me more."

Each argument is one user turn; the whole conversation is one Triton sequence (one correlation id), so the server
keeps the model's state between turns and only the new tokens travel. Needs `pip install tritonclient grpcio`
and rwkv-deploy (for the export's tokenizer and the sampler; no torch, no onnxruntime needed here).
"""
import argparse
import random
import sys

import numpy as np

from rwkv_deploy.runtime.generate import sample
from rwkv_deploy.runtime.manifest import read_manifest
from rwkv_deploy.runtime.tokenizer import TextStream, manifest_tokenizer
from rwkv_deploy.triton.client import SequenceClient


def reply(client: SequenceClient, seq: int, tok, logits: np.ndarray, rng, args) -> str:
    """Sample until the model ends its turn (a blank line or end-of-text); every sampled token is sent to the
    server, so the sequence's state there holds the whole conversation."""
    stream, text = TextStream(tok), ""
    for _ in range(args.max_tokens):
        nxt = sample(logits[:tok.vocab_size], rng, args.temperature, args.top_p)
        if nxt == 0:  # end of text in RWKV vocabularies
            break
        piece = stream.push(nxt)
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
        logits = client.feed(seq, [nxt])
        if "\n\n" in text:
            break
    tail = stream.finish()
    sys.stdout.write(tail)
    return text + tail


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("turns", nargs="+", help="the user's messages, one per turn")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton's gRPC address")
    p.add_argument("--model", default="rwkv", help="model name in the repository")
    p.add_argument("--export", required=True, help="the export folder the repository was made from (tokenizer)")
    p.add_argument("--max-tokens", type=int, default=200, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    tok = manifest_tokenizer(read_manifest(args.export))
    client = SequenceClient(args.url, args.model)
    rng = np.random.default_rng(args.seed)
    seq = random.SystemRandom().randrange(1, 2 ** 63)  # a correlation id no other client is likely to use
    said, started = None, False  # said: the last reply (the conversation so far ends with it)
    try:
        for turn in args.turns:
            text = f"User: {turn}\n\nAssistant:"
            print(text, end="", flush=True)
            sep = "" if said is None or said.endswith("\n\n") else "\n\n"
            logits = client.feed(seq, tok.encode(sep + text), start=not started)
            started = True
            said = reply(client, seq, tok, logits, rng, args)
            print()
    finally:
        if started:
            client.end(seq)  # frees the conversation's state in the server now, not at the idle timeout
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
