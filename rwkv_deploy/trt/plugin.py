"""TensorRT plugins for the fused operators rwkv::WKV4/5/7: one Python IPluginV3 per operator, created by an
IPluginCreatorV3One registered under namespace "rwkv" (design.md §6: the only plugin route TensorRT-RTX accepts).

Build time (what CI runs, on CPU): output shapes mirror inputs, every tensor is float32 in linear layout, no
workspace. Run time: `enqueue` calls the C launchers of custom_ops/cuda (wkv_launchers.h) on TensorRT's stream,
with TensorRT's device pointers; the launcher library is built by custom_ops/build.py and loaded only if this
installation built it (or the caller trusts it explicitly), as the ONNX Runtime op library is.

An engine holding these layers therefore needs at run time: Python, this module imported and `register_plugins`
called before the engine is deserialised, and the launcher library (librwkv_cuda.so) on a CUDA GPU.
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RWKVDeployError

NAMESPACE, VERSION = "rwkv", "1"
LOADER_LINK = "libtensorrt_rtx.so"  # what TensorRT-RTX's parser dlopens once a network has a plugin layer


@dataclass(frozen=True)
class OpSpec:
    """One fused operator as its ONNX node and C launcher see it (custom_ops/torch_ops.py SIGNATURES, whose
    names a test holds this table to; repeated here because that module imports torch)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    like: tuple[int, ...]  # output i has the shape of input like[i]
    dims_from: int  # the input whose shape gives the launcher's leading int arguments
    launcher: str

    def launch_dims(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The launcher's int arguments from concrete input shapes, which must be what the kernels read:
        WKV4 (B, T, A) from k [B, T, A]; WKV5/7 (B, T, H, N) from r [B, T, H, N]."""
        if len(shapes) != len(self.inputs):
            raise RWKVDeployError(f"{self.launcher}: {len(shapes)} inputs, expected {len(self.inputs)}")
        lead = tuple(int(d) for d in shapes[self.dims_from])
        want = self.expected_shapes(lead)
        bad = [f"{n} {list(s)} (expected {list(w)})" for n, s, w in zip(self.inputs, shapes, want) if tuple(s) != w]
        if bad:
            raise RWKVDeployError(f"rwkv::{self.name}: input shapes do not fit: {', '.join(bad)}")
        return lead

    def expected_shapes(self, lead: tuple[int, ...]) -> list[tuple[int, ...]]:
        if self.name == "WKV4":
            if len(lead) != 3:
                raise RWKVDeployError(f"rwkv::WKV4: k must be [B, T, A], got {list(lead)}")
            B, T, A = lead
            return [(A,), (A,), (B, T, A), (B, T, A), (B, A), (B, A), (B, A)]
        if len(lead) != 4:
            raise RWKVDeployError(f"rwkv::{self.name}: r must be [B, T, H, N], got {list(lead)}")
        B, T, H, N = lead
        seq, S = (B, T, H, N), (B, H, N, N)
        return [seq, seq, seq, seq, (H, N), S] if self.name == "WKV5" else [seq] * 6 + [S]

    @property
    def name(self) -> str:
        return self.launcher.split("_")[1].upper()  # rwkv_wkv5_cuda -> WKV5


OPS = {
    "WKV4": OpSpec(("w", "u", "k", "v", "aa", "bb", "pp"), ("y", "aa_out", "bb_out", "pp_out"), (2, 4, 5, 6), 2,
                   "rwkv_wkv4_cuda"),
    "WKV5": OpSpec(("r", "k", "v", "w", "u", "S"), ("y", "S_out"), (0, 5), 0, "rwkv_wkv5_cuda"),
    "WKV7": OpSpec(("r", "w", "k", "v", "a", "b", "S"), ("y", "S_out"), (0, 6), 0, "rwkv_wkv7_cuda"),
}


def supported(trt, in_out, pos: int) -> bool:
    """supports_format_combination: every input and output float32, linear (the kernels' only layout and type;
    fp16 exports cast to float32 around the node, so the builder never needs another combination)."""
    desc = in_out[pos].desc
    return desc.type == trt.DataType.FLOAT and desc.format == trt.TensorFormat.LINEAR


def output_types(trt, op: str, input_types) -> list:
    """get_output_data_types: float32 outputs, from float32 inputs only (a wrong graph fails the build here,
    with the operator's name, not at run time)."""
    spec = OPS[op]
    if len(input_types) != len(spec.inputs) or any(t != trt.DataType.FLOAT for t in input_types):
        raise RWKVDeployError(f"rwkv::{op} takes {len(spec.inputs)} float32 inputs, got {list(input_types)}")
    return [trt.DataType.FLOAT] * len(spec.outputs)


# ---- the launcher library (loaded at the first enqueue) --------------------------------------------------------

_launchers: ctypes.CDLL | None = None


def load_launchers(path: str | Path | None = None, trust: bool = False) -> ctypes.CDLL:
    """The CUDA launcher library: built (and so trusted) here by default; another file only if this installation
    built one with its sha256, or if `trust` says its origin is known (loading it runs its native code)."""
    global _launchers
    from ..custom_ops.build import build_cuda_library, is_trusted_library

    lib = Path(path) if path else build_cuda_library()
    if not lib.is_file():
        raise RWKVDeployError(f"the WKV launcher library {lib} is missing; build it with nvcc: "
                              "python -c 'from rwkv_deploy.custom_ops.build import build_cuda_library as b; print(b())'")
    if not trust and not is_trusted_library(lib):
        raise RWKVDeployError(f"{lib} is not a launcher library this installation built, so it was not loaded "
                              "(it would run its native code); pass trust=True if you trust it")
    _launchers = ctypes.CDLL(str(lib))
    return _launchers


def launch(spec: OpSpec, shapes: list, inputs: list[int], outputs: list[int], stream: int) -> None:
    """Run one operator's C launcher on device pointers (TensorRT's) and TensorRT's stream."""
    lib = _launchers or load_launchers()
    dims = spec.launch_dims(shapes)
    ptrs = [ctypes.c_void_p(int(p)) for p in (*inputs, *outputs)]
    rc = getattr(lib, spec.launcher)(*(ctypes.c_int(d) for d in dims), *ptrs, ctypes.c_void_p(int(stream)))
    if rc:
        raise RuntimeError(f"{spec.launcher} failed with CUDA error {rc}")


# ---- the TensorRT classes: made per TensorRT module (tensorrt or tensorrt_rtx), since they derive from it ------

@functools.lru_cache(maxsize=None)
def plugin_classes(trt) -> tuple[type, type]:
    """(Plugin, Creator) classes deriving from `trt`'s IPluginV3 interfaces."""

    class WKVPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op: str):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.op, self.spec = op, OPS[op]
            self.plugin_name, self.plugin_namespace, self.plugin_version = op, NAMESPACE, VERSION
            self.num_outputs = len(self.spec.outputs)
            self.timing_cache_id = ""  # one implementation: nothing to time per instance
            self.shapes: list | None = None

        def get_capability_interface(self, type):
            return self

        def clone(self):
            other = WKVPlugin(self.op)
            other.shapes = self.shapes
            return other

        # build
        def get_output_data_types(self, input_types):
            return output_types(trt, self.op, input_types)

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[i]) for i in self.spec.like]

        def supports_format_combination(self, pos, in_out, num_inputs):
            return supported(trt, in_out, pos)

        def configure_plugin(self, inputs, outputs):
            pass  # nothing depends on the profile: shapes are read at each shape change

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        # runtime
        def on_shape_change(self, inputs, outputs):
            # checked here, once per shape, rather than on every enqueue
            self.shapes = [tuple(d.dims) for d in inputs]
            self.spec.launch_dims(self.shapes)

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])  # the op type is the plugin's name; it has no attributes

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            launch(self.spec, [tuple(d.dims) for d in input_desc], list(inputs), list(outputs), stream)

    class WKVCreator(trt.IPluginCreatorV3One):
        def __init__(self, op: str):
            trt.IPluginCreatorV3One.__init__(self)
            self.op = op
            self.name, self.plugin_namespace, self.plugin_version = op, NAMESPACE, VERSION
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, name, fc, phase):
            return WKVPlugin(self.op)

    return WKVPlugin, WKVCreator


_registered: dict = {}  # trt module -> its creators (kept alive: the registry holds only a reference)


def register_plugins(trt, flavour: str | None = None) -> list[str]:
    """Register the rwkv::WKV* creators with `trt`'s plugin registry (once per process); returns their names."""
    if flavour == "tensorrt_rtx":
        check_loader_link(trt)
    if trt not in _registered:
        _, creator = plugin_classes(trt)
        creators = [creator(op) for op in OPS]
        registry = trt.get_plugin_registry()
        for c in creators:
            if not registry.register_creator(c, NAMESPACE):
                raise RWKVDeployError(f"TensorRT refused the plugin creator {NAMESPACE}::{c.name}")
        _registered[trt] = creators
    return [f"{NAMESPACE}::{op}" for op in OPS]


def loader_dirs(trt) -> list[Path]:
    """Where the dlopen of LOADER_LINK looks, in the loader's order: the RPATH ($ORIGIN) of TensorRT-RTX's own
    libraries, then LD_LIBRARY_PATH as the process started with it, then the system's folders."""
    import tensorrt_rtx_libs  # the wheel's library folder

    dirs = [Path(tensorrt_rtx_libs.__file__).parent]
    dirs += [Path(p) for p in _startup_env("LD_LIBRARY_PATH").split(":") if p]
    return dirs + [Path(p) for p in ("/lib", "/usr/lib", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")]


def _startup_env(name: str) -> str:
    """An environment variable as the process started with it: the loader read it then, later changes are lost."""
    try:
        env = dict(e.split(b"=", 1) for e in Path("/proc/self/environ").read_bytes().split(b"\0") if b"=" in e)
        return env.get(name.encode(), b"").decode(errors="replace")
    except OSError:
        return os.environ.get(name, "")


def check_loader_link(trt) -> None:
    """A plugin layer makes TensorRT-RTX's parser dlopen("libtensorrt_rtx.so"); the wheel ships only
    libtensorrt_rtx.so.1, and a failed dlopen there aborts the whole process (design.md §6). Refuse first, with
    the fix, instead of dying without a message."""
    found = [d for d in loader_dirs(trt) if (d / LOADER_LINK).exists()]
    if found:
        return
    libs = loader_dirs(trt)[0]
    raise RWKVDeployError(
        f"TensorRT-RTX needs a {LOADER_LINK} on the loader path to use plugins (fused exports), and there is none "
        f"(its wheel ships {LOADER_LINK}.1 only; without the link the process would abort): run "
        f"`ln -s {LOADER_LINK}.1 {libs / LOADER_LINK}`, or put such a link in a folder on LD_LIBRARY_PATH "
        "before starting Python; or export with --wkv portable")
