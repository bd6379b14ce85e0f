"""The PyTorch reference (models.model.RWKV) behind the Session contract, so that a checkpoint runs, generates
and is compared exactly like an export. The only runtime module that imports torch (the ORT path needs none)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..errors import RWKVDeployError
from ..exporters.onnx_graph import state_io_names
from ..models.checkpoint import Checkpoint, load_checkpoint
from ..models.model import DTYPES, RWKV
from ..models.quant import PRECISIONS, manifest_quant
from .contract import Session, State, StateSpec
from .manifest import Manifest
from .tokenizer import default_tokenizer_file, load_tokenizer



class TorchSession(Session):
    """`TorchSession(checkpoint, dtype, device, wkv)`: the reference model on `device`, its state kept there as
    torch tensors between calls and named like the export's state inputs (exporters.onnx_graph.state_io_names).

    checkpoint: a path (anything load_checkpoint reads) or a loaded Checkpoint. tokenizer: a file, a loaded
    tokenizer, or None to find it as export does (an HF folder's tokenizer.json; the World vocabulary for vocab
    65536). prefill_positions "all" makes prefill return every position's logits, like a `--prefill all` export.
    threads sets torch's thread count, which is process-wide. quant (models.quant.Quant): compute as an int8/int4
    export does.
    """

    has_prefill = True  # the model runs a whole sequence in one call

    def __init__(self, checkpoint: str | Path | Checkpoint, dtype: str = "float32", device: str = "cpu",
                 wkv: str = "portable", *, tokenizer=None, prefill_positions: str = "last", threads: int | None = None,
                 quant=None):
        if dtype not in DTYPES:
            raise RWKVDeployError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if prefill_positions not in ("last", "all"):
            raise RWKVDeployError(f"prefill_positions must be 'last' or 'all', got {prefill_positions!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RWKVDeployError(f"this torch ({torch.__version__}) sees no CUDA device; use the cpu")
        if threads:
            torch.set_num_threads(threads)
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.model = RWKV(ckpt, DTYPES[dtype], wkv=wkv, quant=quant).eval().to(self.device)
        names, _ = state_io_names(self.model)
        self.state_specs = [StateSpec(n, ("batch", *s.shape), str(s.dtype).removeprefix("torch."))
                            for n, s in zip(names, self.model.states)]
        self.vocab_size = ckpt.dims.vocab_size
        self.prefill_positions = prefill_positions
        self.backend = f"torch {self.device} {dtype}"
        self.manifest = None
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            # what the lookup needs, without the raw weights (the model holds its own converted copy)
            self._tokenizer_from = (dataclasses.replace(ckpt, weights={}), tokenizer)
        else:
            self._tokenizer = tokenizer

    @classmethod
    def for_export(cls, manifest: Manifest, checkpoint: Checkpoint | None = None, device: str = "cpu",
                   threads: int | None = None) -> TorchSession:
        """The reference of an export folder: its source checkpoint (or `checkpoint`) at the export's precision,
        with the folder's tokenizer and prefill positions."""
        folder, precision = manifest.folder, manifest["precision"]
        if precision not in PRECISIONS:
            raise RWKVDeployError(f"{folder} is a {precision} export; the torch backend runs "
                                  f"{', '.join(PRECISIONS)} exports")
        if checkpoint is None:
            src = Path(manifest["source"]["path"])
            if not src.exists():
                raise RWKVDeployError(f"{folder} was exported from {src}, which is not here; the torch backend runs "
                                      "that checkpoint (Python: TorchSession(CKPT, dtype=...))")
            checkpoint = load_checkpoint(src)
            if checkpoint.sha256 != manifest["source"]["sha256"]:
                raise RWKVDeployError(f"{src} changed since {folder} was exported from it (sha256 "
                                      f"{checkpoint.sha256[:12]}… vs {manifest['source']['sha256'][:12]}…)")
        entry = manifest.get("tokenizer")
        tokenizer = manifest.path("tokenizer.file", entry["file"]) if entry else None
        positions = manifest["graphs"].get("prefill", {}).get("positions", "last")
        dtype = PRECISIONS[precision][0]
        sess = cls(checkpoint, str(dtype).removeprefix("torch."), device, tokenizer=tokenizer,
                   prefill_positions=positions, threads=threads, quant=manifest_quant(manifest))  # the export's own
        sess.manifest = manifest
        return sess

    def _initial(self, batch: int) -> dict:
        return dict(zip(self.state_names, self.model.init_state(batch)))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def _to_host(self, value: torch.Tensor) -> np.ndarray:
        return value.detach().cpu().numpy().copy()  # .cpu() of a cpu tensor is the tensor itself: copy

    def _run(self, graph: str, tokens: np.ndarray, state: State) -> tuple[np.ndarray, dict]:
        with torch.no_grad():
            tok = torch.from_numpy(tokens).to(self.device)  # [B] or [B, T]
            if graph == "step":
                logits, new = self.model.step(tok, list(state.values()))  # [B, V]
            else:
                last = self.prefill_positions == "last"
                logits, new = self.model.forward(tok, list(state.values()), last_only=last)  # [B, T or 1, V]
                logits = logits[:, 0] if last else logits
        return logits.cpu().numpy(), dict(zip(self.state_names, new))

    def _load_tokenizer(self):
        ckpt, given = self._tokenizer_from
        if given is not None:
            tok = load_tokenizer(given)
            if tok.vocab_size > self.vocab_size:
                raise RWKVDeployError(f"tokenizer {given} has {tok.vocab_size} tokens but the model's vocab is "
                                      f"{self.vocab_size}; pass the tokenizer the model was trained with")
            return tok
        path = default_tokenizer_file(ckpt.tokenizer_file, self.vocab_size)  # the rule export follows
        if path is None:
            raise RWKVDeployError(f"no tokenizer found for {ckpt.path} (vocab {self.vocab_size}): pass "
                                  "TorchSession(..., tokenizer=FILE), or `pip install rwkv` for the World vocabulary")
        return load_tokenizer(path)
