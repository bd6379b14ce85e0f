"""Manifest format 2 (design.md §2): the schema, golden logits and `check`, requires.custom_ops, format-1 folders,
and the `tokenizer` command."""
import json
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import onnx
import pytest
from conftest import VERSIONS, one_error_line, run_cli
from onnx import numpy_helper

from rwkv_deploy import __version__, open_session
from rwkv_deploy.custom_ops.build import file_sha256
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.runtime.check import check
from rwkv_deploy.runtime.manifest import SCHEMAS, read_manifest
from rwkv_deploy.runtime.tokenizer import world_vocab_path

FORMAT2 = json.loads(SCHEMAS["rwkv-deploy/2"].read_text())
# every folder kind: all versions at both precisions (portable), and one fused export
FOLDERS = [(v, p, "portable") for v in VERSIONS for p in ("fp32", "fp16")] + [("7", "fp32", "fused")]


def manifest_of(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def copy(src, dst, edit=None):
    """A copy of the export folder `src` at `dst`, with edit(manifest dict) applied."""
    shutil.copytree(src, dst)
    if edit:
        m = manifest_of(dst)
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def to_format1(m: dict) -> None:
    """Rewrite a format-2 manifest as the format-1 exporter wrote it."""
    for key in ("weights_dtype", "compute_dtype", "quantization", "golden", "engines"):
        del m[key]
    custom = m.pop("requires")["custom_ops"]
    m["custom_op_library"] = custom and {"path": custom["libraries"]["CPUExecutionProvider"]["path"],
                                         "rwkv_deploy_version": __version__, "domain": "rwkv",
                                         "execution_provider": "CPUExecutionProvider"}
    if m["tokenizer"]:
        m["tokenizer"] = {k: m["tokenizer"][k] for k in ("kind", "file")}
    m["format"] = "rwkv-deploy/1"


@pytest.fixture
def world_export(world_model):
    return world_model[1]


# ---- the manifest -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version,precision,wkv", FOLDERS)
def test_every_export_follows_the_format2_schema(exported, version, precision, wkv):
    folder = exported(version, precision, wkv)
    m = manifest_of(folder)
    jsonschema.Draft202012Validator.check_schema(FORMAT2)
    jsonschema.validate(m, FORMAT2, cls=jsonschema.Draft202012Validator)  # stock jsonschema, as other clients
    assert read_manifest(folder)["format"] == "rwkv-deploy/2" and "custom_op_library" not in m
    dtype = {"fp32": "float32", "fp16": "float16"}[precision]
    assert (m["weights_dtype"], m["compute_dtype"], m["quantization"], m["engines"]) == (dtype, dtype, None, [])
    g = m["golden"]
    assert g["shape"] == [len(g["tokens"]), m["vocab_size"]] and g["dtype"] == "float32"
    assert (folder / g["logits_file"]).stat().st_size == 4 * g["shape"][0] * g["shape"][1]
    if wkv == "portable":
        assert m["requires"] == {"custom_ops": None}
    else:
        assert m["requires"]["custom_ops"] == {
            "domain": "rwkv", "ops": ["WKV7"],
            "libraries": {"CPUExecutionProvider": {"path": "librwkv_ops.so",
                                                   "sha256": file_sha256(folder / "librwkv_ops.so")}}}


def test_golden_tokens_are_fixed_and_tolerance_follows_precision(exported):
    a, b = manifest_of(exported("4"))["golden"], manifest_of(exported("7", "fp16"))["golden"]
    assert a["tokens"] == b["tokens"]  # one fixed draw, whatever the model (same vocabulary size)
    assert a["tolerance"]["normalised"] < b["tolerance"]["normalised"]


def test_custom_op_library_accessor_reads_both_formats(exported, tmp_path):
    folder = exported("7", wkv="fused")
    lib = read_manifest(folder).custom_op_library()
    assert lib == {"path": (folder / "librwkv_ops.so").resolve(), "sha256": file_sha256(folder / "librwkv_ops.so"),
                   "rwkv_deploy_version": None}
    assert read_manifest(folder).custom_op_library("CUDAExecutionProvider") is None
    assert read_manifest(exported("7")).custom_op_library() is None
    old = copy(folder, tmp_path / "v1", to_format1)
    assert read_manifest(old).custom_op_library() == {"path": (old / "librwkv_ops.so").resolve(), "sha256": None,
                                                      "rwkv_deploy_version": __version__}


def test_library_that_differs_from_requires_is_refused(exported, tmp_path):
    folder = copy(exported("7", wkv="fused"), tmp_path / "f", lambda m: m["requires"]["custom_ops"]["libraries"]
                  ["CPUExecutionProvider"].update(sha256="0" * 64))
    for trust in (False, True):  # the manifest pins the file: trusting the folder does not change which file
        with pytest.raises(RWKVDeployError, match="requires 0000000000000000…: it is not the library this folder"):
            open_session(folder, trust_custom_ops=trust)
    one_error_line(run_cli("check", folder, "--trust-custom-ops"), "sha256", "not the library")


# ---- check ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version,precision,wkv", FOLDERS)
def test_check_passes(exported, version, precision, wkv):
    result = check(exported(version, precision, wkv))
    assert result, result.table()
    assert len(result.distance) == 8 and result.top1.all()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_check_passes_on_a_state_tuned_export(exported, precision):
    folder = exported("6", precision, time_state=True)  # golden starts from the tuned state, as clients do
    assert any(s["init_file"] for s in manifest_of(folder)["state"])
    assert check(folder)


def test_check_command(exported):
    r = run_cli("check", exported("5.2", "fp16"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    tolerance = manifest_of(exported("5.2", "fp16"))["golden"]["tolerance"]["normalised"]
    assert lines[-1] == "PASS" and f"tolerance: max|Δ|/std <= {tolerance:g}" in lines[-2] and len(lines) == 8 + 3


def test_check_fails_on_altered_weights(exported, tmp_path):
    folder = copy(exported("7"), tmp_path / "bad")
    model = onnx.load(str(folder / "model.onnx"))
    # a [C, C] projection (every token goes through it): 1% of its values 10% larger
    init = next(i for i in model.graph.initializer if list(i.dims) == [64, 64])
    w = numpy_helper.to_array(init).copy()
    w.flat[::100] *= 1.1
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(folder / "model.onnx"))
    assert not check(folder)
    r = run_cli("check", folder)
    assert r.returncode == 1 and r.stdout.splitlines()[-1].startswith("FAIL: logits of row"), (r.stdout, r.stderr)
    assert r.stderr.startswith("verification failed: logits of row") and r.stderr.count("\n") == 1


def test_check_fails_on_altered_golden_logits(exported, tmp_path):
    folder = copy(exported("6"), tmp_path / "bad")
    path = folder / "golden" / "logits.bin"
    logits = np.fromfile(path, "<f4").reshape(8, -1)
    tolerance = manifest_of(folder)["golden"]["tolerance"]["normalised"]
    logits[3, 5] += 3 * tolerance * logits[3].std()  # 3x the tolerance, in one value
    logits.tofile(path)
    result = check(folder)
    assert not result and int(result.distance.argmax()) == 3
    r = run_cli("check", folder)
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_check_refuses_a_truncated_golden_file(exported, tmp_path):
    folder = copy(exported("4"), tmp_path / "bad")
    path = folder / "golden" / "logits.bin"
    path.write_bytes(path.read_bytes()[:-4])
    one_error_line(run_cli("check", folder), "golden.shape", "re-export")


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from rwkv_deploy.cli import main
sys.exit(main(["check", sys.argv[1]]))
"""


@pytest.mark.parametrize("wkv", ["portable", "fused"])
def test_check_runs_without_torch(exported, wkv):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(exported("7", wkv=wkv))], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "PASS", r.stderr


# ---- format 1 is still read -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("wkv", ["portable", "fused"])
def test_format1_folder_opens_and_runs(exported, tmp_path, wkv):
    folder = copy(exported("7", wkv=wkv), tmp_path / "v1", to_format1)
    shutil.rmtree(folder / "golden")
    m = read_manifest(folder)
    assert m["format"] == "rwkv-deploy/1"
    sess = open_session(folder)
    logits, state = sess.forward(np.array([[1, 2, 3]]), sess.init_state(1))
    assert logits.shape == (1, 97) and np.isfinite(logits).all()
    one_error_line(run_cli("check", folder), "no golden logits", "rwkv-deploy/1", "re-export")


def test_format1_schema_still_applies_to_format1_folders(exported, tmp_path):
    folder = copy(exported("7"), tmp_path / "v1", lambda m: (to_format1(m), m.update(vocab_size="97")))
    with pytest.raises(RWKVDeployError, match="does not follow the rwkv-deploy/1 schema: at \\$.vocab_size"):
        read_manifest(folder)


def test_unknown_format_is_one_line(exported, tmp_path):
    folder = copy(exported("7"), tmp_path / "v3", lambda m: m.update(format="rwkv-deploy/3"))
    one_error_line(run_cli("check", folder), "rwkv-deploy/3", "newer rwkv-deploy")


# ---- the tokenizer command ----------------------------------------------------------------------------------------

def test_export_names_the_end_of_text_token(world_export):
    assert manifest_of(world_export)["tokenizer"] == {"kind": "rwkv-world", "file": "rwkv_vocab_v20230424.txt",
                                                      "eos_token_id": 0, "stop": {"token_ids": [0]}}


def test_tokenizer_command_attaches_and_replaces(world_export, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def without_tokenizer(m):
        m["tokenizer"] = None

    folder = copy(world_export, tmp_path / "o", without_tokenizer)
    (folder / "rwkv_vocab_v20230424.txt").unlink()
    r = run_cli("tokenizer", folder, world_vocab_path())
    assert r.returncode == 0, r.stderr
    assert read_manifest(folder)["tokenizer"] == manifest_of(world_export)["tokenizer"]
    assert (folder / "rwkv_vocab_v20230424.txt").read_bytes() == world_vocab_path().read_bytes()
    r = run_cli("run", folder, "--prompt", "Hello", "--max-tokens", "3", "--seed", "0")
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stderr

    # replaced by a tokenizers file whose end-of-text token is not id 0: the World file goes
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(tmp_path / "tok.json"))
    assert run_cli("tokenizer", folder, tmp_path / "tok.json").returncode == 0
    assert read_manifest(folder)["tokenizer"] == {"kind": "hf-tokenizers", "file": "tokenizer.json",
                                                  "eos_token_id": 1, "stop": {"token_ids": [1]}}
    assert not (folder / "rwkv_vocab_v20230424.txt").exists()
    assert check(folder)  # the golden logits do not depend on the tokenizer


def test_tokenizer_command_refuses_a_larger_vocabulary(exported, tmp_path):
    if world_vocab_path() is None:
        pytest.skip("the rwkv package (which ships the World vocabulary) is not installed")
    folder = copy(exported("7"), tmp_path / "o")
    before = (folder / "manifest.json").read_bytes()
    one_error_line(run_cli("tokenizer", folder, world_vocab_path()), "65530 tokens but the model's vocab is 97")
    assert (folder / "manifest.json").read_bytes() == before and not (folder / "rwkv_vocab_v20230424.txt").exists()


def test_tokenizer_command_on_a_format1_folder_keeps_format1(world_export, tmp_path):
    folder = copy(world_export, tmp_path / "v1", to_format1)
    shutil.rmtree(folder / "golden")
    assert run_cli("tokenizer", folder, world_vocab_path()).returncode == 0
    m = read_manifest(folder)
    assert m["format"] == "rwkv-deploy/1" and m["tokenizer"] == {"kind": "rwkv-world", "file": "rwkv_vocab_v20230424.txt"}
