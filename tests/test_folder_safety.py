"""An export folder is data: it runs no code unless the user says so, names no file outside itself, and a
malformed manifest.json is one `error:` line (exit code 2), never a traceback or a half-printed run."""
import json
import shutil
import subprocess

import jsonschema
import pytest
from conftest import VERSIONS, one_error_line, run_cli

from rwkv_deploy import __version__, open_session
from rwkv_deploy.custom_ops.build import build_library, cache_dir, file_sha256, is_trusted_library
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.runtime.manifest import SCHEMA, read_manifest, resolve_inside

COMMANDS = {"run": ["--prompt", "hi"], "verify": ["--steps", "2"]}




def cli(command, folder, *extra):
    return run_cli(command, folder, *COMMANDS[command], *extra)


def edited(src, dst, edit):
    """A copy of the export folder `src` at `dst` with edit(manifest dict) applied."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


# ---- every path the manifest names stays inside the folder ----------------------------------------------------

# key -> (file the key names in the real export, or a stand-in name; how to set the key in the manifest)
PATH_KEYS = {
    "graphs.step.file": ("model.onnx", lambda m, p: m["graphs"]["step"].update(file=p)),
    "graphs.prefill.file": ("prefill.onnx", lambda m, p: m["graphs"]["prefill"].update(file=p)),
    "graphs.step.external_data": ("weights.onnx.data", lambda m, p: m["graphs"]["step"].update(external_data=p)),
    "tokenizer.file": ("tokenizer.json", lambda m, p: m.update(tokenizer={"kind": "hf-tokenizers", "file": p,
                                                                          "eos_token_id": 0, "stop": {"token_ids": [0]}})),
    "state[0].init_file": ("state0.bin", lambda m, p: m["state"][0].update(init_file=p)),
    "requires.custom_ops.libraries.CPUExecutionProvider.path": ("librwkv_ops.so", lambda m, p: m["requires"].update(
        custom_ops={"domain": "rwkv", "ops": ["WKV7"],
                    "libraries": {"CPUExecutionProvider": {"path": p, "sha256": "0" * 64}}})),
    "golden.logits_file": ("logits.bin", lambda m, p: m["golden"].update(logits_file=p)),
}


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
@pytest.mark.parametrize("key", PATH_KEYS)
def test_manifest_paths_stay_inside_the_folder(exported, tmp_path, key, how):
    src = exported("7")
    name, setter = PATH_KEYS[key]
    outside = tmp_path / "outside" / name
    outside.parent.mkdir()
    # the file outside is a real one where the export has it: only confinement stands between it and the reader
    if (src / name).exists():
        shutil.copyfile(src / name, outside)
    else:
        outside.write_bytes(b"\0" * 256)
    folder = tmp_path / "folder"
    if how == "symlink":
        value = f"link-{name}"
    else:
        value = str(outside) if how == "absolute" else f"../outside/{name}"
    edited(src, folder, lambda m: setter(m, value))
    if how == "symlink":
        (folder / value).symlink_to(outside)
    with pytest.raises(RWKVDeployError, match="absolute path" if how == "absolute" else "leads outside"):
        read_manifest(folder)
    for command in COMMANDS:
        one_error_line(cli(command, folder), f"manifest.json {key}", "absolute" if how == "absolute" else "outside")


def test_paths_inside_the_folder_resolve(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "real.bin").write_bytes(b"x")
    (tmp_path / "sub" / "link.bin").symlink_to(tmp_path / "real.bin")  # a symlink that stays inside is fine
    assert resolve_inside(tmp_path, "sub/../real.bin", "k") == (tmp_path / "real.bin").resolve()
    assert resolve_inside(tmp_path, "sub/link.bin", "k") == (tmp_path / "real.bin").resolve()
    for bad in ["", None, 5]:
        with pytest.raises(RWKVDeployError, match="non-empty relative path"):
            resolve_inside(tmp_path, bad, "k")


# ---- a custom-op library runs only if this installation built it, or the user trusts it -------------------------

HOSTILE = r"""
#include <cstdio>
// the version tag that real rwkv-deploy libraries carry: the version check alone does not stop this file
extern "C" __attribute__((used, visibility("default"))) const char rwkv_tag[] = "rwkv-deploy-ops-version=VERSION;";
__attribute__((constructor)) static void runs_on_load() {
    FILE* f = std::fopen(MARKER, "w");
    if (f) { std::fputs("native code ran\n", f); std::fclose(f); }
}
"""


@pytest.fixture
def hostile_folder(exported, tmp_path):
    """A fused export whose library is replaced by one that writes a marker file when it is loaded."""
    marker = tmp_path / "library-was-loaded"
    src = tmp_path / "hostile.cc"
    src.write_text(HOSTILE.replace("VERSION", __version__))
    lib = tmp_path / "hostile.so"
    subprocess.run(["g++", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(lib)], check=True)
    folder = tmp_path / "fused"
    shutil.copytree(exported("7", wkv="fused"), folder)
    m = json.loads((folder / "manifest.json").read_text())
    entry = m["requires"]["custom_ops"]["libraries"]["CPUExecutionProvider"]
    shutil.copyfile(lib, folder / entry["path"])
    entry["sha256"] = file_sha256(lib)  # whoever swaps the library can edit the manifest too
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder, marker


@pytest.mark.parametrize("command", COMMANDS)
def test_untrusted_library_is_not_loaded(hostile_folder, command):
    folder, marker = hostile_folder
    one_error_line(cli(command, folder), "--trust-custom-ops", "trust_custom_ops=True", "not loaded")
    assert not marker.exists()
    with pytest.raises(RWKVDeployError, match="did not build, so it was not loaded"):
        open_session(folder)
    assert not marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_trusted_library_is_loaded_when_asked(hostile_folder, command):
    folder, marker = hostile_folder
    r = cli(command, folder, "--trust-custom-ops")
    assert marker.exists()  # the user said so: the library was loaded (its constructor ran)
    one_error_line(r, "ONNX Runtime refused")  # it registers no ops: an error line, not a crash


def test_fresh_fused_export_opens_without_the_flag(exported, tmp_path):
    folder = tmp_path / "copy"  # a copy (same bytes, another place) of what this installation built
    shutil.copytree(exported("7", wkv="fused"), folder)
    lib = read_manifest(folder).custom_op_library()["path"]
    assert is_trusted_library(lib)
    sess = open_session(folder)
    logits, _ = sess.step([1], sess.init_state(1))
    assert logits.shape == (1, sess.vocab_size)


def test_built_libraries_are_recorded(tmp_path):
    lib = build_library()  # cached after the fused export: hashed and recorded, not rebuilt
    recorded = json.loads((cache_dir() / "ops" / "trusted.json").read_text())["libraries"]
    assert recorded[file_sha256(lib)] == str(lib)


def test_library_from_another_installation_needs_trust(exported, tmp_path, monkeypatch):
    """The real library, but with an empty build cache: this 'installation' built nothing, so it asks first."""
    folder = exported("7", wkv="fused")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(RWKVDeployError, match="--trust-custom-ops"):
        open_session(folder)
    sess = open_session(folder, trust_custom_ops=True)
    assert sess.step([1], sess.init_state(1))[0].shape == (1, sess.vocab_size)


# ---- manifest.json: JSON Schema and agreement with the graphs -----------------------------------------------------

def _set(path, value):
    """An edit that sets m[path[0]][path[1]]... = value."""
    def edit(m):
        *head, last = path
        for k in head:
            m = m[k]
        m[last] = value
    return edit


WRONG_TYPES = {
    "state is a number": (_set(["state"], 5), "$.state"),
    "vocab_size is a string": (_set(["vocab_size"], "x"), "$.vocab_size"),
    "vocab_size is a boolean": (_set(["vocab_size"], True), "$.vocab_size"),
    "shape entry is a string": (_set(["state", 0, "shape", 1], "64"), "$.state[0].shape[1]"),
    "shape entry is a float": (_set(["state", 0, "shape", 1], 64.0), "$.state[0].shape[1]"),
    "shape does not start with batch": (_set(["state", 0, "shape", 0], 1), "$.state[0].shape[0]"),
    "state dtype unknown": (_set(["state", 1, "dtype"], "int8"), "$.state[1].dtype"),
    "state init is a string": (_set(["state", 0, "init"], "0"), "$.state[0].init"),
    "state entry is a string": (_set(["state", 2], "state.0.S"), "$.state[2]"),
    "state input missing": (lambda m: m["state"][0].pop("input"), "'input' is a required property"),
    "graphs is a list": (_set(["graphs"], []), "$.graphs"),
    "no step graph": (lambda m: m["graphs"].pop("step"), "'step' is a required property"),
    "graph file is a number": (_set(["graphs", "step", "file"], 5), "$.graphs.step.file"),
    "prefill positions unknown": (_set(["graphs", "prefill", "positions"], "first"), "$.graphs.prefill.positions"),
    "tokenizer is a number": (_set(["tokenizer"], 5), "$.tokenizer"),
    "requires.custom_ops is a string": (_set(["requires", "custom_ops"], "lib.so"), "$.requires.custom_ops"),
    "source sha256 is a number": (_set(["source", "sha256"], 5), "$.source.sha256"),
    "unknown tokenizer kind": (_set(["tokenizer"], {"kind": "sentencepiece", "file": "t.model", "eos_token_id": 0,
                                                    "stop": {"token_ids": [0]}}), "$.tokenizer.kind"),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_schema_errors_are_one_line(exported, tmp_path, case):
    edit, where = WRONG_TYPES[case]
    folder = edited(exported("7"), tmp_path / "bad", edit)
    with pytest.raises(RWKVDeployError, match="does not follow the rwkv-deploy/2 schema"):
        read_manifest(folder)
    one_error_line(cli("run", folder), "schema", where)


DEEP = "[" * 10000 + "]" * 10000
NOT_MANIFESTS = {
    "list": ("[]", "JSON array, not an object"),
    "null": ("null", "JSON null, not an object"),
    "string": ('"rwkv"', "JSON string, not an object"),
    "deeply nested": (DEEP, "nested too deeply"),
    "deeply nested value": ('{"format": "rwkv-deploy/1", "state": ' + DEEP + "}", "nested too deeply"),
    "huge integer": ('{"vocab_size": 1' + "0" * 5000 + "}", "not valid JSON"),
}


@pytest.mark.parametrize("case", NOT_MANIFESTS)
def test_manifest_that_is_not_an_object(exported, tmp_path, case):
    text, words = NOT_MANIFESTS[case]
    folder = tmp_path / "bad"
    shutil.copytree(exported("7"), folder)
    (folder / "manifest.json").write_text(text)
    for command in COMMANDS:
        one_error_line(cli(command, folder), words)


@pytest.mark.parametrize("shape", [["batch", 65], ["batch", 64, 1], ["batch", 4, 16, 15]])
def test_edited_state_shape_is_caught_before_anything_runs(exported, tmp_path, shape):
    index = 0 if len(shape) < 4 else 1  # state 0 is [batch, C], state 1 the wkv state [batch, H, N, N] (v7)
    folder = edited(exported("7"), tmp_path / "bad", _set(["state", index, "shape"], shape))
    for command in COMMANDS:
        r = cli(command, folder)
        one_error_line(r, "does not match manifest.json", "state.0.", str(shape[1:])[1:-1])
        assert r.stdout == ""  # nothing was printed before the error


def test_initial_state_file_of_the_wrong_size(exported, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(exported("7"), folder)
    (folder / "s.bin").write_bytes(b"\0" * 12)
    edited_folder = edited(folder, tmp_path / "bad2", _set(["state", 0, "init_file"], "s.bin"))
    with pytest.raises(RWKVDeployError, match="holds 3 float32 values"):
        open_session(edited_folder).init_state(1)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_export_follows_the_schema(exported, version):
    folder = exported(version)
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    # with stock jsonschema (what a client in another language would use) and through read_manifest
    jsonschema.validate(json.loads((folder / "manifest.json").read_text()), schema,
                        cls=jsonschema.Draft202012Validator)
    assert read_manifest(folder)["format"] == "rwkv-deploy/2"
