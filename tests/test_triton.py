"""`rwkv-deploy triton` without a server: config.pbtxt checked by Triton's own model-config protobuf for every
version, the token guard of the served graph run with ONNX Runtime, the Python-backend sequence table, and the
command's bad-input contract."""
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import VERSIONS, one_error_line, run_cli

from rwkv_deploy import open_session
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.runtime.manifest import read_manifest
from rwkv_deploy.triton import write_repository
from rwkv_deploy.triton.config import READY
from rwkv_deploy.triton.repository import MARKER
from rwkv_deploy.triton.sequences import Request, SequenceTable

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient is needed (pip install -e .[test])")
from google.protobuf import text_format  # noqa: E402 (a dependency of tritonclient's protobuf module)

TYPES = {"float32": model_config_pb2.TYPE_FP32, "float16": model_config_pb2.TYPE_FP16}


def parse_config(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("version, precision", [(v, "fp32") for v in VERSIONS] + [("4", "fp16"), ("7", "fp16")])
def test_config_names_exactly_the_manifest(exported, tmp_path, version, precision, backend):
    folder = exported(version, precision)
    manifest = json.loads((folder / "manifest.json").read_text())
    repo = write_repository(folder, tmp_path / "repo", backend=backend, max_batch=4)
    cfg = parse_config(repo / "rwkv")
    step = manifest["graphs"]["step"]
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("rwkv", backend, 4)
    assert [(i.name, i.data_type, list(i.dims), list(i.reshape.shape)) for i in cfg.input] == \
           [(step["tokens"], model_config_pb2.TYPE_INT64, [1], [])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == \
           [(step["logits"], model_config_pb2.TYPE_FP32, [manifest["vocab_size"]])]
    seq = cfg.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "oldest" and not seq.control_input
    assert [(s.input_name, s.output_name, s.data_type, list(s.dims)) for s in seq.state] == \
           [(s["input"], s["output"], TYPES[s["dtype"]], s["shape"][1:]) for s in manifest["state"]]
    for s, entry in zip(seq.state, manifest["state"]):
        assert len(s.initial_state) == 1  # a repeated field in model_config.proto
        init = s.initial_state[0]
        assert (init.data_type, list(init.dims)) == (s.data_type, list(s.dims))
        if entry["init"] == 0 and not entry["init_file"]:
            assert init.zero_data and not init.data_file
        else:  # e.g. v4's pp: Triton reads one batch row, raw, from <model>/initial_state/
            row = np.fromfile(repo / "rwkv" / "initial_state" / init.data_file, dtype=entry["dtype"])
            assert row.size == np.prod(entry["shape"][1:]) and np.all(row == np.array(entry["init"], entry["dtype"]))
    graph = repo / "rwkv" / ("1" if backend == "onnxruntime" else "onnx") / "model.onnx"
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} == {step["tokens"], *(s["input"] for s in manifest["state"])}
    assert {o.name for o in sess.get_outputs()} == {step["logits"], *(s["output"] for s in manifest["state"])}
    if backend == "tensorrt":  # the plan is built on the target GPU from the guarded graph, with this profile
        script = (repo / "rwkv" / "build_plan.sh").read_text()
        assert "--saveEngine=1/model.plan" in script and f"{step['tokens']}:4," in script
        # strongly typed whatever the precision: an fp16 export's fp32 islands (the WKV state) stay fp32
        assert "--stronglyTyped" in script and "--fp16" not in script
    assert not list((repo / "rwkv" / "1").glob("*.plan"))


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_state_tuned_initial_state_is_shipped(exported, tmp_path, version):
    """A state-tuned export's shipped rows become Triton's initial_state data files, byte for byte."""
    folder = exported(version, time_state=True)
    repo = write_repository(folder, tmp_path / "repo")
    cfg = parse_config(repo / "rwkv")
    sess = open_session(folder, providers="cpu")
    initial = sess.init_state(1).to_numpy()
    tuned = [s for s in cfg.sequence_batching.state if s.initial_state[0].data_file]
    assert tuned, "a state-tuned export must have a non-zero initial state"
    for s in tuned:
        row = np.fromfile(repo / "rwkv" / "initial_state" / s.initial_state[0].data_file, dtype=np.float32)
        np.testing.assert_array_equal(row, initial[s.input_name][0].ravel())


def test_python_backend_config(exported, tmp_path):
    folder = exported("7")
    repo = write_repository(folder, tmp_path / "repo", backend="python", max_batch=16, strategy="direct")
    cfg = parse_config(repo / "rwkv")
    assert cfg.backend == "python" and list(cfg.input[0].dims) == [-1]  # a prompt in one request
    seq = cfg.sequence_batching
    assert seq.WhichOneof("strategy_choice") == "direct" and not seq.state  # model.py keeps the state
    kinds = {c.name: c.control[0].kind for c in seq.control_input}
    assert kinds == {"START": seq.Control.CONTROL_SEQUENCE_START, "END": seq.Control.CONTROL_SEQUENCE_END,
                     "CORRID": seq.Control.CONTROL_SEQUENCE_CORRID}
    assert cfg.parameters["export"].string_value == "export"
    export = repo / "rwkv" / "1" / "export"
    assert (repo / "rwkv" / "1" / "model.py").is_file()
    assert sorted(p.name for p in export.iterdir()) == sorted(p.name for p in folder.iterdir()
                                                              if p.name != "verify.json")
    # the copied export opens and computes what the original does
    tokens = np.array([[1, 2, 3]])
    a, _ = open_session(export, providers="cpu").forward(tokens, open_session(export, providers="cpu").init_state(1))
    b, _ = open_session(folder, providers="cpu").forward(tokens, open_session(folder, providers="cpu").init_state(1))
    np.testing.assert_array_equal(a, b)


def test_python_backend_leaves_engines_behind(exported, tmp_path):
    """TensorRT engines (gigabytes; OnnxSession never uses them), their records and data loader are not copied,
    and the copied manifest lists no engines, so the copy is consistent and schema-valid."""
    folder = tmp_path / "export"
    shutil.copytree(exported("7"), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engines"] = [{"file": "step.engine", "graph": "step", "flavour": "tensorrt-rtx", "sha256": "0" * 64}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for name in ("step.engine", "step.engine.json", "polygraphy_data_loader.py"):
        (folder / name).write_text("not copied")
    read_manifest(folder)  # the fake entry is one the schema accepts
    repo = write_repository(folder, tmp_path / "repo", backend="python")
    export = repo / "rwkv" / "1" / "export"
    assert sorted(p.name for p in export.iterdir()) == sorted(
        p.name for p in folder.iterdir() if p.name not in ("verify.json", "step.engine", "step.engine.json",
                                                           "polygraphy_data_loader.py"))
    copied = read_manifest(export)
    assert copied["engines"] == [] and {k: v for k, v in copied.items() if k != "engines"} == \
           {k: v for k, v in manifest.items() if k != "engines"}
    open_session(export, providers="cpu")


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds), [o.name for o in sess.get_outputs()]


def _states(sess, batch, seed):
    """A State of `batch` rows that is not the initial one: each row stepped through its own random tokens."""
    rng = np.random.default_rng(seed)
    state = sess.init_state(batch)
    for _ in range(3):
        _, state = sess.step(rng.integers(0, sess.vocab_size, batch), state)
    return state.to_numpy()


@pytest.mark.parametrize("version", VERSIONS)
def test_direct_idle_slots_garbage_does_not_change_real_rows(exported, tmp_path, version):
    """Rows 0 and 2 are real sequences; rows 1 and 3 are idle slots as Triton's direct strategy fills them:
    READY=0, token ids far out of range and a garbage state. The real rows' logits and states equal the export's
    own graph with the idle rows made harmless, bit for bit, and the export's Session at batch 2."""
    folder = exported(version)
    repo = write_repository(folder, tmp_path / "repo", strategy="direct")
    sess = open_session(folder, providers="cpu")
    step = sess.manifest.graph("step")
    # what Triton's onnxruntime backend checks at load: each control is a graph input [batch, 1] of its dtype,
    # and the graph has exactly the config's inputs, controls and states
    seq = parse_config(repo / "rwkv").sequence_batching
    assert seq.WhichOneof("strategy_choice") == "direct"
    assert [(c.name, c.control[0].kind, list(c.control[0].int32_false_true)) for c in seq.control_input] == \
           [(READY, seq.Control.CONTROL_SEQUENCE_READY, [0, 1])]
    inputs = {i.name: i for i in ort.InferenceSession(str(repo / "rwkv" / "1" / "model.onnx"),
                                                      providers=["CPUExecutionProvider"]).get_inputs()}
    assert (inputs[READY].type, inputs[READY].shape[1:]) == ("tensor(int32)", [1])
    assert len(inputs) == 1 + 1 + len(seq.state)
    real = np.array([0, 2])
    state = _states(sess, 4, seed=1)
    rng = np.random.default_rng(2)
    for name, a in state.items():  # idle slots hold whatever the previous sequence left, or worse
        a[[1, 3]] = rng.normal(0, 1e3, a[[1, 3]].shape).astype(a.dtype)
    tokens = np.array([5, 2 ** 40, 17, -3], dtype=np.int64)
    ready = np.array([[1], [0], [1], [0]], dtype=np.int32)
    guarded, names = _run(repo / "rwkv" / "1" / "model.onnx", {step["tokens"]: tokens, READY: ready, **state})
    plain_tokens = np.where(ready[:, 0] == 1, tokens, 0)
    plain, plain_names = _run(folder / step["file"], {step["tokens"]: plain_tokens, **state})
    assert names == plain_names
    for g, p in zip(guarded, plain):
        np.testing.assert_array_equal(g[real], p[real])
    logits, new = sess.step(tokens[real], sess.state_from_numpy({n: a[real] for n, a in state.items()}))
    np.testing.assert_allclose(guarded[0][real], logits, rtol=1e-5, atol=1e-5)
    for s in sess.manifest.state:
        np.testing.assert_allclose(guarded[names.index(s.output)][real], new.to_numpy()[s.input], rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("version", ["4", "7"])
def test_oldest_out_of_range_id_harms_only_its_row(exported, tmp_path, version):
    """Without READY (oldest strategy) the guard clamps: a bad id runs as a valid one in its own row instead of
    failing the whole batch; the other rows are exactly the export's."""
    folder = exported(version)
    repo = write_repository(folder, tmp_path / "repo")
    sess = open_session(folder, providers="cpu")
    step = sess.manifest.graph("step")
    state = _states(sess, 3, seed=3)
    with pytest.raises(Exception):  # the export's own graph: ONNX Runtime's Gather refuses the id
        _run(folder / step["file"], {step["tokens"]: np.array([4, 10 ** 9, 9]), **state})
    guarded, _ = _run(repo / "rwkv" / "1" / "model.onnx", {step["tokens"]: np.array([4, 10 ** 9, 9]), **state})
    clamped, _ = _run(folder / step["file"], {step["tokens"]: np.array([4, sess.vocab_size - 1, 9]), **state})
    for g, c in zip(guarded, clamped):
        np.testing.assert_array_equal(g, c)


def test_sequence_table_interleaved_matches_session(exported):
    """The Python backend's batching: interleaved sequences, prompts and single steps mixed in one batch, equal
    each sequence run alone; an ended sequence is gone."""
    sess = open_session(exported("6"), providers="cpu")
    table = SequenceTable(sess, idle_seconds=60)
    rng = np.random.default_rng(0)
    seqs = {c: rng.integers(0, sess.vocab_size, 9) for c in (11, 12, 13)}
    # chunks per round: 11 sends a prompt of 4 then single tokens; 12 singles; 13 a prompt of 4 then 5 at once
    plan = {11: [4, 1, 1, 1, 1, 1], 12: [1] * 9, 13: [4, 5]}
    pos = {c: 0 for c in seqs}
    got = {c: [] for c in seqs}
    for rnd in range(9):
        batch, who = [], []
        for c, chunks in plan.items():
            if rnd < len(chunks):
                n = chunks[rnd]
                batch.append(Request(c, start=rnd == 0, end=rnd == len(chunks) - 1, tokens=seqs[c][pos[c]:pos[c] + n]))
                who.append((c, pos[c] + n))
                pos[c] += n
        for (c, upto), result in zip(who, table.run(batch)):
            got[c].append((upto, result))
    assert len(table) == 0  # every sequence ended
    for c, results in got.items():
        state = sess.init_state(1)
        done = 0
        for upto, result in results:
            ref, state = sess.forward(seqs[c][None, done:upto], state)
            done = upto
            np.testing.assert_allclose(result, ref[0], rtol=1e-5, atol=1e-5)


def test_sequence_table_errors_are_per_request(exported):
    sess = open_session(exported("4"), providers="cpu")
    now = [0.0]
    table = SequenceTable(sess, idle_seconds=10, clock=lambda: now[0])
    results = table.run([Request(1, True, False, np.array([1, 2])), Request(2, False, False, np.array([3])),
                         Request(3, True, False, np.array([sess.vocab_size])), Request(0, True, False, np.array([1]))])
    assert results[0].shape == (sess.vocab_size,)
    assert [type(r) for r in results[1:]] == [RWKVDeployError] * 3
    assert "not open" in str(results[1]) and "out of range" in str(results[2]) and "sequence id" in str(results[3])
    now[0] = 11.0  # sequence 1 idle longer than its timeout: dropped, as Triton drops it
    assert "not open" in str(table.run([Request(1, False, False, np.array([1]))])[0]) and len(table) == 0


def test_sequence_table_same_sequence_twice_in_one_batch(exported):
    """[start A, continue A] in one batch: the second request runs on the state the first one left."""
    sess = open_session(exported("7"), providers="cpu")
    table = SequenceTable(sess, idle_seconds=60)
    first, second = table.run([Request(5, True, False, np.array([1, 2])), Request(5, False, True, np.array([3]))])
    ref, state = sess.forward(np.array([[1, 2]]), sess.init_state(1))
    np.testing.assert_allclose(first, ref[0], rtol=1e-5, atol=1e-5)
    ref, _ = sess.forward(np.array([[3]]), state)
    np.testing.assert_allclose(second, ref[0], rtol=1e-5, atol=1e-5)
    assert len(table) == 0


def test_sequence_table_failed_end_or_start_closes_the_sequence(exported):
    """A request that ends (or restarts) its sequence and fails still closes it, at once: no state waits for the
    idle timeout, and nothing continues from a state the client meant to discard."""
    sess = open_session(exported("4"), providers="cpu")
    table = SequenceTable(sess, idle_seconds=60)
    bad = np.array([sess.vocab_size])
    assert table.run([Request(1, True, False, np.array([1])), Request(2, True, False, np.array([1]))])[1].shape == \
           (sess.vocab_size,)
    results = table.run([Request(1, False, True, bad), Request(2, True, False, bad)])
    assert all("out of range" in str(r) for r in results)
    assert len(table) == 0
    assert "not open" in str(table.run([Request(2, False, False, np.array([1]))])[0])


def test_local_triton_start_failure_leaves_nothing(tmp_path):
    """A broken Triton venv is one RWKVDeployError, and the server's work folder is removed."""
    from rwkv_deploy.triton.local import LocalTriton

    def leftovers():
        return set(Path(tempfile.gettempdir()).glob("rwkv-triton-*"))

    before = leftovers()
    for name, python in [("fails", "exit 1"), ("no-stub", "echo 3.99")]:  # a broken Python; one pytriton lacks
        venv = tmp_path / name
        server = venv / "lib" / "python3.99" / "site-packages" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        server.parent.mkdir(parents=True)
        server.write_text("")
        (venv / "bin").mkdir()
        (venv / "bin" / "python").write_text(f"#!/bin/sh\n{python}\n")
        (venv / "bin" / "python").chmod(0o755)
        with pytest.raises(RWKVDeployError, match="exit 1" if name == "fails" else "no Python backend stub"):
            LocalTriton(tmp_path, venv).start()
        assert leftovers() == before


def test_cli_writes_and_refuses(exported, tmp_path):
    folder = exported("7")
    out = tmp_path / "repo"
    r = run_cli("triton", folder, "-o", out, "--backend", "python", "--max-batch", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / MARKER).read_text())["backend"] == "python"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    one_error_line(run_cli("triton", folder, "-o", out), "--force")
    assert run_cli("triton", folder, "-o", out, "--force").returncode == 0
    assert json.loads((out / MARKER).read_text())["backend"] == "onnxruntime"
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    one_error_line(run_cli("triton", folder, "-o", other, "--force"), "not a repository")
    assert (other / "keep.txt").read_text() == "mine"
    one_error_line(run_cli("triton", tmp_path / "missing", "-o", tmp_path / "r2"), "missing")
    one_error_line(run_cli("triton", folder, "-o", folder / "repo"), "overlaps")
    one_error_line(run_cli("triton", folder, "-o", tmp_path / "r3", "--name", "../x"), "model name")
    one_error_line(run_cli("triton", folder, "-o", tmp_path / "r6", "--name", "rwkv\n"), "model name")
    one_error_line(run_cli("triton", folder, "-o", tmp_path / "r4", "--max-batch", "0"), "max-batch")
    one_error_line(run_cli("triton", folder, "-o", tmp_path / "r5", "--backend", "tf"), "backend")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists() and not (tmp_path / "r6").exists()
    broken = tmp_path / "broken"  # a damaged download: model.onnx cut short
    shutil.copytree(folder, broken)
    graph = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(graph[:len(graph) // 2])
    one_error_line(run_cli("triton", broken, "-o", tmp_path / "r7"), "model.onnx", "re-export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "other", "repo"]  # nothing written
