"""The step graph as Triton serves it: token ids made safe before they reach the embedding Gather.

Triton's `direct` strategy runs every batch slot, and the slots without a request carry whatever ids are in
their buffers: an id outside [0, vocab) crashes a CPU Gather (and reads out of bounds on a GPU), failing every
sequence batched with it. The repository's copy of the graph (never the export's) therefore gets, in front of
everything that reads the tokens:

    safe = Min(Max(tokens, 0), vocab - 1)              # any id: in range (a real out-of-range id harms only its row)
    safe = Where(READY[:, 0] != 0, safe, 0)            # direct strategy: idle slots run token 0

Each batch row of an RWKV graph is computed independently, so what idle rows hold cannot change real rows.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import RWKVDeployError
from .config import READY


def guard_tokens(src: Path, dst: Path, tokens: str, vocab_size: int, ready: bool) -> None:
    """Write `src` (an ONNX graph; external weights stay referenced by their relative path) to `dst` with the
    token guard above; with `ready`, also a READY input [batch, 1] int32 (Triton's CONTROL_SEQUENCE_READY)."""
    import onnx
    from google.protobuf.message import DecodeError  # onnx's own dependency
    from onnx import TensorProto, helper

    try:
        model = onnx.load(str(src), load_external_data=False)  # the weights file is copied, never loaded here
    except DecodeError as e:  # truncated or not ONNX at all: the export is damaged, not this command
        raise RWKVDeployError(f"{src} is not a readable ONNX graph ({e}); re-export the model")
    except OSError as e:
        raise RWKVDeployError(f"cannot read {src} ({e.strerror or e}); re-export the model")
    g = model.graph
    token_input = next((i for i in g.input if i.name == tokens), None)
    if token_input is None:
        raise RWKVDeployError(f"{src} has no input {tokens!r}; re-export the model")
    if any(o.name == tokens for o in g.output):
        raise RWKVDeployError(f"{src} returns its token input {tokens!r} as an output; re-export the model")
    batch_dim = token_input.type.tensor_type.shape.dim[0]
    prefix = "rwkv_deploy_guard"
    safe = f"{prefix}.tokens"
    consts = [helper.make_tensor(f"{prefix}.lo", TensorProto.INT64, [], [0]),
              helper.make_tensor(f"{prefix}.hi", TensorProto.INT64, [], [vocab_size - 1])]
    nodes = [helper.make_node("Max", [tokens, f"{prefix}.lo"], [f"{prefix}.floored"], name=f"{prefix}.max"),
             helper.make_node("Min", [f"{prefix}.floored", f"{prefix}.hi"],
                              [f"{prefix}.clamped" if ready else safe], name=f"{prefix}.min")]
    if ready:
        consts.append(helper.make_tensor(f"{prefix}.axis", TensorProto.INT64, [1], [1]))
        nodes += [helper.make_node("Squeeze", [READY, f"{prefix}.axis"], [f"{prefix}.ready"], name=f"{prefix}.squeeze"),
                  helper.make_node("Cast", [f"{prefix}.ready"], [f"{prefix}.is_ready"], to=TensorProto.BOOL,
                                   name=f"{prefix}.cast"),
                  helper.make_node("Where", [f"{prefix}.is_ready", f"{prefix}.clamped", f"{prefix}.lo"], [safe],
                                   name=f"{prefix}.where")]
        ready_input = helper.make_tensor_value_info(READY, TensorProto.INT32, [None, 1])
        ready_input.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)  # the same symbolic batch as the tokens
        g.input.append(ready_input)
    for node in g.node:  # every reader of the tokens reads the guarded ids instead
        for k, name in enumerate(node.input):
            if name == tokens:
                node.input[k] = safe
    g.initializer.extend(consts)
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)  # the guard first: nodes stay topologically sorted
    onnx.save(model, str(dst))
