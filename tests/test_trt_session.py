"""The TensorRT Session (rwkv_deploy/trt/session.py) and the Polygraphy data loader the engine command writes.

Running an engine needs a CUDA GPU that TensorRT(-RTX) supports; no machine here has one, so those tests skip
with the reason. What runs here: the errors a user meets without engines or GPU, and the data loader's ONNX
Runtime half (its feeds against our ONNX Runtime session; `polygraphy run --onnxrt` where polygraphy installs).
"""
import importlib.util
import shutil
import subprocess

import numpy as np
import pytest

from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.runtime.session import open_session
from rwkv_deploy.trt import engine as E


def _gpu_reason():
    if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None:
        return "TensorRT is not installed"
    from rwkv_deploy.trt.cuda import no_gpu_reason

    return no_gpu_reason()


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"running a TensorRT engine needs a CUDA GPU and "
                                                              f"TensorRT: {GPU_REASON}")
needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="TensorRT-RTX is not installed (scripts/test.sh installs it)")


@pytest.fixture(scope="module")
def with_engines(exported, tmp_path_factory):
    """A v7 export with engines for this machine's GPU (the GPU tests only)."""
    folder = tmp_path_factory.mktemp("trt") / "out"
    shutil.copytree(exported("7"), folder)
    E.build_engines(folder, max_batch=4, max_seq=16)
    return folder


@needs_gpu
def test_engine_steps_match_onnxruntime(with_engines):
    trt_sess, ort = open_session(with_engines, "trt"), open_session(with_engines, "ort", "cpu")
    tokens = np.random.default_rng(0).integers(0, 97, (2, 6))
    s_trt, s_ort = trt_sess.init_state(2), ort.init_state(2)
    for t in range(tokens.shape[1]):
        a, s_trt = trt_sess.step(tokens[:, t], s_trt)
        b, s_ort = ort.step(tokens[:, t], s_ort)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    for name, ref in s_ort.to_numpy().items():
        np.testing.assert_allclose(s_trt.to_numpy()[name], ref, rtol=1e-3, atol=1e-3)
    a, _ = trt_sess.prefill(tokens, trt_sess.init_state(2))
    b, _ = ort.prefill(tokens, ort.init_state(2))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@needs_gpu
def test_state_stays_on_the_device_and_buffers_alternate(with_engines):
    sess = open_session(with_engines, "trt")
    state = sess.init_state(1)
    for t in range(3):
        _, state = sess.step(np.array([t]), state)
    kept = state  # a State kept while the loop goes on: later steps must not write into its buffers
    before = {k: v.copy() for k, v in kept.to_numpy().items()}
    for t in range(4):
        _, state = sess.step(np.array([t + 3]), state)
    first = sess.stream.pool.allocations
    for t in range(8):
        _, state = sess.step(np.array([t + 7]), state)
    assert sess.stream.pool.allocations == first  # ping-pong: freed buffers come back, no cudaMalloc per token
    after, latest = kept.to_numpy(), state.to_numpy()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not all(np.array_equal(before[k], latest[k]) for k in before)  # the steps did change the state
    sess.close()
    sess.close()  # a second close does nothing
    del kept, state  # their buffers are freed directly now that the pool is closed


@needs_gpu
def test_verify_with_the_trt_backend(with_engines):
    from rwkv_deploy.validation.compare import verify

    assert verify(with_engines, steps=16, backend="trt", write=False)


def test_a_folder_without_engines(exported):
    with pytest.raises(RWKVDeployError, match="has no TensorRT engine for its step graph.*rwkv-deploy engine"):
        open_session(exported("5.2"), "trt")


@needs_rtx
@pytest.mark.skipif(GPU_REASON is None, reason="this machine has a GPU: the error for its absence cannot happen")
def test_without_a_gpu_the_session_says_so(exported, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(exported("4"), folder)
    E.build_engines(folder, max_batch=1, max_seq=2, targets=["SM89"], graphs=["step"])
    with pytest.raises(RWKVDeployError, match="the TensorRT backend needs a CUDA GPU"):
        open_session(folder, "trt")


def test_data_loader_feeds_match_onnxruntime(exported, tmp_path):
    """The loader's feeds (from the manifest alone) run in ONNX Runtime and give the logits of our own session
    from the initial state: the ONNX Runtime half of `polygraphy run --onnxrt --trt`."""
    import onnxruntime as ort

    folder = tmp_path / "out"
    shutil.copytree(exported("6", time_state=True), folder)  # a state-tuned model: init_file states
    script = folder / E.DATA_LOADER
    shutil.copyfile(E.__file__.replace("engine.py", "data_loader.py"), script)
    spec = importlib.util.spec_from_file_location("loader", script)
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    ours = open_session(folder, "ort", "cpu")
    m = ours.manifest
    for graph, fn in (("step", loader.load_data), ("prefill", loader.load_prefill_data)):
        (feed,) = list(fn())
        g = m.graph(graph)
        sess = ort.InferenceSession(str(folder / g["file"]), providers=["CPUExecutionProvider"])
        logits = sess.run([g["logits"]], feed)[0]
        toks = feed[g["tokens"]]
        want, _ = (ours.step if graph == "step" else ours.prefill)(toks, ours.init_state(1))
        np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
        assert toks.ravel().tolist() == m["golden"]["tokens"][:toks.size]
    assert any(s.get("init_file") for s in m["state"])  # the loader read the tuned state, not zeros
    init = ours.init_state(1).to_numpy()
    assert all(np.array_equal(loader.initial_state(m, folder)[k], v) for k, v in init.items())


@pytest.mark.skipif(shutil.which("polygraphy") is None, reason="polygraphy is not installed (the trt extra has it)")
def test_polygraphy_runs_the_loader_with_onnxruntime(exported, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(exported("7"), folder)
    shutil.copyfile(E.__file__.replace("engine.py", "data_loader.py"), folder / E.DATA_LOADER)
    r = subprocess.run(["polygraphy", "run", str(folder / "model.onnx"), "--onnxrt", "--data-loader-script",
                        str(folder / E.DATA_LOADER)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout + r.stderr
