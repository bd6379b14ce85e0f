"""A small gRPC client for a repository written by `rwkv-deploy triton` (needs `pip install tritonclient grpcio`).

    c = SequenceClient("127.0.0.1:8001")
    logits = c.feed(seq_id, prompt_ids, start=True)      # the prompt: one request (python backend) or one per token
    logits = c.feed(seq_id, [next_id])                   # each generated token
    c.end(seq_id)                                        # frees the sequence's state in the server

Thread-safe: one gRPC channel can carry many sequences from many threads.
"""
from __future__ import annotations

import numpy as np


class SequenceClient:
    def __init__(self, url: str, model: str = "rwkv"):
        import tritonclient.grpc as grpcclient

        self._grpc, self.model = grpcclient, model
        self.client = grpcclient.InferenceServerClient(url)
        config = self.client.get_model_config(model, as_json=True)["config"]
        self.tokens, self.logits = config["input"][0]["name"], config["output"][0]["name"]
        # dims [-1]: the model takes a whole prompt in one request (python backend); [1]: one token per request
        self.takes_prompts = [int(d) for d in config["input"][0]["dims"]] == [-1]
        self.vocab_size = int(config["output"][0]["dims"][0])

    def _infer(self, sequence_id: int, tokens: np.ndarray, start: bool, end: bool) -> np.ndarray:
        g = self._grpc
        inp = g.InferInput(self.tokens, list(tokens.shape), "INT64")
        inp.set_data_from_numpy(tokens)
        result = self.client.infer(self.model, [inp], outputs=[g.InferRequestedOutput(self.logits)],
                                   sequence_id=sequence_id, sequence_start=start, sequence_end=end)
        return result.as_numpy(self.logits)[0]

    def feed(self, sequence_id: int, tokens, start: bool = False, end: bool = False) -> np.ndarray:
        """Send token ids of sequence `sequence_id` (> 0); returns the logits [V] after the last one."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("feed needs at least one token")
        if self.takes_prompts:
            return self._infer(sequence_id, ids[None], start, end)
        for k, t in enumerate(ids):  # one request per token; Triton batches them with other sequences' tokens
            logits = self._infer(sequence_id, np.array([[t]], np.int64), start and k == 0, end and k == ids.size - 1)
        return logits

    def end(self, sequence_id: int, token: int = 0) -> None:
        """End the sequence (Triton needs a request to carry the end flag; its logits are ignored)."""
        self.feed(sequence_id, [token], end=True)

    def close(self) -> None:
        self.client.close()
