"""`rwkv-deploy engine` (rwkv_deploy/trt/engine.py): engines built on CPU with TensorRT-RTX for every version and
precision, both graphs; their records against the manifest; profiles, targets, precision rules, atomic writes and
the error paths. Building needs no GPU; running an engine does, and no machine here has one (test_trt_session.py).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VERSIONS, one_error_line, run_cli

from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.runtime.manifest import read_manifest
from rwkv_deploy.trt import engine as E

MAX_BATCH, MAX_SEQ, TARGET = 4, 16, "SM89"


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install "
                                                      "'rwkv-deploy[trt]'; scripts/test.sh installs it)")


@pytest.fixture(scope="module")
def built(trt, exported, tmp_path_factory):
    """built(version, precision) -> a copy of the export with engines for both graphs (made once per module)."""
    root, cache = tmp_path_factory.mktemp("engines"), {}

    def get(version, precision="fp32"):
        if (version, precision) not in cache:
            folder = root / f"{version}-{precision}"
            shutil.copytree(exported(version, precision), folder)
            E.build_engines(folder, max_batch=MAX_BATCH, max_seq=MAX_SEQ, targets=[TARGET])
            cache[version, precision] = folder
        return cache[version, precision]

    return get


@pytest.fixture(scope="module")
def loader_link(trt, tmp_path_factory):
    """A folder holding the libtensorrt_rtx.so link that plugin layers need (design.md §6): put on
    LD_LIBRARY_PATH of a child process, since the loader reads that variable only when a process starts."""
    import tensorrt_rtx_libs

    folder = tmp_path_factory.mktemp("loader")
    (folder / "libtensorrt_rtx.so").symlink_to(Path(tensorrt_rtx_libs.__file__).parent / "libtensorrt_rtx.so.1")
    return folder


def cli_with_link(link, *args):
    env = {**os.environ, "LD_LIBRARY_PATH": f"{link}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "rwkv_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, env=env)


def snapshot(folder) -> dict:
    """Every file under the folder (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def set_entry(folder, i=0, **keys):
    """Change manifest.json engines[i] (0: the step engine) in place; keys given as None are dropped."""
    m = json.loads((folder / "manifest.json").read_text())
    for k, v in keys.items():
        m["engines"][i].pop(k) if v is None else m["engines"][i].update({k: v})
    (folder / "manifest.json").write_text(json.dumps(m))


def check_records(folder, plugins=()):
    """Every graph has an engine whose record and manifest entry agree with the manifest's graphs and state table."""
    m = read_manifest(folder)  # schema and path confinement, engines included
    assert sorted(e["graph"] for e in m["engines"]) == sorted(m["graphs"])
    records = {r["graph"]: r for r in E.engine_records(folder)}  # sha256 of every engine checked there
    for entry in m["engines"]:
        g, r = m.graph(entry["graph"]), records[entry["graph"]]
        assert {k: r[k] for k in entry} == entry  # the record holds the manifest entry
        assert entry["flavour"] == "tensorrt_rtx" and entry["targets"] == [TARGET]
        assert entry["compute_dtype"] == m["compute_dtype"]
        assert [p["name"] for p in entry["plugins"]] == [f"rwkv::{op}" for op in plugins]
        assert [(i["name"], i["dtype"]) for i in r["inputs"]] == \
            [(g["tokens"], "int64")] + [(s.input, s.dtype) for s in m.state]
        assert [(o["name"], o["dtype"]) for o in r["outputs"]] == \
            [(g["logits"], "float32")] + [(s.output, s.dtype) for s in m.state]
        (profile,) = entry["profiles"]
        seq = [MAX_SEQ] if entry["graph"] == "prefill" else []
        assert profile[g["tokens"]] == {"min": [1] + [1] * len(seq), "opt": [1] + [1] * len(seq),
                                        "max": [MAX_BATCH] + seq}
        for s in m.state:
            assert profile[s.input]["max"] == [MAX_BATCH, *s.shape[1:]] and profile[s.input]["min"][0] == 1
    assert (Path(folder) / E.DATA_LOADER).is_file()
    assert not [p.name for p in Path(folder).rglob(".*")]  # no temporary file left by the build


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("version", VERSIONS)
def test_portable_engines_build_on_cpu(built, version, precision):
    folder = built(version, precision)
    check_records(folder)
    m = read_manifest(folder)
    if precision == "fp16":  # strongly typed: fp16 activations, the fp32 islands (WKV state) stay fp32
        assert {i["dtype"] for r in E.engine_records(folder) for i in r["inputs"][1:]} == \
            {s.dtype for s in m.state} and "float16" in {s.dtype for s in m.state}


@pytest.mark.parametrize("version, precision", [("4", "int8"), ("7", "int4")])
def test_quantized_engines_build_on_cpu(built, version, precision):
    """Blocked DequantizeLinear (opset 21) of int8 and int4 weights parses and builds; what TensorRT-RTX keeps
    quantized inside the engine is its choice and is not checked here (no engine runs in this workplace)."""
    folder = built(version, precision)
    check_records(folder)
    assert read_manifest(folder)["weights_dtype"] == precision


@pytest.mark.parametrize("version, precision, op", [("4", "fp32", "WKV4"), ("5.2", "fp16", "WKV5"),
                                                    ("7", "fp16", "WKV7")])
def test_fused_engines_build_with_the_plugin(exported, loader_link, tmp_path, version, precision, op):
    """rwkv::WKV* nodes become plugin layers: the builder calls the Python plugin's shape, dtype and format
    methods (never enqueue). Through the CLI, in a child that has the loader link."""
    folder = tmp_path / "out"
    shutil.copytree(exported(version, precision, "fused"), folder)
    r = cli_with_link(loader_link, "engine", folder, "--max-batch", MAX_BATCH, "--max-seq", MAX_SEQ,
                      "--target", TARGET)
    assert r.returncode == 0, r.stderr
    assert f"plugins rwkv::{op}" in r.stdout
    check_records(folder, plugins=[op])


def test_missing_plugin_is_an_error_not_an_abort(exported, loader_link, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(exported("7", "fp32", "fused"), folder)
    code = ("import rwkv_deploy.trt.engine as E, sys\n"
            "E.register_plugins = lambda trt, flavour=None: []  # as if the plugin module were absent\n"
            "from rwkv_deploy.cli import main\n"
            f"sys.exit(main(['engine', {str(folder)!r}, '--target', 'SM89']))\n")
    env = {**os.environ, "LD_LIBRARY_PATH": str(loader_link)}
    before = snapshot(folder)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    one_error_line(r, "cannot parse model.onnx", "WKV7", "plugins were not registered")
    assert snapshot(folder) == before  # no engine, record, data loader or temporary file left behind


def test_an_operator_without_a_plugin_is_refused(exported, tmp_path):
    m = read_manifest(exported("7", "fp32", "fused"))
    assert E.required_plugins(m) == ["WKV7"]
    m["requires"] = {"custom_ops": {"domain": "rwkv", "ops": ["WKV9"], "libraries": {}}}
    with pytest.raises(RWKVDeployError, match=r"no TensorRT plugin for rwkv::WKV9.*--wkv portable"):
        E.required_plugins(m)
    m["requires"]["custom_ops"]["ops"] = ["MatMulQ4", "MatMulQ8", "WKV7"]  # a fused int4 export
    with pytest.raises(RWKVDeployError, match=r"CPU kernels that have no TensorRT plugin; export with --matmul portable"):
        E.required_plugins(m)
    m["requires"]["custom_ops"]["ops"] = ["MatMulF16", "WKV7"]  # a fused fp16 export with --matmul cpu
    with pytest.raises(RWKVDeployError, match=r"MatMulF16 export multiplies its weights with CPU kernels"):
        E.required_plugins(m)


def test_without_the_loader_link_plugins_are_refused_before_the_abort(trt, monkeypatch, tmp_path, loader_link):
    from rwkv_deploy.trt import plugin

    monkeypatch.setattr(plugin, "loader_dirs", lambda trt: [tmp_path])
    with pytest.raises(RWKVDeployError, match=r"needs a libtensorrt_rtx.so on the loader path.*ln -s"):
        plugin.check_loader_link(trt)
    monkeypatch.setattr(plugin, "loader_dirs", lambda trt: [tmp_path, loader_link])
    plugin.check_loader_link(trt)  # found: no error


def test_profiles_come_from_the_state_table(exported):
    m = read_manifest(exported("6"))
    step = E.profile_shapes(m, "step", 3, 10)
    prefill = E.profile_shapes(m, "prefill", 3, 10)
    assert step["tokens"] == {"min": [1], "opt": [1], "max": [3]}
    assert prefill["tokens"] == {"min": [1, 1], "opt": [1, 1], "max": [3, 10]}
    assert list(step) == ["tokens", *(s.input for s in m.state)]
    for s in m.state:
        assert step[s.input] == prefill[s.input] == {"min": [1, *s.shape[1:]], "opt": [1, *s.shape[1:]],
                                                       "max": [3, *s.shape[1:]]}
    with pytest.raises(RWKVDeployError, match="batch size must be an integer >= 1"):
        E.profile_shapes(m, "step", 0, 10)
    m["state"][0] = {**m["state"][0], "shape": ["batch", "heads"]}
    with pytest.raises(RWKVDeployError, match=r"dynamic dims \['heads'\]"):
        E.profile_shapes(m, "step", 2, 2)


def test_targets(trt, monkeypatch):
    assert E.parse_targets(trt, "tensorrt_rtx", ["SM89", "89", "sm_120", "8.9", "sm86"]) == ["SM89", "SM120", "SM86"]
    for bad in ("90", "SM90", "hopper", ""):  # Hopper: not a TensorRT-RTX target
        with pytest.raises(RWKVDeployError, match=f"unknown --target '{bad}'.*SM89"):
            E.parse_targets(trt, "tensorrt_rtx", [bad])
    from rwkv_deploy.trt import cuda

    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: "no CUDA GPU on this machine")
    with pytest.raises(RWKVDeployError, match="cannot build for this machine's GPU.*--target"):
        E.parse_targets(trt, "tensorrt_rtx", None)
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: None)
    assert E.parse_targets(trt, "tensorrt_rtx", None) == ["CURRENT"]
    with pytest.raises(RWKVDeployError, match="--target is for TensorRT-RTX"):
        E.parse_targets(trt, "tensorrt", ["SM89"])
    assert E.parse_targets(trt, "tensorrt", None) == ["CURRENT"]


def test_precision_rules(trt, exported):
    assert E.network_flags(trt, "tensorrt_rtx") == 0  # always strongly typed, no flag to ask for it

    class FullTensorRT:  # full TensorRT's enum, for the flag it must be given
        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 1
    assert E.network_flags(FullTensorRT, "tensorrt") == 2
    assert E.compute_dtype(read_manifest(exported("7", "fp16"))) == "float16"
    m = read_manifest(exported("7"))
    assert E.compute_dtype(m) == "float32"
    m["compute_dtype"], m["precision"] = "int8", "int8"
    with pytest.raises(RWKVDeployError, match="float32 or float16 exports; this one computes in int8"):
        E.compute_dtype(m)


def test_bad_target_and_missing_graph_leave_the_folder_alone(trt, exported, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(exported("5.1"), folder)
    before = snapshot(folder)
    one_error_line(run_cli("engine", folder, "--target", "SM90"), "unknown --target 'SM90'", "SM89")
    with pytest.raises(RWKVDeployError, match="has no decode graph"):
        E.build_engines(folder, targets=["SM89"], graphs=["decode"])
    assert snapshot(folder) == before


def test_profile_limits(exported, tmp_path):
    """--max-batch and --max-seq are capped (the CLI takes any positive integer): refused before anything is
    built or written, with the limit."""
    folder = tmp_path / "out"
    shutil.copytree(exported("6"), folder)
    before = snapshot(folder)
    one_error_line(run_cli("engine", folder, "--max-seq", 1 << 40, "--target", "SM89"),
                   f"--max-seq {1 << 40} is more than", f"at most {E.SEQ_LIMIT}")
    one_error_line(run_cli("engine", folder, "--max-batch", E.BATCH_LIMIT + 1, "--target", "SM89"),
                   f"--max-batch {E.BATCH_LIMIT + 1}", f"at most {E.BATCH_LIMIT}")
    assert snapshot(folder) == before
    m = read_manifest(folder)
    assert E.profile_shapes(m, "prefill", E.BATCH_LIMIT, E.SEQ_LIMIT)["tokens"]["max"] == [E.BATCH_LIMIT,
                                                                                          E.SEQ_LIMIT]
    with pytest.raises(RWKVDeployError, match="--max-seq"):
        E.profile_shapes(m, "prefill", 1, E.SEQ_LIMIT + 1)


def test_no_tensorrt_names_the_extra(tmp_path, exported, monkeypatch):
    import importlib

    from rwkv_deploy import trt as T

    def no_trt(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", no_trt)
    with pytest.raises(RWKVDeployError, match=r"TensorRT is not installed.*pip install 'rwkv-deploy\[trt\]'"):
        T.import_tensorrt()
    code = ("import sys; sys.modules['tensorrt'] = sys.modules['tensorrt_rtx'] = None\n"
            f"from rwkv_deploy.cli import main; sys.exit(main(['engine', {str(exported('7'))!r}, '--target', 'SM89']))")
    one_error_line(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True), "rwkv-deploy[trt]")


def test_a_failed_build_changes_nothing(built, tmp_path):
    """All or nothing: the step engine builds, the prefill graph then fails (its logits dtype is not the
    manifest's); every file of the folder is byte-identical afterwards, with no temporary left, and the engines
    still match the manifest."""
    folder = tmp_path / "out"
    shutil.copytree(built("7"), folder)
    m = json.loads((folder / "manifest.json").read_text())
    assert list(m["graphs"]) == ["step", "prefill"]  # so the failure comes after a graph has built
    m["graphs"]["prefill"]["logits_dtype"] = "float16"
    (folder / "manifest.json").write_text(json.dumps(m))
    before = snapshot(folder)
    one_error_line(run_cli("engine", folder, "--target", TARGET, "--max-batch", 3),
                   "prefill.onnx does not match manifest.json: outputs differ")
    assert snapshot(folder) == before
    assert len(E.engine_records(folder)) == 2


def test_rebuild_replaces_entries(trt, exported, tmp_path):
    """A second build replaces the entries of the graphs it builds; TensorRT-RTX has no timing cache (its calls
    are no-ops), so --timing-cache says so and writes no file."""
    folder, cache = tmp_path / "out", tmp_path / "timing.cache"
    shutil.copytree(exported("5.0"), folder)
    E.build_engines(folder, max_batch=2, max_seq=4, targets=["SM86"], graphs=["step"])
    r = run_cli("engine", folder, "--max-batch", 2, "--max-seq", 4, "--target", "SM86", "SM120",
                "--timing-cache", cache)
    assert r.returncode == 0, r.stderr
    assert "TensorRT-RTX has no timing cache" in r.stderr and not cache.exists()
    m = read_manifest(folder)
    assert [(e["graph"], e["targets"]) for e in m["engines"]] == [("step", ["SM86", "SM120"]),
                                                                 ("prefill", ["SM86", "SM120"])]
    assert json.loads((folder / "step.engine.json").read_text())["timing_cache"] is None


def test_engine_paths_stay_inside_the_folder(built, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(built("7"), folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["engines"][0]["file"] = "../elsewhere.engine"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RWKVDeployError, match=r"engines\[0\]\.file.*leads outside the export folder"):
        read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({**m, "engines": json.loads(
        (built("7") / "manifest.json").read_text())["engines"]}))
    (folder / "step.engine").write_bytes(b"not the engine")
    with pytest.raises(RWKVDeployError, match="sha256 differs"):
        E.engine_records(folder)


@pytest.mark.parametrize("record, words", [
    ("{not json", ["step.engine.json is not an engine record", "rebuild"]),
    ("{}", ["step.engine.json does not match its entry in manifest.json", "graph", "sha256"]),
    ('["step"]', ["does not match its entry"]),
    (None, ["engines[0] lacks sha256"]),  # the manifest entry without its sha256
    ("targets", ["does not match its entry", "(targets differ)"]),  # a record that disagrees with the entry
])
def test_bad_engine_records_are_one_error_line(built, tmp_path, record, words):
    """Through `run --backend trt`: the records and entries are checked before the session needs a GPU."""
    folder = tmp_path / "out"
    shutil.copytree(built("7"), folder)
    rec = folder / "step.engine.json"
    if record is None:
        set_entry(folder, sha256=None)
    elif record == "targets":
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "targets": ["SM120"]}))
    else:
        rec.write_text(record)
    one_error_line(run_cli("run", folder, "--backend", "trt", "--prompt", "hi"), *words)


def test_bad_engine_entries(built, tmp_path):
    """What the session takes from a manifest entry is checked: keys present, a graph of the export listed once,
    one profile covering that graph's inputs."""
    folder = tmp_path / "out"
    shutil.copytree(built("7"), folder)
    original = (folder / "manifest.json").read_text()
    profile = json.loads(original)["engines"][0]["profiles"][0]
    for i, change, message in [
            (0, {"plugins": None}, r"engines\[0\] lacks plugins"),
            (0, {"graph": "decode"}, "graph 'decode', which the export does not have"),
            (1, {"graph": "step"}, "graph 'step', which the export lists twice"),
            (0, {"profiles": []}, r"engines\[0\]\.profiles is not one profile"),
            (0, {"profiles": [{"tokens": profile["tokens"]}]}, "is not one profile"),
            (0, {"profiles": [{**profile, "tokens": {"min": [1], "opt": [1], "max": ["4"]}}]}, "is not one profile")]:
        (folder / "manifest.json").write_text(original)
        set_entry(folder, i, **change)
        with pytest.raises(RWKVDeployError, match=message):
            E.engine_records(folder)
