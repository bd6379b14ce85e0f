"""Portable ONNX export: every version x precision against the reference, through ONNX Runtime."""
import json

import numpy as np
import onnx
import pytest
from conftest import VERSIONS, normalised

from rwkv_deploy import export, open_session
from rwkv_deploy.validation.compare import verify

pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")


@pytest.fixture
def exports(exported):
    return lambda version, precision="fp32", time_state=False: exported(version, precision, time_state=time_state)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("version", VERSIONS)
def test_export_matches_reference(exports, version, precision):
    out = exports(version, precision)
    report = verify(out, steps=64, batch=4)  # 256 rows: one near-tie flip is 0.4%
    bound = 1e-5 if precision == "fp32" else 2e-2  # distance from float64
    for s in report.summaries().values():
        assert s["export_worst"] <= bound and s["top1"] >= 0.99, report.table()
    assert report and json.loads((out / "verify.json").read_text())["passed"]


@pytest.mark.parametrize("version", VERSIONS)
def test_graph_is_standard_onnx_with_dynamic_batch(exports, version):
    out = exports(version)
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no custom domain
    manifest = json.loads((out / "manifest.json").read_text())
    for v in list(model.graph.input) + list(model.graph.output):
        assert v.type.tensor_type.shape.dim[0].dim_param == "batch", v.name
    assert manifest["graphs"]["step"]["tokens"] == "tokens" and manifest["wkv"] == "portable"


@pytest.mark.parametrize("version", ["4", "5.2", "7"])
def test_batch_of_four_equals_single_rows(exports, version):
    sess = open_session(exports(version))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, (16, 4))
    st4, rows = sess.init_state(4), [sess.init_state(1) for _ in range(4)]
    for t in range(16):
        l4, st4 = sess.step(tokens[t], st4)
        for i in range(4):
            l1, rows[i] = sess.step(tokens[t, i:i + 1], rows[i])
            assert normalised(l4[i:i + 1], l1) <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_state_tuned_export(exports, precision):
    out = exports("6", precision, time_state=True)
    m = json.loads((out / "manifest.json").read_text())
    tuned = [s for s in m["state"] if s["kind"] == "S"]
    assert all(s["init_file"] and (out / s["init_file"]).exists() for s in tuned)
    assert verify(out, steps=64)


def generic_client(folder, tokens):
    """Runs an export from manifest.json alone: no RWKV knowledge, just 'copy each state output to its input'."""
    import onnxruntime as ort

    m = json.loads((folder / "manifest.json").read_text())
    g = m["graphs"]["step"]
    sess = ort.InferenceSession(str(folder / g["file"]), providers=["CPUExecutionProvider"])
    state = {}
    for s in m["state"]:
        shape = [1 if d == "batch" else d for d in s["shape"]]
        state[s["input"]] = (np.fromfile(folder / s["init_file"], dtype=s["dtype"]).reshape(shape) if s["init_file"]
                             else np.full(shape, s["init"], dtype=s["dtype"]))
    out = []
    for tok in tokens:
        res = sess.run(None, {g["tokens"]: np.array([tok], dtype=np.int64), **state})
        named = dict(zip([o.name for o in sess.get_outputs()], res))
        out.append(named[g["logits"]][0])
        state = {s["input"]: named[s["output"]] for s in m["state"]}
    return np.stack(out)


@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_alone_drives_the_model(exports, version):
    out = exports(version, time_state=False)
    tokens = list(np.random.default_rng(2).integers(0, 97, 20))
    sess = open_session(out)
    state, ours = sess.init_state(1), []
    for t in tokens:
        logits, state = sess.step(np.array([t]), state)
        ours.append(logits[0])
    np.testing.assert_array_equal(generic_client(out, tokens), np.stack(ours))


def test_generic_client_with_state_tuned_init(exports):
    out = exports("6", time_state=True)
    tokens = [3, 1, 4, 1, 5]
    sess = open_session(out)
    state = sess.init_state(1)
    for t in tokens:
        logits, state = sess.step(np.array([t]), state)
    np.testing.assert_array_equal(generic_client(out, tokens)[-1], logits[0])


def test_external_data_forced_is_one_file_both_graphs_share(make_ckpt, exports, tmp_path):
    import onnx
    from onnx.external_data_helper import uses_external_data

    out = export(make_ckpt("7"), tmp_path / "ext", external_data=True, prefill="last")
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["step"]["external_data"] == m["graphs"]["prefill"]["external_data"] == "weights.onnx.data"
    assert [f.name for f in out.iterdir() if f.name.endswith(".data")] == ["weights.onnx.data"]
    per_graph = {}
    for g in ("model.onnx", "prefill.onnx"):
        proto = onnx.load(str(out / g), load_external_data=False)
        per_graph[g] = sum(int(dict((e.key, e.value) for e in t.external_data)["length"])
                           for t in proto.graph.initializer if uses_external_data(t))
        # the weights live in the data file: only tensors under a page's worth stay inline (WeightWriter.MIN_BYTES)
        inline = [t.name for t in proto.graph.initializer if not uses_external_data(t) and len(t.raw_data) >= 1024]
        assert per_graph[g] > 0 and not inline, inline
    data = (out / "weights.onnx.data").stat().st_size
    assert data < 1.1 * per_graph["model.onnx"] + 64 * 4096  # the prefill graph's weights were already there
    assert data < 0.6 * sum(per_graph.values())
    assert verify(out, steps=64)
    sess, ref = open_session(out), open_session(exports("7"))  # the folder export of the same checkpoint
    tokens = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(sess.prefill(tokens, sess.init_state(1))[0], ref.prefill(tokens, ref.init_state(1))[0])


def test_export_writes_nothing_on_failure(make_ckpt, tmp_path, monkeypatch):
    import rwkv_deploy.exporters.export as ex

    out = tmp_path / "out"
    out.mkdir()  # an earlier export (--force replaces only those)
    (out / "manifest.json").write_text('{"format": "rwkv-deploy/1"}')
    (out / "keep.txt").write_text("precious")

    def boom(*a, **k):
        raise RuntimeError("simulated crash mid-export")

    monkeypatch.setattr(ex, "trace_graph", boom)
    with pytest.raises(RuntimeError):
        export(make_ckpt("4"), out, force=True)
    assert (out / "keep.txt").read_text() == "precious"  # the old folder survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    with pytest.raises(RuntimeError):
        export(make_ckpt("4"), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_force_replaces_existing_export(make_ckpt, tmp_path):
    out = export(make_ckpt("4"), tmp_path / "o")
    (out / "stale.txt").write_text("x")
    export(make_ckpt("5.2"), out, force=True)
    assert json.loads((out / "manifest.json").read_text())["rwkv_version"] == "5.2"
    assert not (out / "stale.txt").exists()


def test_session_rejects_bad_tokens_and_state(exports):
    from rwkv_deploy.errors import RWKVDeployError

    sess = open_session(exports("5.1"))
    st = list(sess.init_state(2).to_numpy().values())  # the format-1 form: numpy arrays in the manifest's order
    with pytest.raises(RWKVDeployError, match="token id 97 is out of range"):
        sess.step(np.array([1, 97]), st)
    with pytest.raises(RWKVDeployError, match="out of range"):
        sess.step(np.array([-1, 0]), st)
    with pytest.raises(RWKVDeployError, match=r"state state\.0\.S: expected float32 \[2, 4, 16, 16\]"):
        sess.step(np.array([1, 2]), [st[0], st[1][:, :2], *st[2:]])
    with pytest.raises(RWKVDeployError, match="expected float32"):
        sess.step(np.array([1, 2]), [st[0].astype(np.float64), *st[1:]])
    with pytest.raises(RWKVDeployError, match="state has 5 tensors"):
        sess.step(np.array([1, 2]), st[:5])


@pytest.mark.parametrize("version", ["4", "5.2", "6"])
def test_fp16_rescales_the_residual_of_deep_models(make_ckpt, tmp_path, version):
    """With 7 layers the fp16 export halves the residual after layer 6 (spec §8.1) and still matches fp32."""
    out = export(make_ckpt(version, n_layer=7), tmp_path / "o", precision="fp16")
    assert json.loads((out / "manifest.json").read_text())["rescale_every"] == 6
    report = verify(out, steps=64, batch=4)
    assert report and report.summaries()["free-running"]["export_worst"] <= 2e-2, report.table()


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("version", ["4", "7"])
def test_every_node_is_used(exported, version, precision):
    """Each node of the step and prefill graphs feeds an output: a constant that only a weight's fold read goes
    into the fold (ONNX Runtime warned about each one left behind)."""
    from rwkv_deploy.exporters.onnx_graph import _outer_inputs

    out = exported(version, precision)
    for name in ("model.onnx", "prefill.onnx"):
        g = onnx.load(str(out / name), load_external_data=False).graph
        read = _outer_inputs(g) | {o.name for o in g.output}
        idle = [n.output[0] for n in g.node if not any(o in read for o in n.output)]
        assert not idle, (name, idle[:5])
