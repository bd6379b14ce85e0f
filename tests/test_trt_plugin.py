"""The rwkv::WKV* TensorRT plugins (rwkv_deploy/trt/plugin.py): their build-time logic for every operator on CPU
(shapes, dtypes, formats, the launcher's arguments), and the launcher path on a GPU (skipped without one)."""
import pytest
import torch

from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.trt.plugin import OPS, plugin_classes

LEAD = {"WKV4": (2, 3, 32), "WKV5": (2, 3, 2, 16), "WKV7": (2, 3, 2, 16)}  # (B, T, A) / (B, T, H, N)


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install "
                                                      "'rwkv-deploy[trt]'; scripts/test.sh installs it)")


def desc(trt, dtype, fmt=None, dims=()):
    d = trt.DynamicPluginTensorDesc()
    p = trt.PluginTensorDesc()
    p.type, p.format, p.dims = dtype, fmt or trt.TensorFormat.LINEAR, trt.Dims(list(dims))
    d.desc = p
    return d


def test_ops_match_the_onnx_signatures():
    """The plugins' inputs and outputs are the ONNX nodes' (custom_ops/torch_ops.py, what export writes)."""
    from rwkv_deploy.custom_ops.torch_ops import SIGNATURES

    assert {op: (list(s.inputs), list(s.outputs)) for op, s in OPS.items()} == SIGNATURES
    for op, s in OPS.items():
        assert s.name == op and len(s.like) == len(s.outputs)


@pytest.mark.parametrize("op", OPS)
def test_output_shapes_mirror_the_state_and_sequence_inputs(op):
    spec = OPS[op]
    shapes = spec.expected_shapes(LEAD[op])
    assert spec.launch_dims(shapes) == LEAD[op]
    B, T = LEAD[op][:2]
    outs = [shapes[i] for i in spec.like]
    assert outs[0] == (B, T, *LEAD[op][2:])  # y: one row per position
    if op == "WKV4":
        assert outs[1:] == [(B, LEAD[op][2])] * 3  # aa, bb, pp
    else:
        H, N = LEAD[op][2:]
        assert outs[1:] == [(B, H, N, N)]  # S


@pytest.mark.parametrize("op", OPS)
def test_wrong_shapes_are_refused(op):
    spec = OPS[op]
    shapes = spec.expected_shapes(LEAD[op])
    bad = list(shapes)
    i = len(bad) - 1  # the state input
    bad[i] = (*bad[i][:-1], bad[i][-1] + 1)
    with pytest.raises(RWKVDeployError, match=f"rwkv::{op}: input shapes do not fit: {spec.inputs[i]}"):
        spec.launch_dims(bad)
    with pytest.raises(RWKVDeployError, match="must be"):
        spec.launch_dims([s[:-1] if j == spec.dims_from else s for j, s in enumerate(shapes)])
    with pytest.raises(RWKVDeployError, match="inputs, expected"):
        spec.launch_dims(shapes[:-1])


@pytest.mark.parametrize("op", OPS)
def test_plugin_dtypes_and_formats(trt, op):
    """Through the plugin object the creator makes: float32 only, linear only, no workspace, no fields."""
    plugin_cls, creator_cls = plugin_classes(trt)
    creator = creator_cls(op)
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == (op, "rwkv", "1")
    plugin = creator.create_plugin(op, trt.PluginFieldCollection([]), trt.TensorRTPhase.BUILD)
    n_in, n_out = len(OPS[op].inputs), len(OPS[op].outputs)
    assert plugin.num_outputs == n_out and plugin.plugin_name == op
    assert plugin.get_output_data_types([trt.DataType.FLOAT] * n_in) == [trt.DataType.FLOAT] * n_out
    with pytest.raises(RWKVDeployError, match=f"rwkv::{op} takes {n_in} float32 inputs"):
        plugin.get_output_data_types([trt.DataType.HALF] + [trt.DataType.FLOAT] * (n_in - 1))
    io = [desc(trt, trt.DataType.FLOAT) for _ in range(n_in + n_out)]
    assert all(plugin.supports_format_combination(pos, io, n_in) for pos in range(n_in + n_out))
    assert not plugin.supports_format_combination(0, [desc(trt, trt.DataType.HALF)] + io[1:], n_in)
    assert not plugin.supports_format_combination(
        n_in, io[:n_in] + [desc(trt, trt.DataType.FLOAT, trt.TensorFormat.CHW32)] + io[n_in + 1:], n_in)
    assert plugin.get_workspace_size([], []) == 0
    assert len(plugin.get_fields_to_serialize()) == 0
    shapes = OPS[op].expected_shapes(LEAD[op])
    plugin.on_shape_change([desc(trt, trt.DataType.FLOAT, dims=s).desc for s in shapes], [])
    assert plugin.shapes == shapes
    twin = plugin.clone()
    assert type(twin) is plugin_cls and twin.op == op and twin.shapes == shapes
    with pytest.raises(RWKVDeployError, match="do not fit"):
        wrong = shapes[:-1] + [shapes[-1][:-1] + (1,)]  # the state input one size off
        plugin.on_shape_change([desc(trt, trt.DataType.FLOAT, dims=s).desc for s in wrong], [])


def test_untrusted_launcher_library_is_not_loaded(tmp_path):
    from rwkv_deploy.trt.plugin import load_launchers

    lib = tmp_path / "librwkv_cuda.so"
    lib.write_bytes(b"\x7fELF not built here")
    with pytest.raises(RWKVDeployError, match="not a launcher library this installation built"):
        load_launchers(lib)
    with pytest.raises(RWKVDeployError, match="is missing"):
        load_launchers(tmp_path / "absent.so")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the plugin's launcher path "
                                                         "(its enqueue, outside TensorRT) runs only on one")
@pytest.mark.parametrize("op", OPS)
def test_launcher_path_matches_the_reference(op):
    """What enqueue does (plugin.launch: the C launchers with device pointers and a stream), against
    models/wkv.py, on the GPU; TensorRT itself is not involved."""
    from rwkv_deploy.models.wkv import run_wkv4, run_wkv5, run_wkv7
    from rwkv_deploy.trt.plugin import launch

    spec = OPS[op]
    g = torch.Generator().manual_seed(0)
    shapes = spec.expected_shapes(LEAD[op])
    ins = [torch.rand(s, generator=g, dtype=torch.float64) * 2 - 1 for s in shapes]
    if op == "WKV4":
        ins[0] = -torch.exp(ins[0])  # w: negative decay
        ref = run_wkv4(*ins)
        ref = [ref[0], *ref[1]]
    elif op == "WKV5":
        ins[3] = torch.exp(-torch.exp(ins[3]))  # w in (0, 1)
        ref = list(run_wkv5(*ins))
    else:
        ins[1] = torch.exp(-torch.exp(ins[1]))
        ins[4], ins[5] = -ins[4].abs() * 0.1, ins[4].abs() * 0.1  # a, b: a small in-context learning rate
        ref = list(run_wkv7(*ins))
    dev = [t.float().cuda().contiguous() for t in ins]
    outs = [torch.empty(shapes[i], device="cuda") for i in spec.like]
    launch(spec, shapes, [t.data_ptr() for t in dev], [t.data_ptr() for t in outs],
           torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)
