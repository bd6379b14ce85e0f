"""rwkv::MatMulQ8 / MatMulQ4, the products of fused int8/int4 exports' step and prefill graphs: exact integer math
on the export's own q and scale."""
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import normalised
from onnx import helper, numpy_helper

from rwkv_deploy import open_session
from rwkv_deploy.exporters.onnx_graph import tiled
from rwkv_deploy.models.quant import QUANTS, int8_blocks
from rwkv_deploy.validation.compare import verify

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")


@pytest.fixture(scope="module")
def library():
    from rwkv_deploy.custom_ops.build import build_library

    return str(build_library())


def _product(library, bits, q, scale, x_shape, n=None):
    """A session of one rwkv::MatMulQ{bits} node on q [K, N] (int values) and scale [K / 32, N], stored in the
    kernels' tiles as an export stores them."""
    stored, scales = tiled(q, scale, bits)
    node = helper.make_node(f"MatMulQ{bits}", ["x", "q", "s"], ["y"], domain="rwkv", n=q.shape[1] if n is None else n)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(stored, "q"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("rwkv", 1)])
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("path", ["plain", "avx2", "vnni", "amx"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("K, N, x_shape", [(64, 200, (1, 1, 64)), (96, 37, (3, 96)), (768, 130, (2, 9, 768)),
                                           (256, 256, (17, 256)), (128, 192, (3, 128)), (128, 320, (5, 128)),
                                           (96, 130, (70, 96)), (256, 64, (2, 20, 256)), (768, 1000, (1, 768))])
def test_products_are_exact_integer_sums(library, monkeypatch, path, bits, K, N, x_shape):
    """y = int8_blocks(x) (dequantized W), in float64: the kernel rounds x exactly as models/quant.py's
    reference does, multiplies in integers and scales once per block (float32 sums: ~1e-7 of the largest output).
    RWKV_DEPLOY_MATMULQ caps the path ("amx": no cap); a CPU without one runs the best it has, so on this
    workplace's CPU (AMX) each runs as named. N = 37 is one tile of 64 columns, mostly padding (and odd: int4 stores
    two a byte); 130, 200 and 1000 end in part of a tile; 1000 columns at one row are two tasks' runs of tiles (a
    decode step's); AMX takes 4 rows and more; 40 and 70 rows (prefill-like) are more than one tile of 16 rows on
    AMX's path and are rounded on several threads."""
    monkeypatch.setenv("RWKV_DEPLOY_MATMULQ", path)
    rng = np.random.default_rng(K + N + bits)
    quant = QUANTS[f"int{bits}"]
    w = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32) * 0.05)  # [out, in]
    q, scale = quant.quantize(w)
    x = rng.standard_normal(x_shape).astype(np.float32)
    x[..., :32] = 0  # an all-zero block: scale 1, every value 0
    y = _product(library, bits, q.T.numpy(), scale.T.contiguous().numpy(), x_shape).run(None, {"x": x})[0]
    rounded = int8_blocks(torch.from_numpy(x), 32).double().numpy()
    exact = rounded @ quant.dequantize(q, scale).double().numpy().T
    assert y.shape == (*x_shape[:-1], N)
    assert np.abs(y - exact).max() <= 1e-6 * np.abs(exact).max()
    unrounded = x.astype(np.float64) @ quant.dequantize(q, scale).double().numpy().T
    assert np.abs(y - unrounded).max() > 1e-4 * np.abs(exact).max()  # the input rounding is there


@pytest.mark.parametrize("path", ["plain", "avx2", "vnni", "amx"])
def test_inputs_round_half_to_even_on_every_path(library, monkeypatch, path):
    """Each block's largest |x| is 127, so its scale is 1 and every other value a tie (k + 0.5): through an
    identity weight the product returns the rounded input itself, which must be numpy's (half to even) exactly.
    5 rows: AMX takes them too."""
    monkeypatch.setenv("RWKV_DEPLOY_MATMULQ", path)
    rng = np.random.default_rng(1)
    x = rng.integers(-127, 127, (5, 64)).astype(np.float32) + 0.5  # [5, 64]
    x[:, 0], x[:, 33] = 127, -127
    y = _product(library, 8, np.eye(64, dtype=np.int8), np.ones((2, 64), np.float32), (5, 64)).run(None, {"x": x})[0]
    assert np.array_equal(y, np.round(x))


def test_shapes_that_do_not_multiply_are_an_error_not_a_crash(library):
    q, scale = np.zeros((64, 32), np.int8), np.ones((2, 32), np.float32)
    with pytest.raises(Exception, match=r"x \[1, 96\] and q \[1, 2, 2048\] do not multiply"):
        _product(library, 8, q, scale, (1, 96)).run(None, {"x": np.zeros((1, 96), np.float32)})
    with pytest.raises(Exception, match=r"q \[1, 2, 2048\] do not multiply .*n = 65"):  # n needs two tiles
        _product(library, 8, q, scale, (1, 64), n=65).run(None, {"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(Exception, match=r"no attribute n"):  # written before the tiles: its own library reads it
        _product(library, 8, q, scale, (1, 64), n=0).run(None, {"x": np.zeros((1, 64), np.float32)})


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("version", ["4", "7"])
def test_fused_quantized_exports_multiply_with_the_kernels(exported, version, precision):
    """The step and prefill graphs' products are MatMulQ nodes on the same initializers, stored in the kernels'
    tiles; the certificate and its weights check pass, and the logits sit where the portable export's do."""
    out = exported(version, precision, "fused")
    m = json.loads((out / "manifest.json").read_text())
    bits = {"int8": 8, "int4": 4}[precision]
    step = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    prefill = onnx.load(str(out / "prefill.onnx"), load_external_data=False).graph
    for graph in (step, prefill):
        ops = {n.op_type for n in graph.node}
        assert "DequantizeLinear" not in ops and f"MatMulQ{bits}" in ops
    assert f"MatMulQ{bits}" in m["requires"]["custom_ops"]["ops"]
    where = lambda t: (t.data_type, tuple(t.dims), [(e.key, e.value) for e in t.external_data])  # noqa: E731
    a = {t.name: where(t) for t in step.initializer if t.name.endswith("~q")}
    b = {t.name: where(t) for t in prefill.initializer if t.name.endswith("~q")}
    name = next(n for n in a if ".ffn.key." in n)
    assert a[name][2] == b[name][2] and a[name][2]  # the same bytes in the weights file
    # in the kernels' tiles: [ceil(N / 64), K / 32, 32 x 64 weights], N = dim_ffn columns of K = n_embd rows
    tiles = (-(-m["dim_ffn"] // 64), m["n_embd"] // 32, 2048 if bits == 8 else 1024)
    assert a[name][:2] == b[name][:2] == (onnx.TensorProto.UINT8 if bits == 4 else onnx.TensorProto.INT8, tiles)
    node = next(n for n in step.node if n.input[1:2] == [name])
    assert [(x.name, x.i) for x in node.attribute] == [("n", m["dim_ffn"])]
    assert "tiles of 64 columns" in m["quantization"]["method"]
    report = verify(out, steps=16, batch=2, write=False)
    assert report and report.weights["checked"] and not report.weights["differ"], report.table()
    # the kernels round each product's input exactly as the reference does: the logits are the reference's to
    # float32 summation order (ONNX Runtime's MatMulNBits rounds its own way: up to 1e-2 from it, v4 int8 here)
    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.models.model import at_precision
    from rwkv_deploy.validation.loop import stepwise

    tokens = np.random.default_rng(4).integers(0, 97, (2, 12))
    session = open_session(out)
    ours = np.asarray(stepwise(session, tokens)[0])
    ref = np.asarray(stepwise(at_precision(load_checkpoint(m["source"]["path"]), precision), torch.from_numpy(tokens))[0])
    assert normalised(ours, ref) <= 1e-5
    last = np.asarray(session.prefill(tokens, session.init_state(2))[0])  # [2, vocab]: the last position's
    assert normalised(last, ref[:, -1]) <= 1e-5


def test_weights_are_checked_in_the_form_the_manifest_names(exported):
    """verify holds a fused export's quantized weights to the tiles because its quantization.method names them; a
    fused export written before the tiles ("DequantizeLinear" there) kept the row order, which the library it
    shipped with reads, and is checked in that order. Told the other form, every quantized weight differs."""
    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.models.quant import TILED_FORM
    from rwkv_deploy.runtime.manifest import read_manifest
    from rwkv_deploy.validation.compare import check_weights

    m = read_manifest(exported("7", "int4", "fused"))
    ckpt = load_checkpoint(m["source"]["path"])
    assert check_weights(m, ckpt)["checked"] and not check_weights(m, ckpt)["differ"]
    q = m["quantization"]
    q["method"] = q["method"].replace(TILED_FORM, "DequantizeLinear, opset 21")
    differ = check_weights(m, ckpt)["differ"]
    assert {n for n in differ if n.endswith("~q")} == {f"{t}~q" for t in q["tensors"]}


def test_a_cpu_without_the_vector_paths_is_told_to_use_portable(exported, monkeypatch, caplog):
    """The library reports the path its products take on this CPU; where that is the plain loop (no AVX2, or a
    compiler too old for the intrinsics), opening a fused int8/int4 export warns that a portable export is faster.
    The library's answer is stubbed: this workplace's CPU has the vector paths."""
    import ctypes

    out = exported("7", "int8", "fused")
    reported = ctypes.CDLL(str(out / "librwkv_ops.so")).RwkvMatMulQPath
    reported.restype = ctypes.c_char_p
    assert reported() in (b"amx", b"vnni", b"avx2", b"plain")
    real = ctypes.CDLL

    class WithoutVectors:
        def __init__(self, path):
            self.lib = real(path)

        def __getattr__(self, name):
            if name != "RwkvMatMulQPath":
                return getattr(self.lib, name)
            answer = lambda: b"plain"  # noqa: E731
            return answer

    with caplog.at_level("WARNING"):
        open_session(out)
    assert "plain loop" not in caplog.text
    monkeypatch.setattr(ctypes, "CDLL", WithoutVectors)
    with caplog.at_level("WARNING"):
        open_session(out)
    assert "plain loop" in caplog.text and "--matmul portable" in caplog.text
