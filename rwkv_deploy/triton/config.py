"""config.pbtxt text for a Triton model serving an export (model_config.proto, text format), from its manifest.

The manifest maps onto Triton almost one to one: the step graph's token input and logits output are the model's
input and output, and every state table entry is a `sequence_batching.state` pair (implicit state) whose initial
value is either zeros or a raw data file beside the config (v4's pp at -1e30, state-tuned models' shipped rows).
"""
from __future__ import annotations

import json

from ..runtime.manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt", "python")
STRATEGIES = ("oldest", "direct")
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
INITIAL_STATE_DIR = "initial_state"  # Triton reads initial_state.data_file from <model>/initial_state/
READY = "READY"  # the direct strategy's control input, read by the guarded graph (graph.py)
# A chat user reads and types between turns: Triton aborts a sequence (and drops its state) after this much idle
# time; its default (1 s) would end every conversation between two turns.
IDLE_SECONDS = 600
# oldest strategy: sequences that may be open at once per model instance (more wait in Triton's backlog until one
# ends). An RWKV state is small (layers x a few vectors/matrices), so many open sequences cost little memory.
CANDIDATES_PER_BATCH_SLOT = 16
QUEUE_DELAY_US = 500  # how long the oldest strategy waits to fill a batch


def _q(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string for our names


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def initial_state_file(name: str) -> str:
    """The data file (under initial_state/) that holds one batch row of a state's initial value."""
    return f"{name}.bin"


def state_needs_file(entry) -> bool:
    return bool(entry.init_file) or float(entry.init) != 0.0


def _state_block(entry) -> str:
    dtype, dims = TRITON_TYPES[entry.dtype], _dims(entry.shape[1:])
    init = (f"data_file: {_q(initial_state_file(entry.input))}" if state_needs_file(entry) else "zero_data: true")
    return (f"    {{\n      input_name: {_q(entry.input)}\n      output_name: {_q(entry.output)}\n"
            f"      data_type: {dtype}\n      dims: {dims}\n"
            f"      initial_state: {{ data_type: {dtype} dims: {dims} {init} name: {_q(entry.input)} }}\n    }}")


def _control(name: str, kind: str, data_type: str | None = None) -> str:
    how = f"data_type: {data_type}" if data_type else "int32_false_true: [ 0, 1 ]"
    return f"    {{ name: {_q(name)} control [ {{ kind: {kind} {how} }} ] }}"


def config_text(manifest: Manifest, name: str, backend: str, max_batch: int, strategy: str,
                parameters: dict[str, str] | None = None) -> str:
    """The config.pbtxt of model `name` serving `manifest`'s step graph (onnxruntime/tensorrt: through implicit
    state) or the Python-backend model (python: state kept per correlation id by model.py)."""
    g = manifest.graph("step")
    vocab = int(manifest["vocab_size"])
    lines = [f"# written by rwkv-deploy triton from an RWKV-{manifest['rwkv_version']} export "
             f"({manifest['n_layer']} layers x {manifest['n_embd']}, {manifest['precision']})",
             f"name: {_q(name)}", f"backend: {_q(backend)}", f"max_batch_size: {max_batch}"]
    if backend == "python":
        # tokens [1, T] per request (T > 1: a prompt, run with the prefill graph); logits of the last position
        lines.append(f"input [\n  {{ name: {_q(g['tokens'])} data_type: TYPE_INT64 dims: [ -1 ] }}\n]")
    else:
        # the graph takes tokens [batch]: each request sends [1, 1], reshaped to drop the per-request dim
        lines.append(f"input [\n  {{ name: {_q(g['tokens'])} data_type: TYPE_INT64 dims: [ 1 ] "
                     "reshape: { shape: [ ] } }\n]")
    lines.append(f"output [\n  {{ name: {_q(g['logits'])} data_type: TYPE_FP32 dims: [ {vocab} ] }}\n]")
    seq = [f"  max_sequence_idle_microseconds: {IDLE_SECONDS * 1_000_000}"]
    if strategy == "oldest":
        seq.append(f"  oldest {{ max_candidate_sequences: {max_batch * CANDIDATES_PER_BATCH_SLOT} "
                   f"preferred_batch_size: [ {max_batch} ] max_queue_delay_microseconds: {QUEUE_DELAY_US} }}")
    else:
        seq.append("  direct { }")
    if backend == "python":
        # model.py keeps each sequence's state under its correlation id: it needs all three
        controls = [_control("START", "CONTROL_SEQUENCE_START"), _control("END", "CONTROL_SEQUENCE_END"),
                    _control("CORRID", "CONTROL_SEQUENCE_CORRID", "TYPE_UINT64")]
    elif strategy == "direct":
        # idle slots carry arbitrary token ids: the guarded graph feeds them token 0 instead (graph.py). START,
        # END and CORRID are not needed: implicit state starts from initial_state and is dropped at the end.
        controls = [_control(READY, "CONTROL_SEQUENCE_READY")]
    else:
        controls = []
    if controls:
        seq.append("  control_input [\n" + ",\n".join(controls) + "\n  ]")
    if backend != "python":
        seq.append("  state [\n" + ",\n".join(_state_block(s) for s in manifest.state) + "\n  ]")
    lines.append("sequence_batching {\n" + "\n".join(seq) + "\n}")
    kind = "KIND_CPU" if backend == "python" else "KIND_GPU"
    lines.append(f"instance_group [ {{ kind: {kind} count: 1 }} ]")
    if parameters:
        lines.append("parameters [\n" + ",\n".join(
            f"  {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}" for k, v in parameters.items()) + "\n]")
    return "\n".join(lines) + "\n"
