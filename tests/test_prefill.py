"""Prefill graph: a prompt of T tokens in one call, then single steps, equals T + k single steps."""
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import VERSIONS, normalised

from rwkv_deploy import export, open_session
from rwkv_deploy.models import load_model
from rwkv_deploy.validation.loop import stepwise

pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")
torch.set_grad_enabled(False)


@pytest.fixture
def prefill_exports(exported):
    return exported


def reference_steps(path, tokens):
    """Logits after every token, fed one at a time to the float32 reference: [B, T, V]."""
    logits, state = stepwise(load_model(path), torch.from_numpy(tokens))
    return logits, [s.numpy() for s in state]


@pytest.mark.parametrize("wkv", ["portable", "fused"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("version", VERSIONS)
def test_prefill_then_steps_equals_single_steps(prefill_exports, make_ckpt, version, T, batch, wkv):
    sess = open_session(prefill_exports(version, wkv=wkv))
    k = 4
    tokens = np.random.default_rng(T * 10 + batch).integers(0, 97, (batch, T + k))
    ref, ref_state = reference_steps(make_ckpt(version), tokens)
    logits, state = sess.prefill(tokens[:, :T], sess.init_state(batch))
    assert normalised(logits, ref[:, T - 1]) <= 1e-5
    for j in range(k):
        logits, state = sess.step(tokens[:, T + j], state)
        assert normalised(logits, ref[:, T + j]) <= 1e-5
    for ours, theirs in zip(state.to_numpy().values(), ref_state):  # a State is named, in the manifest's order
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("wkv", ["portable", "fused"])
@pytest.mark.parametrize("version", VERSIONS)
def test_prefill_fp16(prefill_exports, make_ckpt, version, wkv):
    sess = open_session(prefill_exports(version, "fp16", wkv))
    tokens = np.random.default_rng(9).integers(0, 97, (3, 40))
    ref, _ = reference_steps(make_ckpt(version), tokens)
    logits, _ = sess.prefill(tokens, sess.init_state(3))
    assert normalised(logits, ref[:, -1]) <= 2e-2


def test_manifest_and_runtime_use_prefill(prefill_exports):
    out = prefill_exports("7")
    m = json.loads((out / "manifest.json").read_text())
    g = m["graphs"]["prefill"]
    assert g["file"] == "prefill.onnx" and g["tokens_shape"] == ["batch", "seq"] and g["logits"] == "logits"
    model = onnx.load(str(out / "prefill.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert sum(n.op_type == "Loop" for n in model.graph.node) == m["n_layer"]  # one recurrence per layer
    sess = open_session(out)
    assert sess.has_prefill
    calls = []
    sess.step = lambda *a: calls.append(a)  # forward() must not fall back to single steps
    sess.forward(np.zeros((1, 5), dtype=np.int64), sess.init_state(1))
    assert calls == []


def test_prefill_all_positions(make_ckpt, tmp_path):
    out = export(make_ckpt("6"), tmp_path / "o", prefill="all")
    g = json.loads((out / "manifest.json").read_text())["graphs"]["prefill"]
    assert g["positions"] == "all" and g["logits_shape"] == ["batch", "seq", 97]
    sess = open_session(out)
    tokens = np.random.default_rng(4).integers(0, 97, (2, 12))
    logits, _ = sess.prefill(tokens, sess.init_state(2))
    ref, _ = reference_steps(make_ckpt("6"), tokens)
    assert logits.shape == (2, 12, 97) and normalised(logits.reshape(-1, 97), ref.reshape(-1, 97)) <= 1e-5
    last, _ = sess.forward(tokens, sess.init_state(2))
    np.testing.assert_array_equal(last, logits[:, -1])
