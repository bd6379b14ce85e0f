"""One Session contract on every backend (runtime/contract.py): the same suite runs ONNX Runtime (numpy feeds),
ONNX Runtime with I/O binding, and the PyTorch reference, for every version."""
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import VERSIONS, normalised, one_error_line, run_cli

from rwkv_deploy import open_session
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.exporters.onnx_graph import state_io_names
from rwkv_deploy.models import load_model
from rwkv_deploy.validation.loop import stepwise
from rwkv_deploy.runtime.contract import State

pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")
torch.set_grad_enabled(False)

BACKENDS = ["ort", "ort-iobinding", "torch"]
NO_GPU = "no CUDA GPU / onnxruntime-gpu on this machine"


def _has_cuda_ort() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def sessions(exported, make_ckpt):
    """sessions(backend, version) -> a Session of the cached fp32 export of `version` (torch: its checkpoint)."""
    cache = {}

    def get(backend, version):
        if (backend, version) not in cache:
            if backend == "torch":
                cache[backend, version] = open_session(make_ckpt(version), backend="torch")
            else:
                cache[backend, version] = open_session(exported(version), io_binding=backend == "ort-iobinding")
        return cache[backend, version]

    return get


def reference(path, tokens):
    """The float32 reference fed one token at a time: logits [B, T, V] and the final state by name."""
    m = load_model(path)
    logits, state = stepwise(m, torch.from_numpy(tokens))
    return logits, dict(zip(state_io_names(m)[0], (s.numpy() for s in state)))


def assert_state_close(ours: State, ref: dict):
    got = ours.to_numpy()
    assert list(got) == list(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_init_state_follows_the_manifest(sessions, exported, backend, version):
    import json

    sess = sessions(backend, version)
    table = json.loads((exported(version) / "manifest.json").read_text())["state"]
    state = sess.init_state(3)
    assert isinstance(state, State) and state.batch == 3
    assert list(state) == sess.state_names == [s["input"] for s in table]
    arrays = state.to_numpy()
    for s, spec in zip(table, sess.state_specs):
        assert (spec.name, list(spec.shape), spec.dtype) == (s["input"], s["shape"], s["dtype"])
        assert arrays[s["input"]].shape == (3, *s["shape"][1:]) and arrays[s["input"]].dtype == np.dtype(s["dtype"])
        np.testing.assert_array_equal(arrays[s["input"]], np.full((3, *s["shape"][1:]), s["init"], s["dtype"]))
    assert sess.vocab_size == 97 and sess.has_prefill


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_forward_prefill_match_the_reference(sessions, make_ckpt, backend, version):
    """At batch 3: T+1 single steps, forward(T) (the LAST position's logits) + step, and prefill(T) + step all
    give the reference's logits and state."""
    sess = sessions(backend, version)
    T = 6
    tokens = np.random.default_rng(7).integers(0, 97, (3, T + 1))
    ref, ref_state = reference(make_ckpt(version), tokens)

    state, rows = sess.init_state(3), []
    for t in range(T + 1):
        logits, state = sess.step(tokens[:, t], state)
        assert logits.shape == (3, 97)
        rows.append(logits)
    assert normalised(np.stack(rows, 1), ref) <= 1e-5
    assert_state_close(state, ref_state)

    for run in (sess.forward, sess.prefill):  # the prefill graph of these exports returns the last position too
        last, state = run(tokens[:, :T], sess.init_state(3))
        assert last.shape == (3, 97)
        assert normalised(last, ref[:, T - 1]) <= 1e-5
        assert normalised(last, ref[:, T - 2]) > 1e-3  # not some other position
        logits, state = sess.step(tokens[:, T], state)
        assert normalised(logits, ref[:, T]) <= 1e-5
        assert_state_close(state, ref_state)


@pytest.mark.parametrize("version", ["4", "5.2", "7"])
def test_backends_agree_with_each_other(sessions, version):
    tokens = np.random.default_rng(3).integers(0, 97, (2, 9))
    out = {}
    for backend in BACKENDS:
        sess = sessions(backend, version)
        logits, state = sess.forward(tokens, sess.init_state(2))
        out[backend] = logits, state.to_numpy()
    for backend in BACKENDS[1:]:
        assert normalised(out[backend][0], out["ort"][0]) <= 1e-5
        for name, a in out["ort"][1].items():
            np.testing.assert_allclose(out[backend][1][name], a, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_state_round_trips(sessions, backend):
    sess = sessions(backend, "6")
    _, state = sess.forward(np.array([[5, 6, 7], [8, 9, 10]]), sess.init_state(2))
    arrays = state.to_numpy()
    again = sess.state_from_numpy(arrays)
    assert list(again) == list(state) and again.batch == 2
    a, _ = sess.step(np.array([1, 2]), state)
    b, _ = sess.step(np.array([1, 2]), again)
    np.testing.assert_array_equal(a, b)
    c, _ = sess.step(np.array([1, 2]), state)  # a State is never changed in place: it can be reused
    np.testing.assert_array_equal(a, c)
    for x in arrays.values():  # to_numpy hands out copies, and state_from_numpy takes one
        x[...] = 0
    np.testing.assert_array_equal(sess.step(np.array([1, 2]), again)[0], a)
    # format-1 callers: a list of numpy arrays in the manifest's order still works, and returns a State
    d, new = sess.step(np.array([1, 2]), list(state.to_numpy().values()))
    np.testing.assert_array_equal(a, d)
    assert isinstance(new, State)
    # one batch row of the state, taken out by name, runs alone
    row = sess.state_from_numpy({n: x[1:] for n, x in state.to_numpy().items()})
    np.testing.assert_allclose(sess.step(np.array([2]), row)[0], a[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_state_is_one_clear_error(sessions, backend):
    sess = sessions(backend, "5.1")
    state = sess.init_state(2)
    arrays = state.to_numpy()
    with pytest.raises(RWKVDeployError, match=r"missing \['state\.0\.att_x'\]"):
        sess.state_from_numpy({k: v for k, v in arrays.items() if k != "state.0.att_x"})
    with pytest.raises(RWKVDeployError, match=r"state state\.0\.S: expected float32 \[2, 4, 16, 16\]"):
        sess.state_from_numpy({**arrays, "state.0.S": arrays["state.0.S"][:, :2]})
    with pytest.raises(RWKVDeployError, match="tokens are a batch of 3, the state a batch of 2"):
        sess.step(np.array([1, 2, 3]), state)
    with pytest.raises(RWKVDeployError, match="token id 97 is out of range"):
        sess.step(np.array([1, 97]), state)
    other = sessions(next(b for b in BACKENDS if b != backend), "5.1")
    with pytest.raises(RWKVDeployError, match=r"state_from_numpy\(state.to_numpy\(\)\)"):
        sess.step(np.array([1, 2]), other.init_state(2))
    converted = sess.state_from_numpy(other.init_state(2).to_numpy())  # the explicit way across backends
    np.testing.assert_array_equal(sess.step(np.array([1, 2]), converted)[0], sess.step(np.array([1, 2]), state)[0])


def test_torch_session_of_an_export_runs_at_its_precision(exported):
    folder = exported("5.2", "fp16")
    sess = open_session(folder, backend="torch")
    onnx = open_session(folder)
    assert sess.backend == "torch cpu float16" and sess.manifest["precision"] == "fp16"
    assert sess.state_specs == onnx.state_specs  # fp16 activations, fp32 WKV state: the export's own table
    tokens = np.random.default_rng(0).integers(0, 97, (2, 5))
    a, _ = sess.forward(tokens, sess.init_state(2))
    b, _ = onnx.forward(tokens, onnx.init_state(2))
    assert normalised(a, b) <= 2e-2  # two fp16 computations of the same recipe


def test_open_session_choices(make_ckpt, exported):
    with pytest.raises(RWKVDeployError, match="has no TensorRT engine for its step graph.*rwkv-deploy engine"):
        open_session(exported("7"), backend="trt")
    with pytest.raises(RWKVDeployError, match="unknown backend 'tf'.*ort, torch"):
        open_session(exported("7"), backend="tf")
    with pytest.raises(RWKVDeployError, match="is a checkpoint, not an export folder.*--backend torch"):
        open_session(make_ckpt("7"))
    if not _has_cuda_ort():
        with pytest.raises(RWKVDeployError, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
            open_session(exported("7"), providers="cuda")
    cpu = open_session(exported("7"), providers="cpu", threads=1)
    assert cpu.backend == "onnxruntime CPUExecutionProvider" and not cpu.io_binding


@pytest.mark.skipif(not _has_cuda_ort(), reason=NO_GPU)
@pytest.mark.parametrize("version", ["5.2", "7"])
def test_cuda_io_binding_keeps_the_state_on_the_gpu(exported, sessions, version):
    gpu = open_session(exported(version), providers="cuda")
    assert gpu.io_binding and "cuda" in gpu.backend
    tokens = np.random.default_rng(1).integers(0, 97, (2, 8))
    state = gpu.init_state(2)
    logits, state = gpu.forward(tokens[:, :4], state)
    for t in range(4, 8):
        logits, state = gpu.step(tokens[:, t], state)
        assert all(v.device_name() == "cuda" for v in state.values())  # never copied to the host in between
    cpu = sessions("ort", version)
    want, _ = cpu.forward(tokens, cpu.init_state(2))
    assert normalised(logits, want) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_torch_session_keeps_the_state_on_the_gpu(make_ckpt, sessions):
    gpu = open_session(make_ckpt("7"), backend="torch", providers="cuda")
    logits, state = gpu.forward(np.array([[1, 2, 3]]), gpu.init_state(1))
    assert all(t.is_cuda for t in state.values())
    cpu = sessions("torch", "7")
    assert normalised(logits, cpu.forward(np.array([[1, 2, 3]]), cpu.init_state(1))[0]) <= 1e-5


# --- run and verify on any backend ------------------------------------------------------------------------------

RATE = re.compile(r"^\d+ tokens in [\d.]+ s: [\d.-]+ tokens/s \(prompt \d+ tokens in [\d.]+ s\)$")




def test_run_on_any_backend_reports_tokens_per_second(world_model):
    ckpt, out = world_model
    args = ["--prompt", "Hello world", "--max-tokens", "8", "--temperature", "0"]
    runs = {"ort": run_cli("run", out, *args), "torch": run_cli("run", ckpt, *args, "--backend", "torch"),
            "torch-on-export": run_cli("run", out, *args, "--backend", "torch", "--provider", "cpu", "--threads", "1")}
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
        assert r.stdout.startswith("Hello world"), name
        assert RATE.match(r.stderr.splitlines()[-1]), (name, r.stderr)
        assert re.search(r"\(prompt 2 tokens in", r.stderr), r.stderr  # "Hello world" is 2 World tokens
    assert runs["ort"].stdout == runs["torch"].stdout == runs["torch-on-export"].stdout  # greedy: the same text


def test_run_refuses_what_it_cannot_run(world_model):
    ckpt, out = world_model
    one_error_line(run_cli("run", ckpt, "--prompt", "x"), "is a checkpoint, not an export folder", "--backend torch")
    one_error_line(run_cli("run", out, "--prompt", "x", "--backend", "trt"), "has no TensorRT engine", "rwkv-deploy engine")
    one_error_line(run_cli("run", out, "--prompt", "x", "--backend", "jax"), "unknown backend")
    one_error_line(run_cli("run", out, "--prompt", "x", "--provider", "tpu"), "--provider")
    if not _has_cuda_ort():
        one_error_line(run_cli("run", out, "--prompt", "x", "--provider", "cuda"), "onnxruntime-gpu")


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_verify_on_a_backend(exported, tmp_path, backend):
    folder = tmp_path / "out"
    shutil.copytree(exported("7"), folder)  # verify writes verify.json: not into the shared export
    r = run_cli("verify", folder, "--steps", "8", "--batch", "2", "--backend", backend, "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout
    want = "torch cpu float32" if backend == "torch" else "onnxruntime CPUExecutionProvider"
    assert f"via {want}," in r.stdout


def test_verify_with_the_torch_backend_is_exact(exported):
    """The torch backend runs what the reference at the export's precision runs: ratio 1, a harness check."""
    from rwkv_deploy.validation.compare import verify

    report = verify(exported("6", "fp16"), steps=6, batch=2, backend="torch", write=False)
    assert report and report.backend == "torch cpu float16"
    assert report.largest_ratio() == pytest.approx(1.0)
    with pytest.raises(RWKVDeployError, match="has no TensorRT engine for its step graph"):
        verify(exported("6"), steps=2, backend="trt", write=False)
