"""The fused WKV operators: graph structure, parity with portable and the reference, errors."""
import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import VERSIONS, normalised, run_cli

from rwkv_deploy import open_session
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.validation.compare import verify

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")


@pytest.fixture
def fused(exported):
    return lambda version, precision="fp32", wkv="fused": exported(version, precision, wkv)


def rwkv_nodes(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "rwkv"]


@pytest.mark.parametrize("version", VERSIONS)
def test_one_wkv_node_per_layer(fused, version):
    out = fused(version)
    m = json.loads((out / "manifest.json").read_text())
    op = {"4": "WKV4", "7": "WKV7"}.get(version, "WKV5")  # v5.x and v6 share one operator
    for graph in ("model.onnx", "prefill.onnx"):
        assert rwkv_nodes(out / graph) == [op] * m["n_layer"]
        assert not rwkv_nodes(fused(version, wkv="portable") / graph)
    lib = m["requires"]["custom_ops"]["libraries"]["CPUExecutionProvider"]
    assert m["wkv"] == "fused" and lib["path"] == "librwkv_ops.so" and m["requires"]["custom_ops"]["ops"] == [op]
    assert (out / "librwkv_ops.so").exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("version", VERSIONS)
def test_fused_matches_reference_and_portable(fused, version, precision):
    report = verify(fused(version, precision), steps=64, batch=4)
    bound = 1e-5 if precision == "fp32" else 2e-2
    for s in report.summaries().values():
        assert s["export_worst"] <= bound and s["top1"] >= 0.99, report.table()
    a, b = open_session(fused(version, precision)), open_session(fused(version, precision, "portable"))
    tokens = np.random.default_rng(3).integers(0, 97, (2, 30))
    la, _ = a.prefill(tokens, a.init_state(2))
    lb, _ = b.prefill(tokens, b.init_state(2))
    assert normalised(la, lb) <= bound


def single_node_model(op, inputs):
    """A graph holding one rwkv node, inputs of any shape (to feed it wrong ones)."""
    from rwkv_deploy.custom_ops.torch_ops import SIGNATURES

    ins, outs = SIGNATURES[op]
    node = onnx.helper.make_node(op, ins, outs, domain="rwkv")
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ins],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outs])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                       onnx.helper.make_opsetid("rwkv", 1)])


def _one_kernel(fused, version, op):
    """An ONNX Runtime session of one rwkv node, with the library of a fused export of `version`."""
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(fused(version) / "librwkv_ops.so"))
    return ort.InferenceSession(single_node_model(op, None).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _wkv4_float64(w, u, k, v, aa, bb, pp):
    """RWKV-4's recurrence in float64 (spec's stable form), token by token: y [B, T, A] and the state."""
    w, u, k, v, a, b, p = (np.asarray(x, np.float64) for x in (w, u, k, v, aa, bb, pp))
    ys = []
    for t in range(k.shape[1]):
        ww = u + k[:, t]
        q = np.maximum(p, ww)
        e1, e2 = np.exp(p - q), np.exp(ww - q)
        ys.append((e1 * a + e2 * v[:, t]) / (e1 * b + e2))
        ww = w + p
        q = np.maximum(ww, k[:, t])
        e1, e2 = np.exp(ww - q), np.exp(k[:, t] - q)
        a, b, p = e1 * a + e2 * v[:, t], e1 * b + e2, q
    return np.stack(ys, 1), a, b, p


@pytest.mark.parametrize("path", ["plain", "vnni"])
@pytest.mark.parametrize("A", [70, 100, 128])
def test_wkv4_kernel_against_float64(fused, monkeypatch, path, A):
    """The WKV4 kernel on its own, B = 2, T = 40, from a fresh state (pp = -1e38) and from a running one: the
    scalar loop (RWKV_DEPLOY_MATMULQ=plain) and, where the CPU has AVX-512, 16 channels a lane-step with the
    kernel's own exp (70 and 100 channels leave a scalar tail in a task's block of 64), within float32 rounding
    of float64."""
    monkeypatch.setenv("RWKV_DEPLOY_MATMULQ", path)
    sess = _one_kernel(fused, "4", "WKV4")
    rng = np.random.default_rng(A)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feeds = dict(w=-np.exp(f(A)), u=f(A), k=3 * f(2, 40, A), v=f(2, 40, A), aa=np.zeros((2, A), np.float32),
                 bb=np.zeros((2, A), np.float32), pp=np.full((2, A), -1e38, np.float32))
    feeds["aa"][1], feeds["bb"][1], feeds["pp"][1] = f(A), np.abs(f(A)) + 1, f(A)  # the second row mid-sequence
    got = sess.run(None, feeds)
    exact = _wkv4_float64(*feeds.values())
    assert np.abs(got[0] - exact[0]).max() <= 1e-5 * np.abs(exact[0]).max()
    for g, e in zip(got[1:], exact[1:]):
        assert np.abs(g - e).max() <= 1e-5 * np.abs(e).max()


def _wkv7_float64(r, w, k, v, a, b, S):
    """RWKV-7's recurrence in float64, token by token: S = S diag(w) + (S a) bᵀ + v kᵀ, y = S r (S value x key)."""
    r, w, k, v, a, b, S = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b, S))
    S, ys = S.copy(), []
    for t in range(r.shape[1]):
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * w[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] + v[:, t, ..., None] * k[:, t, :, None, :]
        ys.append(np.einsum("bhij,bhj->bhi", S, r[:, t]))
    return np.stack(ys, 1), S


@pytest.mark.parametrize("N", [6, 16])
def test_wkv7_kernel_against_float64(fused, N):
    """The WKV7 kernel on its own, B = 2, T = 5, H = 2: state rows go four at a time, so N = 6 also takes the
    padded last rows; within float32 rounding of float64 (the kernel sums in double)."""
    sess = _one_kernel(fused, "7", "WKV7")
    rng = np.random.default_rng(N)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    kk = f(2, 5, 2, N)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    feeds = dict(r=f(2, 5, 2, N), w=np.exp(-np.exp(f(2, 5, 2, N) - 1)), k=f(2, 5, 2, N), v=f(2, 5, 2, N), a=-kk,
                 b=kk * 0.5, S=f(2, 2, N, N))
    y, S = sess.run(None, feeds)
    ey, eS = _wkv7_float64(*feeds.values())
    assert np.abs(y - ey).max() <= 1e-5 * np.abs(ey).max()
    assert np.abs(S - eS).max() <= 1e-5 * np.abs(eS).max()


@pytest.mark.parametrize("op,feeds,message", [
    ("WKV5", dict(r=(2, 3, 4, 8), k=(2, 3, 4, 8), v=(2, 3, 4, 8), w=(2, 3, 4, 8), u=(4, 8), S=(2, 4, 8, 7)),
     "input S has shape [2, 4, 8, 7], expected [2, 4, 8, 8]"),
    ("WKV5", dict(r=(2, 3, 4, 8), k=(2, 3, 4, 8), v=(2, 9, 4, 8), w=(2, 3, 4, 8), u=(4, 8), S=(2, 4, 8, 8)),
     "input v has shape [2, 9, 4, 8]"),
    ("WKV7", dict(r=(1, 2, 8), w=(1, 2, 8), k=(1, 2, 8), v=(1, 2, 8), a=(1, 2, 8), b=(1, 2, 8), S=(1, 8, 8)),
     "input r must be [B, T, H, N]"),
    ("WKV4", dict(w=(5,), u=(6,), k=(1, 2, 6), v=(1, 2, 6), aa=(1, 6), bb=(1, 6), pp=(1, 6)),
     "input w has shape [5], expected [6]"),
])
def test_wrong_shapes_are_an_ort_error_not_a_crash(fused, tmp_path, op, feeds, message):
    lib = fused("7") / "librwkv_ops.so"
    path = tmp_path / "one.onnx"
    onnx.save(single_node_model(op, feeds), str(path))
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        sess.run(None, {n: np.zeros(s, np.float32) for n, s in feeds.items()})


def test_missing_library_is_a_clear_error(fused, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(fused("6"), out)
    (out / "librwkv_ops.so").unlink()
    with pytest.raises(RWKVDeployError, match="custom-op library .* is missing; rebuild it with `rwkv-deploy build-ops`"):
        open_session(out)
    r = run_cli("verify", out)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "build-ops" in r.stderr


def test_incompatible_library_is_a_clear_error(fused, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(fused("6"), out)
    (out / "librwkv_ops.so").unlink()  # a new file: the old one is still mapped into this process
    (out / "librwkv_ops.so").write_bytes(b"not a library")
    with pytest.raises(RWKVDeployError, match="not the library this folder was exported with"):
        open_session(out)  # format 2 pins the library's sha256
    m = json.loads((out / "manifest.json").read_text())
    m["requires"]["custom_ops"]["libraries"]["CPUExecutionProvider"]["sha256"] = hashlib.sha256(b"not a library").hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RWKVDeployError, match="did not build, so it was not loaded"):
        open_session(out)  # a library this installation did not build is never loaded unless trusted


def test_build_ops_command():
    r = run_cli("build-ops")
    assert r.returncode == 0 and r.stdout.strip().endswith("librwkv_ops.so")
