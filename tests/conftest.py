"""Shared fixtures: tiny random checkpoints for every version, written once per session."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint
from rwkv_deploy.validation.metrics import max_normalised

# Every test module parametrises over this; test_coverage.py fails if a supported version is missing. Written
# out rather than read from the registry, or that test would compare the registry with itself.
VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7")
normalised = max_normalised  # the name test modules import it by


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def make_ckpt(ckpt_dir):
    """make_ckpt(version, dtype=torch.float32, time_state=False, suffix='.pth', **kw) -> path (cached)."""
    cache: dict = {}

    def make(version, dtype=torch.float32, time_state=False, suffix=".pth", **kw):
        key = (version, dtype, time_state, suffix, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"v{version}_{str(dtype)[6:]}{'_ts' if time_state else ''}_{len(cache)}{suffix}"
            path = ckpt_dir / name
            save_checkpoint(make_checkpoint(version, dtype=dtype, time_state=time_state, **kw), path)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def exported(make_ckpt, tmp_path_factory):
    """exported(version, precision="fp32", wkv="portable", time_state=False, matmul=None) -> export folder with a
    prefill graph, made once per session. Tests that change a folder work on a copy."""
    from rwkv_deploy import export

    root, cache = tmp_path_factory.mktemp("exports"), {}

    def get(version, precision="fp32", wkv="portable", time_state=False, matmul=None):
        key = (version, precision, wkv, time_state) + ((matmul,) if matmul else ())
        if key not in cache:
            cache[key] = export(make_ckpt(version, time_state=time_state), root / "-".join(map(str, key)),
                                precision=precision, wkv=wkv, matmul=matmul, prefill="last")
        return cache[key]

    return get


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rwkv_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def one_error_line(r, *words) -> str:
    """A CLI run that failed as bad input must: exit 2, exactly one `error:` line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def world():
    """The RWKV World tokenizer (its vocabulary ships in the official rwkv package)."""
    from rwkv_deploy.runtime.tokenizer import WorldTokenizer, world_vocab_path

    path = world_vocab_path()
    if path is None:
        pytest.skip("the rwkv package (which ships the World vocabulary) is not installed")
    return WorldTokenizer(path)


@pytest.fixture(scope="session")
def world_model(tmp_path_factory):
    """(checkpoint, export folder with a prefill graph) of a 1-layer RWKV-7 with the World vocabulary size, so
    that export copies the World tokenizer in. Tests that change the folder work on a copy."""
    from rwkv_deploy import export
    from rwkv_deploy.runtime.tokenizer import world_vocab_path

    if world_vocab_path() is None:
        pytest.skip("the rwkv package (which ships the World vocabulary) is not installed")
    root = tmp_path_factory.mktemp("world")
    save_checkpoint(make_checkpoint("7", vocab_size=65536, n_layer=1, n_embd=64, head_size=16), root / "w.pth")
    return root / "w.pth", export(root / "w.pth", root / "out", prefill="last")


def random_tokens(n, vocab=97, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,) if batch is None else (batch, n), generator=g)

@pytest.fixture(scope="session")
def hf_model(make_ckpt, tmp_path_factory):
    """A 1-layer RWKV-4 with the GPT-NeoX-20B vocabulary and its tokenizer attached (`rwkv-deploy tokenizer`)."""
    from rwkv_deploy import export

    from clients_common import hf_20b_tokenizer

    tok = hf_20b_tokenizer()
    folder = export(make_ckpt("4", vocab_size=50277, n_layer=1, n_embd=32), tmp_path_factory.mktemp("hf") / "out",
                    prefill="last")
    r = run_cli("tokenizer", folder, tok)
    assert r.returncode == 0, r.stderr
    return folder
