"""Portable graphs, step and prefill, load in TensorRT-RTX (design.md §6): its ONNX parser accepts every node, and
its builder makes engines on a CPU-only machine (running them needs an RTX GPU, which no machine here has).

The prefill graphs once held ONNX Sequence ops (from list appends in the scripted WKV loops), which the parser
rejects; the structural check below says so even where TensorRT-RTX is not installed.
"""
import json

import onnx
import pytest
from conftest import VERSIONS

GRAPHS = {"step": "model.onnx", "prefill": "prefill.onnx"}
SEQUENCE_OPS = {"ConcatFromSequence", "SplitToSequence"}  # plus every op_type that starts with "Sequence"
MAX_BATCH, MAX_SEQ = 4, 64


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13; "
                                                      "scripts/test.sh installs it)")


def all_nodes(graph):
    """Every node of the graph, those inside Loop/If bodies (graph attributes) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                yield from all_nodes(sub)


@pytest.fixture(scope="module")
def logger(trt):
    """One logger for the module: TensorRT keeps the first one a process registers and ignores later ones. It
    keeps warnings and errors, to put in failure messages instead of spilling them on stderr."""
    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.lines.append(f"{severity.name}: {msg}")

    return Log()


def parse(trt, logger, path):
    """(builder, network, parser) with the graph parsed; fails listing every node the parser rejected."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT-RTX networks are always strongly typed
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    rejected = "\n".join(f"  node {e.node()} {e.node_name()!r} ({e.node_operator()}): {e.code()}: {e.desc()}"
                         for e in errors)
    assert ok and not errors, f"TensorRT-RTX cannot parse {path.name}:\n{rejected}"
    return builder, network, parser  # the network's weights live in the parser: keep it until built


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("version", VERSIONS)
def test_no_sequence_ops(exported, version, graph):
    model = onnx.load(str(exported(version) / GRAPHS[graph]))
    found = sorted({n.op_type for n in all_nodes(model.graph) if n.op_type.startswith("Sequence")
                    or n.op_type in SEQUENCE_OPS})
    assert not found, f"{GRAPHS[graph]} of v{version} holds Sequence ops, which TensorRT rejects: {found}"


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("version", VERSIONS)
def test_parser_accepts_every_node(trt, logger, exported, version, graph):
    _, network, _ = parse(trt, logger, exported(version) / GRAPHS[graph])
    manifest = json.loads((exported(version) / "manifest.json").read_text())
    assert network.num_inputs == 1 + len(manifest["state"])
    assert network.num_outputs == 1 + len(manifest["state"])


def build_engine(trt, logger, out, graph):
    """A serialized engine for an RTX target, with one profile: batch 1..MAX_BATCH, seq 1..MAX_SEQ."""
    builder, network, _parser = parse(trt, logger, out / GRAPHS[graph])
    manifest = json.loads((out / "manifest.json").read_text())
    config = builder.create_builder_config()
    if not hasattr(config, "set_compute_capability"):
        pytest.skip("this TensorRT-RTX cannot choose a target GPU, and without a GPU there is none to build for")
    config.num_compute_capabilities = 1
    assert config.set_compute_capability(trt.ComputeCapability.SM89, 0)  # "CURRENT" would need a GPU
    profile = builder.create_optimization_profile()
    tokens = manifest["graphs"][graph]["tokens"]
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        assert shape[0] == -1, f"{tensor.name}: the batch dim is not dynamic: {shape}"
        low, high = [1] + shape[1:], [MAX_BATCH] + shape[1:]
        if tensor.name == tokens and graph == "prefill":
            low[1], high[1] = 1, MAX_SEQ
        assert -1 not in low, f"{tensor.name}: a dynamic dim other than batch and seq: {shape}"
        # TensorRT-RTX 1.7 checks shape constraints at build time at kOPT only (seen, not documented): the optimum
        # is the smallest shape, one token, where a chunked loop runs zero times, which is what once failed
        profile.set_shape(tensor.name, low, low, high)
    config.add_optimization_profile(profile)
    seen = len(logger.lines)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0, "no engine:\n" + "\n".join(logger.lines[seen:])
    return engine


def test_step_engine_builds_on_cpu(trt, logger, exported):
    build_engine(trt, logger, exported("7"), "step")


@pytest.mark.parametrize("version", VERSIONS)
def test_prefill_engine_builds_on_cpu(trt, logger, exported, version):
    """The builder rejects what the parser lets through, e.g. a Loop body whose shapes change between iterations."""
    build_engine(trt, logger, exported(version), "prefill")
