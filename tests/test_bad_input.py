"""Every kind of bad checkpoint gets one `error:` line, exit code 2, and no traceback (CLI and API)."""
import json
import pickle

import pytest
import torch
from conftest import one_error_line, run_cli

from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.models import load_checkpoint
from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint


class RunsCode:
    """Unpickling this would create a file; weights_only loading must refuse before that happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sd(**kw):
    return make_checkpoint("5.2", **kw)


def bad_inputs(tmp):
    """name -> (path, words the message must contain)."""
    cases = {}

    def case(name, words, write):
        p = tmp / name
        write(p)
        cases[name] = (p, words)

    case("empty.pth", ["empty"], lambda p: p.write_bytes(b""))
    case("text.pth", ["not a PyTorch"], lambda p: p.write_text("hello, this is not a model\n"))

    def truncated(p):
        torch.save(_sd(), p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    case("truncated.pth", ["truncated or corrupt"], truncated)
    case("list.pth", ["not a state dict"], lambda p: torch.save([torch.zeros(2)], p))
    case("mixed.pth", ["not a state dict of tensors", "'lr'"], lambda p: torch.save({"lr": 0.1, "w": torch.zeros(1)}, p))
    case("notrwkv.pth", ["not an RWKV checkpoint"], lambda p: torch.save({"fc.weight": torch.zeros(3, 3)}, p))

    def missing(p):
        sd = _sd()
        del sd["blocks.1.att.gate.weight"]
        torch.save(sd, p)
    case("missing.pth", ["missing key 'blocks.1.att.gate.weight'"], missing)

    def shaped(p):
        sd = _sd()
        sd["blocks.0.ffn.value.weight"] = torch.zeros(64, 100)
        torch.save(sd, p)
    case("shape.pth", ["'blocks.0.ffn.value.weight' has shape [64, 100]"], shaped)

    def deepembed(p):
        sd = make_checkpoint("7")
        sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(97, 32)
        torch.save(sd, p)
    case("deepembed.pth", ["DeepEmbed"], deepembed)
    case("converted.pth", ["already converted by ChatRWKV", "_strategy"],
         lambda p: torch.save({**_sd(), "_strategy": torch.zeros(1)}, p))

    def nan(p):
        sd = _sd()
        sd["blocks.1.att.key.weight"][3, 4] = float("nan")
        torch.save(sd, p)
    case("nan.pth", ["'blocks.1.att.key.weight' contains NaN or Inf"], nan)

    def inf(p):
        sd = _sd(dtype=torch.bfloat16)
        sd["head.weight"][0, 0] = float("inf")
        save_checkpoint(sd, p)
    case("inf.safetensors", ["'head.weight' contains NaN or Inf"], inf)

    def corrupt(p):
        save_checkpoint(_sd(), p)
        p.write_bytes(p.read_bytes()[:-100])
    case("corrupt.safetensors", ["not a valid safetensors file"], corrupt)

    def hf_no_weights(p):
        p.mkdir()
        (p / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    case("hf_empty", ["no weights", "model.safetensors"], hf_no_weights)
    case("plain_dir", ["without config.json"], lambda p: p.mkdir())
    case("unknown_key.pth", ["unexpected key 'blocks.0.att.extra'"],
         lambda p: torch.save({**_sd(), "blocks.0.att.extra": torch.zeros(1)}, p))
    cases["nonexistent"] = (tmp / "does_not_exist.pth", ["not found"])
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return bad_inputs(tmp_path_factory.mktemp("bad"))


CASE_NAMES = ["empty.pth", "text.pth", "truncated.pth", "list.pth", "mixed.pth", "notrwkv.pth", "missing.pth",
              "shape.pth", "deepembed.pth", "converted.pth", "nan.pth", "inf.safetensors", "corrupt.safetensors",
              "hf_empty", "plain_dir", "unknown_key.pth", "nonexistent"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_rejects(cases, name):
    path, words = cases[name]
    r = run_cli("inspect", path, *(["--values"] if name in VALUE_CASES else []))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


VALUE_CASES = ("nan.pth", "inf.safetensors")  # found when the values are read: export, verify, inspect --values


@pytest.mark.parametrize("name", CASE_NAMES)
def test_api_raises_one_exception_type(cases, name):
    with pytest.raises(RWKVDeployError):
        ckpt = load_checkpoint(cases[name][0])
        for key in ckpt.weights:
            ckpt.checked(key)


@pytest.mark.parametrize("name", VALUE_CASES)
def test_nan_found_by_export_and_not_by_header_reads(cases, name, tmp_path):
    path, words = cases[name]
    r = run_cli("inspect", path)  # headers and shapes only
    assert r.returncode == 0 and "RWKV-" in r.stdout, r.stderr
    one_error_line(run_cli("export", path, "-o", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


def test_pickle_that_runs_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"emb.weight": RunsCode(str(marker))}, fh)
    r = run_cli("inspect", path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "other than tensors" in r.stderr
    assert not marker.exists()


def test_debug_flag_shows_traceback(cases):
    r = run_cli("--debug", "inspect", cases["empty.pth"][0])
    assert r.returncode != 0 and "Traceback" in r.stderr
