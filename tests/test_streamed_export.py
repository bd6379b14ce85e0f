"""The streamed export (graphs traced from a weightless skeleton, weights written one layer at a time) against the
way export worked before: tracing the real model with torch's constant folding. Same weights, byte for byte; same
logits, bit for bit; every weight stored once in a folder with two graphs."""
from __future__ import annotations

import hashlib
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import VERSIONS
from onnx import numpy_helper

from rwkv_deploy import export, open_session
from rwkv_deploy.exporters.onnx_graph import StepGraph, state_io_names, static_shapes
from rwkv_deploy.models import load_checkpoint
from rwkv_deploy.models.model import RWKV


def traced_with_weights(ckpt_path, precision, path):
    """The previous export path, written out here: the real model traced with its weights as initializers and
    torch's constant folding (which transposes the projections and folds 1 - mu)."""
    model = RWKV(load_checkpoint(ckpt_path), {"fp32": torch.float32, "fp16": torch.float16}[precision]).eval()
    ins, outs = state_io_names(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(StepGraph(model), (torch.zeros(2, dtype=torch.long), *model.init_state(2)), str(path),
                          dynamo=False, opset_version=18, input_names=["tokens", *ins], output_names=["logits", *outs],
                          dynamic_axes={n: {0: "batch"} for n in ["tokens", "logits", *ins, *outs]},
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    static_shapes(proto)  # what every export does after tracing (its ORT fusions can round differently)
    onnx.save(proto, str(path))
    return path


def weight_digests(path, folder=None) -> Counter:
    """sha256 of every float initializer with at least 16 values (the weights and what was folded from them; scalars
    and shape constants are left out: the tracer keeps some as Constant nodes), with their external data loaded."""
    proto = onnx.load(str(path), load_external_data=folder is not None)
    out = Counter()
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t, base_dir=str(folder or path.parent))
        if a.dtype.kind == "f" and a.size >= 16:
            out[(a.dtype.str, a.shape, hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest())] += 1
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("version", VERSIONS)
def test_streamed_weights_and_logits_equal_the_previous_path(make_ckpt, tmp_path, version, precision):
    ckpt = make_ckpt(version)
    out = export(ckpt, tmp_path / "out", precision=precision, prefill="last")
    old = traced_with_weights(ckpt, precision, tmp_path / "old.onnx")
    assert set(weight_digests(out / "model.onnx", out)) == set(weight_digests(old))
    new_sess, old_sess = open_session(out), None
    import onnxruntime as ort

    old_sess = ort.InferenceSession(str(old), providers=["CPUExecutionProvider"])
    state = new_sess.init_state(1).to_numpy()
    names = list(state)
    for t in [3, 1, 4, 1, 5]:
        logits, s = new_sess.step(np.array([t]), new_sess.state_from_numpy(state))
        ref = old_sess.run(None, {"tokens": np.array([t]), **state})
        np.testing.assert_array_equal(logits, ref[0])  # bit for bit
        state = s.to_numpy()
        for n, r in zip(names, ref[1:]):
            np.testing.assert_array_equal(state[n], r)


def test_two_graphs_store_each_weight_once(make_ckpt, tmp_path):
    out = export(make_ckpt("6"), tmp_path / "out", prefill="all")
    spans = {}  # initializer name -> (offset, length) in weights.onnx.data
    for g in ("model.onnx", "prefill.onnx"):
        for t in onnx.load(str(out / g), load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                e = {x.key: x.value for x in t.external_data}
                assert e["location"] == "weights.onnx.data"
                span = (int(e["offset"]), int(e["length"]))
                assert spans.setdefault(t.name, span) == span  # the same bytes for the same name in both graphs
    stored = sorted(spans.values())
    assert all(a + n <= b for (a, n), (b, _) in zip(stored, stored[1:]))  # no two names share or overlap bytes
    size = (out / "weights.onnx.data").stat().st_size
    assert sum(n for _, n in stored) <= size < sum(n for _, n in stored) + 4096 * len(stored)  # only padding besides
    step = {t.name for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert any(name.startswith("model.blocks.0.att.key.weight~") for name in step)  # folded transposes, named


@pytest.mark.parametrize("version", ["4", "7"])
def test_export_reads_the_checkpoint_in_one_pass(make_ckpt, tmp_path, monkeypatch, version):
    """Every tensor the export reads (weights, golden logits at the export's precision and in float64) is read in one
    pass over the file: once a layer's tensors are left for the next layer's, they are not read again. Before, the
    golden logits re-read every layer twice after the weights were written."""
    from rwkv_deploy.models.checkpoint import Checkpoint

    reads = []
    checked = Checkpoint.checked
    def reading(self, key):
        # the skeleton traced for the graphs reads shapes only; ln_out's two vectors are read when a model is built
        if not self.weights[key].is_meta and not key.startswith("ln_out."):
            reads.append(key)
        return checked(self, key)

    monkeypatch.setattr(Checkpoint, "checked", reading)
    export(make_ckpt(version), tmp_path / "out", prefill="last")

    def group(key):  # the checkpoint's order: emb and ln0, then each layer, then the head
        if key.startswith("blocks.") and ".ln0." not in key:
            return 1 + int(key.split(".")[1])
        return 0 if key.startswith(("emb.", "blocks.0.ln0.")) else 10 ** 6
    visits = [g for i, g in enumerate(map(group, reads)) if i == 0 or g != group(reads[i - 1])]
    assert visits == sorted(set(visits)), visits  # each group visited once, in order
    assert len(set(visits)) == 2 + load_checkpoint(make_ckpt(version)).dims.n_layer


def test_peak_memory_is_about_one_copy_of_the_weights(tmp_path):
    """A 4-layer x 1024 fp32 export (about 0.74 GB of weights, stored inside model.onnx) in a subprocess that reports
    its peak RSS: within the bound the streamed export promises at every size, 1.3 x the weights + 1.5 GB (the
    previous path peaked at ~4.6x the weights, 3.4 GB here)."""
    import json
    import subprocess
    import sys

    from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint

    ckpt = tmp_path / "m.pth"
    save_checkpoint(make_checkpoint("7", n_layer=4, n_embd=1024, vocab_size=65536, dtype=torch.bfloat16), ckpt)
    code = ("import json, resource, sys; from rwkv_deploy import export; "
            "export(sys.argv[1], sys.argv[2], tokenizer=None); "
            "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    peak = json.loads(r.stdout.splitlines()[-1])
    weights = (tmp_path / "out" / "model.onnx").stat().st_size
    assert weights > 7e8
    assert peak < 1.3 * weights + 1.5e9, (peak, weights)


@pytest.mark.parametrize("version", VERSIONS)
def test_no_folded_weight_is_larger_than_its_weight(make_ckpt, tmp_path, version):
    """A fold stores what was done to one weight (a transpose, 1 - mu, an unsqueeze): never a broadcast of it (v4's
    chunk table [16, 16, A] of w [A] once came out as an initializer per layer). It runs in the graph instead."""
    out = export(make_ckpt(version), tmp_path / "out", prefill="last")
    model = RWKV(load_checkpoint(make_ckpt(version)), torch.float32)
    numel = {f"model.{n}": b.numel() for n, b in model.named_buffers()}
    for graph in ("model.onnx", "prefill.onnx"):
        for t in onnx.load(str(out / graph), load_external_data=False).graph.initializer:
            weight = t.name.split("~")[0]
            if weight in numel:
                assert int(np.prod(t.dims)) == numel[weight], (graph, t.name, list(t.dims))
