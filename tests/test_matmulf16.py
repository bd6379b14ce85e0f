"""rwkv::MatMulF16, the products of fp16 exports made with `--matmul cpu`: the stored float16 weights read as they
are (ONNX Runtime's CPU provider widens them to float32 at load), in tiles of 64 columns, float32 sums, float16 out."""
import json

import numpy as np
import onnx
import pytest
from conftest import normalised, one_error_line, run_cli
from onnx import helper, numpy_helper

from rwkv_deploy import open_session
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.exporters.onnx_graph import half_tiled
from rwkv_deploy.validation.compare import verify

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")
PATHS = ["plain", "avx2", "vnni"]  # RWKV_DEPLOY_MATMULQ's caps: "vnni" (or none) lets AVX-512 CPUs take that path


@pytest.fixture(scope="module")
def library():
    from rwkv_deploy.custom_ops.build import build_library

    return str(build_library())


def _product(library, w, x_shape, n=None, tiles=None):
    """A session of one rwkv::MatMulF16 on W [K, N] (stored in its tiles unless `tiles` gives them), attribute n."""
    node = helper.make_node("MatMulF16", ["x", "w"], ["y"], domain="rwkv",
                            **({} if n is False else {"n": w.shape[1] if n is None else n}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, None)],
                              [numpy_helper.from_array(half_tiled(w) if tiles is None else tiles, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("rwkv", 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_tiles_hold_each_column_of_64_in_turn():
    """half_tiled against its documented layout, element by element: tile t, row k, column c is W[k, 64 t + c],
    zeros past N."""
    w = np.arange(5 * 130, dtype=np.float16).reshape(5, 130)  # [K = 5, N = 130]: 3 tiles, the last of 2 columns
    t = half_tiled(w)
    assert t.shape == (3, 5, 64) and t.dtype == np.float16 and t.flags.c_contiguous
    for tile, k, c in np.ndindex(*t.shape):
        assert t[tile, k, c] == (w[k, 64 * tile + c] if 64 * tile + c < 130 else 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("K, N, x_shape", [(64, 200, (1, 1, 64)), (96, 40, (3, 96)), (768, 130, (2, 9, 768)),
                                           (5, 33, (1, 5)), (300, 1000, (4, 300)), (128, 64, (7, 128)),
                                           (96, 100, (6, 96)), (40, 65, (5, 40)), (100, 70, (11, 100)),
                                           (200, 300, (16, 200)), (65, 129, (2, 65))])
def test_products_are_float32_sums_of_the_stored_weights(library, monkeypatch, path, K, N, x_shape):
    """Against float64 on the same float16 values: within float16's rounding of the output (2^-11 of it) plus
    float32 summation. Shapes with tail columns (40, 130, 200, 33, 65, 70, 300), odd K (5, 65: one row of x sums
    even and odd rows apart), 1-18 rows of x (more than 4: the batched path, in groups of 6 and 4 rows and the rest,
    whose last chunk of 64 rows of w is short for K = 40, 96, 100, 200, 300; several tiles a task for N = 1000)."""
    monkeypatch.setenv("RWKV_DEPLOY_MATMULQ", path)
    rng = np.random.default_rng(K + N)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float16)  # [K, N]
    x = rng.standard_normal(x_shape).astype(np.float16)  # [..., K]
    y = _product(library, w, x_shape).run(None, {"x": x})[0]
    assert y.shape == (*x_shape[:-1], N) and y.dtype == np.float16
    exact = x.astype(np.float64) @ w.astype(np.float64)
    size = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    assert np.all(np.abs(y - exact) <= 2.0 ** -11 * np.abs(exact) + 1e-6 * size + 2.0 ** -24)


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read this CPU's flags from")
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())


@pytest.mark.parametrize("cap", PATHS)
def test_each_cap_takes_the_path_the_library_reports(library, monkeypatch, cap):
    """The path a product takes here, read from the library (RwkvMatMulF16Path, what the session checks before it
    warns), against what this CPU's flags allow: AVX-512 F/BW/VL is enough for that path (no VNNI needed)."""
    import ctypes

    flags = _cpu_flags()
    avx2 = "avx2" if {"avx2", "fma", "f16c"} <= flags else "plain"
    expected = {"plain": "plain", "avx2": avx2,
                "vnni": "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else avx2}[cap]
    monkeypatch.setenv("RWKV_DEPLOY_MATMULQ", cap)
    reported = ctypes.CDLL(library).RwkvMatMulF16Path
    reported.restype = ctypes.c_char_p
    assert reported().decode() == expected


@pytest.mark.parametrize("path", PATHS)
def test_every_finite_float16_weight_is_read_exactly(library, monkeypatch, path):
    """All 63,488 finite float16 bit patterns (subnormals and -0 included) as the weights, x one-hot: each output is
    one weight times 1, so it comes back with its own bits when the conversion in and out is exact."""
    monkeypatch.setenv("RWKV_DEPLOY_MATMULQ", path)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = bits[(bits & 0x7C00) != 0x7C00]  # [63488]
    w = finite.view(np.float16).reshape(64, -1)  # [K = 64, N = 992]
    x = np.eye(64, dtype=np.float16)[[0, 5, 63]]  # [3, 64]: rows 0, 5 and 63
    y = _product(library, w, (3, 64)).run(None, {"x": x})[0]
    assert np.array_equal(y, w[[0, 5, 63]])  # -0 compares equal to the +0 that 1 x -0 + 0 gives


def test_shapes_that_do_not_multiply_are_an_error_not_a_crash(library):
    w = np.zeros((64, 32), np.float16)
    with pytest.raises(Exception, match=r"x \[1, 96\] and w \[1, 64, 64\] do not multiply .*n = 32"):
        _product(library, w, (1, 96)).run(None, {"x": np.zeros((1, 96), np.float16)})
    with pytest.raises(Exception, match=r"w \[1, 64, 64\] do not multiply .*n = 65"):  # two tiles for 65 columns
        _product(library, w, (1, 64), n=65).run(None, {"x": np.zeros((1, 64), np.float16)})
    with pytest.raises(Exception, match=r"w \[64, 32\] do not multiply"):  # W itself, not its tiles
        _product(library, w, (1, 64), tiles=w).run(None, {"x": np.zeros((1, 64), np.float16)})
    with pytest.raises(Exception, match="no attribute n .* runs with the library it shipped with"):
        _product(library, w, (1, 64), n=False).run(None, {"x": np.zeros((1, 64), np.float16)})


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_fp16_exports_for_the_cpu_multiply_with_the_kernel(exported, version):
    """Every product of a float16 weight in the step graph is an rwkv::MatMulF16 on that weight's tiles; the prefill
    graph keeps MatMul (ONNX Runtime's GEMM is the faster one at 256 rows) on W put back from the same tiles, so the
    folder holds one copy. The certificate and its weights check pass, and the logits (step and prefill) sit where
    the portable fp16 export's do."""
    out = exported(version, "fp16", "fused", matmul="cpu")
    m = json.loads((out / "manifest.json").read_text())
    step = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    prefill = onnx.load(str(out / "prefill.onnx"), load_external_data=False).graph
    fp16 = onnx.TensorProto.FLOAT16
    tiles = {t.name: list(t.dims) for t in step.initializer if t.data_type == fp16 and len(t.dims) == 3}
    plain = {t.name for g in (step, prefill) for t in g.initializer if t.data_type == fp16 and len(t.dims) == 2}
    products = [n for n in step.node if n.op_type == "MatMulF16"]
    assert products and all(n.input[1] in tiles and n.input[1].endswith("~t") for n in products)
    for n in products:  # [ceil(n / 64), K, 64]
        cols = next(a.i for a in n.attribute if a.name == "n")
        assert tiles[n.input[1]][0] == -(-cols // 64) and tiles[n.input[1]][2] == 64
    assert not any(n.op_type == "MatMul" and n.input[1] in plain for n in step.node)
    assert "MatMulF16" not in {n.op_type for n in prefill.node}
    untiled = {n.input[0] for n in prefill.node if n.op_type == "Transpose" and n.input[0].endswith("~t")}
    assert untiled and untiled <= set(tiles)
    assert not {x.split("~")[0] for x in plain} & {x.split("~")[0] for x in tiles}  # no weight stored twice
    assert m["requires"]["custom_ops"]["ops"] == ["MatMulF16", {"4": "WKV4", "7": "WKV7"}.get(version, "WKV5")]
    report = verify(out, steps=16, batch=2, write=False)
    assert report and report.weights["checked"] and not report.weights["differ"], report.table()
    from rwkv_deploy.validation.loop import stepwise

    tokens = np.random.default_rng(4).integers(0, 97, (2, 12))
    sess, ref = open_session(out), open_session(exported(version, "fp16"))
    ours = np.asarray(stepwise(sess, tokens)[0], np.float64)
    portable = np.asarray(stepwise(ref, tokens)[0], np.float64)
    assert normalised(ours, portable) <= 1e-2
    ours, _ = sess.prefill(tokens, sess.init_state(2))
    portable, _ = ref.prefill(tokens, ref.init_state(2))
    assert normalised(np.asarray(ours, np.float64), np.asarray(portable, np.float64)) <= 1e-2


def test_verify_fails_an_fp16_kernel_export_with_a_damaged_tile(exported, tmp_path):
    """One tile's bytes changed in weights.onnx.data: the weights check names that initializer."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(exported("7", "fp16", "fused", matmul="cpu"), out)
    step = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    t = max((t for t in step.initializer if t.name.endswith("~t")), key=lambda t: np.prod(t.dims))
    where = {e.key: e.value for e in t.external_data}
    with open(out / where["location"], "r+b") as f:
        f.seek(int(where["offset"]))
        f.write(np.full(64, 0.5, np.float16).tobytes())  # the first tile's first row
    report = verify(out, steps=4, batch=1, write=False)
    assert report.weights["differ"] == [t.name] and not report


def test_the_matmul_option_is_refused_where_it_cannot_apply(make_ckpt, tmp_path, exported):
    from rwkv_deploy import export

    ckpt = make_ckpt("7")
    with pytest.raises(RWKVDeployError, match="fp32 products are ONNX Runtime's own"):
        export(ckpt, tmp_path / "a", precision="fp32", wkv="fused", matmul="cpu")
    with pytest.raises(RWKVDeployError, match="--matmul cpu needs the custom-op library.*add --wkv fused"):
        export(ckpt, tmp_path / "b", precision="fp16", matmul="cpu")
    r = run_cli("export", str(ckpt), "-o", str(tmp_path / "c"), "--precision", "int8", "--matmul", "cpu")
    assert r.returncode == 2 and one_error_line(r, "--wkv fused")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # fused WKV with portable products: what a GPU or TensorRT takes (the int8 weights behind DequantizeLinear)
    out = exported("7", "int8", "fused", matmul="portable")
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops and not any(op.startswith("MatMulQ") for op in ops) and "WKV7" in ops
    assert json.loads((out / "manifest.json").read_text())["requires"]["custom_ops"]["ops"] == ["WKV7"]
