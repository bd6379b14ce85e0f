"""int8/int4 exports: blockwise weights behind DequantizeLinear, certified against references with the same weights."""
import json

import numpy as np
import pytest
import torch
from conftest import VERSIONS, run_cli

from rwkv_deploy.models.quant import LORA, QUANTS, Int8Input, int8_blocks
from rwkv_deploy.validation.compare import verify

onnx = pytest.importorskip("onnx", reason="onnx is needed (pip install -e .[onnx])")
pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")


def test_quantize_by_hand():
    """One block of 32 worked out by hand: scale max|w| / qmax, q = round(w / scale)."""
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([127, -63.5, 30, 0]) / 64  # scales that are powers of two keep this exact
    q, scale = QUANTS["int8"].quantize(w)
    assert scale.tolist() == [[1 / 64]] and q[0, :4].tolist() == [127, -64, 30, 0]  # -63.5: half to even
    w[0, :4] = torch.tensor([7, -3.5, 2, 1.5]) / 8
    q4, scale4 = QUANTS["int4"].quantize(w)
    assert scale4.tolist() == [[1 / 8]] and q4[0, :4].tolist() == [7, -4, 2, 2]
    assert QUANTS["int8"].quantize(torch.zeros(2, 64))[0].abs().sum() == 0  # an all-zero block stays zero


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_round_trip_is_idempotent_and_bounded(precision):
    """The export re-quantizes the reference's dequantized weights: that must give back the same q and scale."""
    qz = QUANTS[precision]
    w = torch.randn(64, 96) * 0.05
    q, scale = qz.quantize(w)
    assert q.abs().max() <= qz.qmax and (q.abs().reshape(64, -1, 32).amax(-1) == qz.qmax).all()
    back = qz.round_trip(w)
    q2, scale2 = qz.quantize(back)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)
    err = (back - w).abs().reshape(64, -1, 32) / scale[..., None]
    assert err.max() <= 0.5 + 1e-5  # round to nearest: at most half a step


def test_int8_blocks_by_hand():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 32] = 2.54, 0.03, -1.0  # block 0 step 0.02; block 1 step 1/127
    y = int8_blocks(x, 32)
    assert y[0, 0] == pytest.approx(2.54) and y[0, 1] == pytest.approx(0.04)  # 1.5 steps rounds to 2
    assert y[0, 32] == pytest.approx(-1.0) and y[0, 2:32].abs().sum() == 0


def test_int8_input_rounds_only_in_linear():
    w = Int8Input.wrap(torch.randn(8, 32), 32)
    x = torch.randn(3, 32)
    rounded = torch.nn.functional.linear(int8_blocks(x, 32), w.as_subclass(torch.Tensor))
    assert torch.equal(torch.nn.functional.linear(x, w), rounded)
    assert type(w * 2) is torch.Tensor and type(torch.nn.functional.linear(x, w)) is torch.Tensor
    lora = Int8Input.wrap(torch.randn(32, 8), 32)  # a LoRA factor, read as x @ W
    assert torch.equal(x @ lora, int8_blocks(x, 32) @ lora.as_subclass(torch.Tensor))
    assert torch.equal(torch.matmul(x, lora), x @ lora) and not torch.equal(x @ lora, x @ lora.as_subclass(torch.Tensor))


def _eight_bits(initializer: str) -> bool:
    """Whether an int4 export keeps this weight at int8: the head and RWKV-7's LoRA factors."""
    name = initializer.split("~")[0]
    return name == "model.head" or (name.startswith("model.blocks.") and name.split(".", 3)[3] in LORA)


def _initializers(folder):
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return m, {t.name: t for t in m.graph.initializer}


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("version", VERSIONS)
def test_quantized_export_checks_and_verifies(exported, version, precision):
    out = exported(version, precision)
    m = json.loads((out / "manifest.json").read_text())
    assert m["weights_dtype"] == precision and m["compute_dtype"] == "float32" and m["opset"] >= 21
    q = m["quantization"]
    assert q["block_size"] == 32 and "int8" in q["activations"]
    proto, inits = _initializers(out)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    want = {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.INT4}[precision]
    # every layer's projections and the head: 6 (v7: its gate is a LoRA, no ffn receptance) to 8 per layer
    assert len(dq) == len(q["tensors"]) >= 6 * m["n_layer"] + 1
    for n in dq:
        assert {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} == {"axis": 0, "block_size": 32}
        assert inits[n.input[0]].data_type == (onnx.TensorProto.INT8 if _eight_bits(n.input[0]) else want)
        assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    assert ("head int8" in q["method"]) == (precision == "int4")
    assert any(t.startswith("model.head") for t in q["tensors"])
    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.models.model import at_precision

    model = at_precision(load_checkpoint(m["source"]["path"]), "fp32")  # the LoRA factors it uses whose blocks fit
    loras = {f"model.{k}" for k, t in model.named_buffers() if k.split(".", 2)[-1] in LORA and t.shape[0] % 32 == 0}
    assert {t for t in q["tensors"] if _eight_bits(t) and not t.startswith("model.head")} == loras
    assert q.get("lora_bits") == (8 if version == "7" else None) and bool(loras) == (version == "7")
    r = run_cli("check", out)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    report = verify(out, steps=12, batch=2, write=False)
    assert report, report.table()
    assert report.weights["checked"] == len(inits) and not report.weights["differ"]


def test_stored_integers_are_the_reference_weights(exported):
    """The int4 initializers, unpacked by onnx itself, times their scales, are the reference's dequantized
    weights: the export and its certificate hold the same numbers."""
    from onnx import numpy_helper

    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.models.model import at_precision

    out = exported("7", "int4")
    m = json.loads((out / "manifest.json").read_text())
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    name = next(t for t in m["quantization"]["tensors"] if ".1.ffn.key." in t)
    q, s = inits[f"{name}~q"], inits[f"{name}~s"]  # [in, out] int values in [-7, 7], [in / 32, out]
    assert q.dtype != np.float32 and np.abs(q.astype(int)).max() <= 7
    dequant = q.astype(np.float32) * np.repeat(s, 32, axis=0)  # [in, out]
    ref = at_precision(load_checkpoint(m["source"]["path"]), "int4").blocks[1].ffn.key.weight  # [out, in]
    np.testing.assert_array_equal(dequant.T, ref.as_subclass(torch.Tensor).numpy())


def _stored_bytes(folder) -> dict:
    m, _ = _initializers(folder)
    length = lambda t: int({e.key: e.value for e in t.external_data}.get("length", 0)) or len(t.raw_data)  # noqa: E731
    return {t.name: length(t) for t in m.graph.initializer}


def test_folder_sizes_shrink(make_ckpt, tmp_path):
    """The quantized matrices take 1 + 1/8 (int8) and 1/2 + 1/8 (int4) bytes a weight, a float32 scale per block
    of 32: 0.5625 and 0.3125 of fp16's bytes (int4's head at int8: 0.5625); whole folders shrink in that order."""
    from rwkv_deploy import export

    ckpt = make_ckpt("7", n_layer=2, n_embd=256, head_size=64, vocab_size=512)
    out = {p: export(ckpt, tmp_path / p, precision=p, prefill=True) for p in ("fp32", "fp16", "int8", "int4")}
    size = {p: sum(f.stat().st_size for f in o.rglob("*") if f.is_file()) for p, o in out.items()}
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"], size
    half = _stored_bytes(out["fp16"])
    for p, ratio in (("int8", 0.5625), ("int4", 0.3125)):
        stored = _stored_bytes(out[p])
        names = json.loads((out[p] / "manifest.json").read_text())["quantization"]["tensors"]
        for n in names:
            want = 0.5625 if _eight_bits(n) else ratio
            assert (stored[f"{n}~q"] + stored[f"{n}~s"]) / half[n] == want, n


def test_report_gives_top1_agreement_with_the_unquantized_model(exported):
    """verify's fp32_top1, recomputed another way: the export stepped on its own state and the float32 model
    stepped whole (stepwise, not layer by layer), on verify's tokens."""
    from rwkv_deploy import open_session
    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.models.model import at_precision
    from rwkv_deploy.validation.loop import stepwise

    out = exported("5.2", "int8")
    report = verify(out, steps=20, batch=2, seed=3, write=False)
    assert report.to_json()["fp32_top1"] == report.fp32_top1 and "unquantized float32" in report.table()
    m = json.loads((out / "manifest.json").read_text())
    tokens = np.random.default_rng(3).integers(0, m["vocab_size"], size=(20, 2)).T  # [B, T], as verify draws them
    ours = stepwise(open_session(out), tokens)[0].argmax(-1)
    fp32 = stepwise(at_precision(load_checkpoint(m["source"]["path"]), "fp32"), torch.from_numpy(tokens))[0]
    assert report.fp32_top1 == pytest.approx((ours == fp32.argmax(-1)).mean())
    assert verify(exported("5.2"), steps=2, write=False).fp32_top1 is None  # reported for int8/int4 only


def test_the_reference_keeps_rounding_when_moved_and_both_models_hold_one_embedding(make_ckpt):
    """nn.Module.to(device) rebuilds every buffer: the quantized weights must still round their inputs there (the
    torch backend on a GPU), and the float64 model must hold the float16 table the export stores (v7 folds ln0 in
    float32 for it, not in float64)."""
    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.models.model import at_precision

    ckpt = load_checkpoint(make_ckpt("7"))
    ref = at_precision(ckpt, "int8")
    moved = ref.to("meta")  # a device without data: what .to("cuda") does to the buffers, without a GPU
    assert isinstance(moved.blocks[0].att.key.weight, Int8Input) and isinstance(moved.head, Int8Input)
    exact = at_precision(load_checkpoint(make_ckpt("7")), "int8", exact=True)
    assert exact.emb.dtype == torch.float64
    assert torch.equal(exact.emb, at_precision(ckpt, "int8").emb.double())


def test_each_export_is_held_to_its_own_quantization():
    """An int4 export written before the head was kept at int8 has no quantization.head_bits: verify then expects
    an int4 head (its own weights), a current one an int8 head."""
    from rwkv_deploy.models.quant import Quant, manifest_quant

    old = {"precision": "int4", "quantization": {"method": "blockwise symmetric int4", "block_size": 32}}
    new = {"precision": "int4", "quantization": {"method": "m", "block_size": 32, "head_bits": 8}}
    assert manifest_quant(old) == Quant(4, 32, 4) and manifest_quant(old).of("head").bits == 4
    assert manifest_quant(new).of("head").bits == 8 and manifest_quant(new).of("att.key.weight").bits == 4
    assert manifest_quant({"precision": "fp32", "quantization": None}) is None


def test_int4_manifest_records_the_head_bits(exported):
    m = json.loads((exported("7", "int4") / "manifest.json").read_text())
    assert m["quantization"]["head_bits"] == 8


def test_weights_check_knows_a_weight_under_an_earlier_fold_name(make_ckpt, tmp_path):
    """Exports from an earlier release may store a weight under another fold's name (v5's u was [H, N, 1]): the same
    bytes under the same weight's name pass; other bytes under it do not."""
    import shutil

    from rwkv_deploy import export
    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.runtime.manifest import read_manifest
    from rwkv_deploy.validation.compare import check_weights

    out = export(make_ckpt("5.2"), tmp_path / "out")
    ckpt = load_checkpoint(read_manifest(out)["source"]["path"])
    for damage in (False, True):
        folder = tmp_path / f"renamed-{damage}"
        shutil.copytree(out, folder)
        proto = onnx.load(str(folder / "model.onnx"))
        t = next(t for t in proto.graph.initializer if t.name.startswith("model.blocks.0.att.u~"))
        old, t.name = t.name, "model.blocks.0.att.u~000000000000"
        if damage:
            t.raw_data = bytes(len(t.raw_data))
        for n in proto.graph.node:
            n.input[:] = [t.name if x == old else x for x in n.input]
        onnx.save(proto, str(folder / "model.onnx"))
        w = check_weights(read_manifest(folder), ckpt)
        assert bool(w["missing"] or w["unexpected"]) == damage, w


def test_lora_factors_are_int8_and_read_as_they_are(make_ckpt, tmp_path):
    """RWKV-7's LoRA factors are products x @ W with W [in, out]: stored int8 behind DequantizeLinear with blocks
    along `in` (dim 0), and the reference holds exactly those weights and rounds their inputs too."""
    from onnx import numpy_helper

    from rwkv_deploy import export
    from rwkv_deploy.models import load_checkpoint
    from rwkv_deploy.models.model import at_precision

    path = make_ckpt("7")
    out = export(path, tmp_path / "int4", precision="int4")
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    q, s = inits["model.blocks.1.att.w1~q"], inits["model.blocks.1.att.w1~s"]  # [C, D], [C / 32, D]
    w1 = load_checkpoint(path).checked("blocks.1.att.w1").float()  # [C, D]
    assert q.dtype == np.int8 and q.shape == tuple(w1.shape) and s.shape == (w1.shape[0] // 32, w1.shape[1])
    dequant = q.astype(np.float32) * np.repeat(s, 32, axis=0)
    ref = at_precision(load_checkpoint(path), "int4").blocks[1].att.w1
    assert isinstance(ref, Int8Input)
    np.testing.assert_array_equal(dequant, ref.as_subclass(torch.Tensor).numpy())
    assert np.abs(dequant - w1.numpy()).max() <= np.repeat(s, 32, axis=0).max() / 2 + 1e-7  # half a step
    consumers = [n.op_type for n in proto.graph.node if "model.blocks.1.att.w1~q" in n.input]
    assert consumers == ["DequantizeLinear"]


def test_an_export_with_float_lora_factors_still_verifies(make_ckpt, tmp_path, monkeypatch):
    """An int4 export written before the LoRA factors were quantized (no quantization.lora_bits) is held to its
    float32 factors: its weights check passes, and the same folder claiming int8 factors fails it."""
    from rwkv_deploy import export
    from rwkv_deploy.models.quant import PRECISIONS, Quant

    path = make_ckpt("7")
    with monkeypatch.context() as mp:  # the quantization an earlier release wrote
        mp.setitem(PRECISIONS, "int4", (torch.float32, Quant(4, head_bits=8)))
        out = export(path, tmp_path / "before", precision="int4")
    m = json.loads((out / "manifest.json").read_text())
    assert "lora_bits" not in m["quantization"] and not any(_eight_bits(t) and "head" not in t
                                                             for t in m["quantization"]["tensors"])
    report = verify(out, steps=4, write=False)
    assert report and not report.weights["differ"], report.table()
    m["quantization"]["lora_bits"] = 8
    (out / "manifest.json").write_text(json.dumps(m))
    claimed = verify(out, steps=4, write=False)
    assert not claimed, claimed.table()
    claimed = claimed.weights
    assert "model.blocks.1.att.w1~q" in claimed["missing"] and "model.blocks.1.att.w1" in claimed["unexpected"]
