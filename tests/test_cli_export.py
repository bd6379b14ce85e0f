"""export / verify / run / demo through the CLI: results, exit codes and error lines."""
import json
import shutil

import onnx
import pytest
from conftest import one_error_line, run_cli
from onnx import numpy_helper

from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint




@pytest.fixture(scope="module")
def world_ckpt(tmp_path_factory):
    """A tiny model with the World vocabulary size, so export copies the World tokenizer in."""
    path = tmp_path_factory.mktemp("world") / "world7.pth"
    save_checkpoint(make_checkpoint("7", n_layer=2, n_embd=32, head_size=16, vocab_size=65536, seed=3), path)
    return path


@pytest.fixture(scope="module")
def world_export(world_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("wexp") / "out"
    r = run_cli("export", world_ckpt, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "[4/4] exported" in r.stderr  # progress is shown
    return out


def test_export_verify_run(world_export):
    m = json.loads((world_export / "manifest.json").read_text())
    assert m["tokenizer"]["kind"] == "rwkv-world" and m["tokenizer"]["file"] == "rwkv_vocab_v20230424.txt"
    assert m["tokenizer"]["eos_token_id"] == 0
    assert len(m["source"]["sha256"]) == 64
    r = run_cli("verify", world_export, "--steps", "64", "--json", world_export.parent / "v.json")
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and json.loads((world_export.parent / "v.json").read_text())["passed"]
    a = run_cli("run", world_export, "--prompt", "Hello world", "--max-tokens", "12", "--seed", "5")
    b = run_cli("run", world_export, "--prompt", "Hello world", "--max-tokens", "12", "--seed", "5")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("Hello world")
    c = run_cli("run", world_export, "--prompt", "Hello world", "--max-tokens", "12", "--seed", "6")
    assert c.stdout != a.stdout


def test_verify_fails_with_exit_1_on_a_damaged_model(world_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world_export, bad)
    model = onnx.load(str(bad / "model.onnx"))
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    name = next(n for n, a in w.items() if a.ndim == 2 and a.shape == (32, 32))  # a projection matrix
    for init in model.graph.initializer:
        if init.name == name:  # perturb one projection by 1%
            init.CopyFrom(numpy_helper.from_array((w[name] * 1.01).astype(w[name].dtype), name))
    onnx.save(model, str(bad / "model.onnx"))
    r = run_cli("verify", bad, "--steps", "8")
    assert r.returncode == 1 and "FAIL" in r.stdout, (r.stdout, r.stderr)
    assert json.loads((bad / "verify.json").read_text())["passed"] is False


def test_bad_precision(make_ckpt, tmp_path):
    one_error_line(run_cli("export", make_ckpt("4"), "-o", tmp_path / "o", "--precision", "int3"),
                   "invalid choice: 'int3'")
    assert not (tmp_path / "o").exists()


def test_out_is_a_file(make_ckpt, tmp_path):
    (tmp_path / "f").write_text("x")
    one_error_line(run_cli("export", make_ckpt("4"), "-o", tmp_path / "f"), "is a file")


def test_out_not_empty_without_force(make_ckpt, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    one_error_line(run_cli("export", make_ckpt("4"), "-o", tmp_path / "o"), "--force")
    assert (tmp_path / "o" / "x").exists()


def test_unwritable_out(make_ckpt):
    # /proc refuses new folders even to root, where a chmod'ed folder would not
    one_error_line(run_cli("export", make_ckpt("4"), "-o", "/proc/rwkv-deploy-out"), "cannot write to /proc")


def test_missing_parent(make_ckpt, tmp_path):
    one_error_line(run_cli("export", make_ckpt("4"), "-o", tmp_path / "no" / "such" / "dir"), "does not exist")


def test_manifest_and_model_disagree(world_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world_export, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["state"][1]["input"] = "state.0.renamed"
    (bad / "manifest.json").write_text(json.dumps(m))
    one_error_line(run_cli("verify", bad), "does not match manifest.json")
    one_error_line(run_cli("run", bad, "--prompt", "hi"), "does not match manifest.json")


def test_not_an_export_folder(tmp_path):
    one_error_line(run_cli("verify", tmp_path), "no manifest.json")
    one_error_line(run_cli("run", tmp_path / "nope", "--prompt", "x"), "not an export folder")


def test_run_without_tokenizer(make_ckpt, tmp_path):
    out = tmp_path / "o"
    assert run_cli("export", make_ckpt("5.0"), "-o", out).returncode == 0
    one_error_line(run_cli("run", out, "--prompt", "hi"), "has no tokenizer", "--tokenizer")


def test_verify_against_a_different_checkpoint(world_export, make_ckpt):
    one_error_line(run_cli("verify", world_export, "--checkpoint", make_ckpt("7")), "not the checkpoint")


def test_bad_sampling_arguments(world_export):
    one_error_line(run_cli("run", world_export, "--prompt", "x", "--top-p", "0"), "--top-p")


def test_hf_tokenizer_roundtrip(make_ckpt, tmp_path):
    """An HF tokenizers JSON passed with --tokenizer is copied in and used by run."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world the cat sat on the mat"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>", "[UNK]"]))
    tok.save(str(tmp_path / "tok.json"))
    out = tmp_path / "o"
    r = run_cli("export", make_ckpt("6"), "-o", out, "--tokenizer", tmp_path / "tok.json")
    assert r.returncode == 0, r.stderr
    tok_entry = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tok_entry["kind"] == "hf-tokenizers" and tok_entry["file"] == "tokenizer.json"
    r = run_cli("run", out, "--prompt", "the cat", "--max-tokens", "5", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("the cat"), r.stderr


def test_tokenizer_larger_than_vocab(make_ckpt, world_ckpt, tmp_path):
    from rwkv_deploy.runtime.tokenizer import world_vocab_path

    one_error_line(run_cli("export", make_ckpt("4"), "-o", tmp_path / "o", "--tokenizer", world_vocab_path()),
                   "65530 tokens but the model's vocab is 97")


def test_demo(tmp_path):
    r = run_cli("demo", "--dir", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    assert "PASS" in r.stdout and "parity certified" in r.stdout
    assert json.loads((tmp_path / "demo" / "export" / "verify.json").read_text())["passed"]


def test_verify_measures_against_float64(world_export):
    r = run_cli("verify", world_export, "--steps", "16", "--float64")  # --float64 is still accepted: always on now
    assert r.returncode == 0, r.stderr
    s = json.loads((world_export / "verify.json").read_text())["free_running"]["summary"]
    assert 0 < s["reference_worst"] < 1e-4 and 0 < s["export_worst"] < 1e-4


@pytest.mark.parametrize("args", [["export", "x.pth", "-o", "o", "--prefill", "bogus"], ["verify"], ["frobnicate"]])
def test_usage_errors_are_one_error_line(args):
    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
