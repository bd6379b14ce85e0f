"""Tracing the reference model into ONNX graphs with the state as explicit inputs and outputs."""
from __future__ import annotations

import hashlib
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..models.model import RWKV

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 ** 31 - 1  # a single .onnx file cannot exceed 2 GiB
EXTERNAL_THRESHOLD = 1_800_000_000  # weights above this go to external data automatically
TOKENS, LOGITS = "tokens", "logits"
WEIGHTS_FILE = "weights.onnx.data"


class WeightFile:
    """The external-data file that the graphs of one export share. Each distinct tensor is stored once, found by
    its bytes: the step and prefill graphs hold the same weights, which would otherwise double the folder."""

    ALIGN = 4096  # page-aligned offsets let a runtime map each tensor instead of copying it
    MIN_BYTES = 1024  # smaller tensors stay inside the graph

    def __init__(self, path: Path):
        self.path, self.stored = path, {}  # sha256 of the bytes -> (offset, length)

    def take(self, graph) -> tuple[int, int]:
        """Move the graph's initializers (raw_data of at least MIN_BYTES) into the file; returns the bytes moved
        and the bytes the file grew by (tensors it did not hold yet)."""
        from onnx.external_data_helper import set_external_data

        moved = added = 0
        with open(self.path, "ab") as f:
            for t in graph.initializer:
                if len(t.raw_data) < self.MIN_BYTES:
                    continue
                key = hashlib.sha256(t.raw_data).digest()
                if key not in self.stored:
                    f.write(b"\0" * (-f.tell() % self.ALIGN))
                    self.stored[key] = (f.tell(), len(t.raw_data))
                    f.write(t.raw_data)
                    added += len(t.raw_data)
                moved += len(t.raw_data)
                set_external_data(t, self.path.name, *self.stored[key])
                t.ClearField("raw_data")
        return moved, added


def state_io_names(model: RWKV) -> tuple[list[str], list[str]]:
    """Graph input and output names for each state tensor, in state-table order."""
    return [s.name for s in model.states], [s.name.replace("state.", "state_out.", 1) for s in model.states]


class StepGraph(nn.Module):
    """forward(tokens [B], *state) -> (logits [B, V], *state'): one decoding step."""

    def __init__(self, model: RWKV):
        super().__init__()
        self.model = model

    def forward(self, tokens, *state):
        logits, new = self.model.step(tokens, list(state))
        return (logits, *new)


class PrefillGraph(nn.Module):
    """forward(tokens [B, T], *state) -> (logits, *state'): a whole prompt at once.

    logits are those of the last position [B, V], or with all_positions of every position [B, T, V].
    """

    def __init__(self, model: RWKV, all_positions: bool = False):
        super().__init__()
        self.model, self.all_positions = model, all_positions

    def forward(self, tokens, *state):
        logits, new = self.model(tokens, list(state), last_only=not self.all_positions)
        return (logits if self.all_positions else logits[:, 0], *new)


def export_graph(module: nn.Module, model: RWKV, tokens: torch.Tensor, path: Path, opset: int,
                 external_data: bool | None, weights: WeightFile) -> bool:
    """Trace `module` with dynamic batch (and dynamic seq for 2-D tokens); returns whether its weights went to
    `weights` (external data: when asked, or automatically above EXTERNAL_THRESHOLD)."""
    ins, outs = state_io_names(model)
    all_positions = getattr(module, "all_positions", False)
    axes = {TOKENS: {0: "batch", 1: "seq"} if tokens.dim() == 2 else {0: "batch"},
            LOGITS: {0: "batch", 1: "seq"} if all_positions else {0: "batch"}}
    axes.update({n: {0: "batch"} for n in ins + outs})
    example = (tokens, *model.init_state(tokens.shape[0]))
    raw = path.parent / "raw" / path.name
    raw.parent.mkdir()
    custom = {}
    if model.wkv == "fused":
        from ..custom_ops.torch_ops import DOMAIN, OPSET, register_for_export

        register_for_export()
        custom = {DOMAIN: OPSET}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (and helpers it calls) is deprecated, but it is the one that keeps the scripted
        # WKV loops as ONNX Loop nodes with a dynamic trip count.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # no TracerWarning is silenced: one means a wrong graph (tests turn it into an error)
        torch.onnx.export(module, example, str(raw), dynamo=False, opset_version=opset, input_names=[TOKENS, *ins],
                          output_names=[LOGITS, *outs], dynamic_axes=axes, do_constant_folding=True,
                          custom_opsets=custom)
    import onnx

    proto = onnx.load(str(raw))  # also pulls in any per-tensor external files the exporter wrote
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = external_data if external_data is not None else weight_bytes > EXTERNAL_THRESHOLD
    proto.producer_name = "rwkv-deploy"
    if external:
        moved, added = weights.take(proto.graph)
        log.info("weights of %s (%.2f GB): %.2f GB new in %s", path.name, moved / 1e9, added / 1e9, weights.path.name)
    onnx.save_model(proto, str(path))
    del proto
    shutil.rmtree(raw.parent)  # the tracer's file and any per-tensor files it wrote beside it
    onnx.checker.check_model(str(path))  # by path: works past 2 GiB
    return external
