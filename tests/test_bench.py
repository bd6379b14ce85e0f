"""`rwkv-deploy bench`: what it reports is consistent with what it timed and with the export's files. Nothing here
asserts on speed (figures depend on the machine and its load); the figures themselves are in the closing notes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import one_error_line, run_cli
from onnx import numpy_helper

from rwkv_deploy import export
from rwkv_deploy.bench import bench
from rwkv_deploy.errors import RWKVDeployError


def bytes_read_by_cpu(folder) -> int:
    """The step graph's weights loaded with their data, minus the embedding table; fp16 counted at 4 bytes (the
    CPU provider widens fp16 weights to float32 at load on x86) unless only rwkv::MatMulF16 reads them."""
    proto = onnx.load(str(folder / "model.onnx"))
    kernel_only = {t.name for t in proto.graph.initializer
                   if {n.op_type for n in proto.graph.node if t.name in n.input} == {"MatMulF16"}}
    arrays = [(t.name, numpy_helper.to_array(t, base_dir=str(folder))) for t in proto.graph.initializer
              if not t.name.startswith("model.emb")]
    return sum(a.size * (4 if a.dtype == np.float16 and name not in kernel_only else a.itemsize)
               for name, a in arrays)


@pytest.mark.parametrize("precision, matmul", [("fp32", None), ("fp16", None), ("fp16", "cpu")])
def test_figures_are_consistent(exported, precision, matmul):
    folder = exported("7", precision, "fused" if matmul else "portable", matmul=matmul)
    r = bench(folder, batch=2, tokens=6, prompt_len=10, repeats=3, warmup=2)
    assert (r.batch, r.tokens, r.prompt_len, r.precision) == (2, 6, 10, precision)
    assert len(r.decode_reps) == len(r.prefill_reps) == 3 and min(r.decode_reps + r.prefill_reps) > 0
    assert r.decode_tok_s == pytest.approx(float(np.median(r.decode_reps)))
    assert r.prefill_tok_s == pytest.approx(2 * 10 / r.ttft_s)  # prefill tok/s is batch x T over the call's time
    assert r.prefill_one_call  # the fixture's exports have a prefill graph
    assert r.weight_bytes_read == bytes_read_by_cpu(folder)
    assert r.floor_tok_s == pytest.approx(r.bandwidth_gb_s * 1e9 / r.weight_bytes_read)
    assert 0 < r.peak_rss_bytes < 4e9
    assert "decode" in r.table() and "floor (batch 1)" in r.table()
    if matmul:  # the float16 matrices at 2 bytes: about half the portable fp16 export's count
        assert r.weight_bytes_read < 0.6 * bytes_read_by_cpu(exported("7", "fp16"))


def test_without_a_prefill_graph_the_prompt_goes_step_by_step(make_ckpt, tmp_path):
    folder = export(make_ckpt("4"), tmp_path / "e", tokenizer=None)
    r = bench(folder, tokens=4, prompt_len=5, repeats=1, warmup=1)
    assert not r.prefill_one_call and "step by step" in r.table()


def test_torch_backend_on_a_checkpoint(make_ckpt):
    r = bench(make_ckpt("6"), backend="torch", tokens=3, prompt_len=4, repeats=1, warmup=1)
    assert r.backend.startswith("torch") and r.weight_bytes_read is None and r.floor_tok_s is None


def test_cli_json_plot_and_the_official_package(exported, tmp_path):
    folder = exported("5.2")
    first, both, png = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "p.png"
    r = run_cli("bench", folder, "--tokens", "4", "--prompt-len", "6", "--repeats", "2", "--json", first)
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout and "bandwidth" in r.stdout
    r = run_cli("bench", folder, "--tokens", "4", "--prompt-len", "6", "--repeats", "2", "--against", "rwkv",
                "--json", both, "--plot", png, "--plot-with", first)
    assert r.returncode == 0, r.stderr
    runs = json.loads(both.read_text())
    assert len(runs) == 2 and runs[0] == json.loads(first.read_text())[0]  # the earlier run, carried over
    peer = runs[1]["peers"]["rwkv"]
    assert peer["decode_tok_s"] > 0 and peer["prefill_tok_s"] > 0 and "rwkv" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input(exported, make_ckpt, tmp_path):
    one_error_line(run_cli("bench", tmp_path / "missing"), "missing")
    one_error_line(run_cli("bench", make_ckpt("7")), "is a checkpoint, not an export folder")
    r = run_cli("bench", exported("7"), "--batch", "0")
    assert r.returncode == 2 and "--batch" in r.stderr
    with pytest.raises(RWKVDeployError, match="unknown --against"):
        bench(exported("7"), tokens=1, prompt_len=1, repeats=1, warmup=0, against=["llama.cpp"])
    assert not list(tmp_path.iterdir())  # nothing written
