"""RWKV-7's chunked sequence form (models/wkv.py `wkv7_chunk`) equals the token-by-token recurrence, and the prefill
graph it exports has no Loop over tokens."""
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from rwkv_deploy import export, open_session
from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint
from rwkv_deploy.models.v7 import DECAY_SCALE
from rwkv_deploy.models.wkv import CHUNK, run_wkv7, step_wkv7

torch.set_grad_enabled(False)


def v7_inputs(B, T, H=4, N=64, seed=0, repeated=False):
    """r, w, k, v, a, b, S in float64 as V7.time_mix makes them from random projections; `repeated`: the same
    key over and over, learning rate near 1 (the hard case for the chunk's triangular solve)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*(shape or (B, T, H, N)), generator=g, dtype=torch.float64)

    w = torch.exp(-DECAY_SCALE * torch.sigmoid(-1.5 + 3.5 * rnd()))  # w0 in (-5, 2) plus a LoRA
    rate = torch.sigmoid(rnd() + (4 if repeated else 0))  # a = sigmoid(a0 + LoRA)
    key = rnd(B, 1, H, N) + 0.05 * rnd() if repeated else rnd()
    kk = F.normalize(key * 0.75, dim=-1)  # k * k_k
    k = key * (1 + (rate - 1) * 1.0)  # k_a
    return rnd(), w, k, rnd(), -kk, kk * rate, rnd(B, H, N, N)


def token_loop(r, w, k, v, a, b, S):
    ys = []
    for t in range(r.shape[1]):
        y, S = step_wkv7(*(x[:, t:t + 1] for x in (r, w, k, v, a, b)), S)
        ys.append(y)
    return torch.cat(ys, 1), S


def rel(x, ref):
    return float((x.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("repeated", [False, True])
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 100, 256])
def test_float64_equals_token_loop(T, repeated):
    ins = v7_inputs(2, T, seed=T, repeated=repeated)
    y_ref, S_ref = token_loop(*ins)
    y, S = run_wkv7(*ins)
    assert y.shape == y_ref.shape and S.shape == S_ref.shape
    assert rel(y, y_ref) < 1e-12 and rel(S, S_ref) < 1e-12


@pytest.mark.parametrize("repeated", [False, True])
def test_float32_as_close_as_token_loop(repeated):
    ins = v7_inputs(1, 256, H=12, seed=5, repeated=repeated)
    y64, S64 = token_loop(*ins)
    ins32 = [x.float() for x in ins]
    y_loop, S_loop = token_loop(*ins32)
    y, S = run_wkv7(*ins32)
    # measured: y 2-3e-7 both ways, S 1.5e-7 (loop) vs 2-4e-7 (chunks)
    assert rel(y, y64) <= max(2 * rel(y_loop, y64), 5e-7)
    assert rel(S, S64) <= max(4 * rel(S_loop, S64), 8e-7)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("v7chunk")
    save_checkpoint(make_checkpoint("7", n_layer=2, n_embd=64, head_size=16, vocab_size=97), root / "v7.pth")
    return export(root / "v7.pth", root / "out", prefill=True)


@pytest.mark.parametrize("T", [1, 17, 100])
def test_prefill_graph_equals_step_graph(tiny_export, T):
    pytest.importorskip("onnxruntime")
    sess = open_session(tiny_export)
    tokens = np.random.default_rng(T).integers(0, 97, (2, T))
    logits, state = sess.prefill(tokens, sess.init_state(2))
    step_state = sess.init_state(2)
    for t in range(T):
        step_logits, step_state = sess.step(tokens[:, t], step_state)
    assert np.abs(logits - step_logits).max() <= 2e-5 * np.abs(step_logits).max()
    for ours, theirs in zip(state.to_numpy().values(), step_state.to_numpy().values()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-5 * np.abs(theirs).max())


def test_prefill_loops_run_over_chunks_not_tokens(tiny_export, tmp_path):
    """Every Loop's trip count, read back from onnxruntime for a prompt of T tokens, is ceil(T / CHUNK)."""
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(tiny_export / "prefill.onnx"), load_external_data=False)
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == 2  # one per layer
    for node in loops:  # no Loop inside a loop's body either
        assert not any(m.op_type == "Loop" for m in node.attribute[0].g.node)
    counts = [n.input[0] for n in loops]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(c, onnx.TensorProto.INT64, None) for c in counts)
    path = tiny_export / "prefill-trips.onnx"  # beside weights.onnx.data, which it names by a relative path
    onnx.save(model, str(path))
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        T = 100
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        feeds = {i.name: np.zeros([2 if d == "batch" else d for d in i.shape], dtype=dtypes[i.type])
                 for i in sess.get_inputs() if i.name != "tokens"}
        out = sess.run(counts, {"tokens": np.zeros((2, T), dtype=np.int64), **feeds})
    finally:
        path.unlink()
    assert [int(c) for c in out] == [math.ceil(T / CHUNK)] * len(loops)
