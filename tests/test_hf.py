"""A Hugging Face RWKV-4 folder, made by transformers itself, against transformers' own logits."""
import re

import numpy as np
import pytest
import torch
from conftest import normalised, random_tokens

from rwkv_deploy.models import load_checkpoint, load_model
from rwkv_deploy.models.checkpoint import HF_RENAMES
from rwkv_deploy.models.synthetic import make_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")
torch.set_grad_enabled(False)


def make_hf_folder(path, n_layer=7, safe=True):
    cfg = transformers.RwkvConfig(vocab_size=97, hidden_size=64, num_hidden_layers=n_layer, attention_hidden_size=64,
                                  intermediate_size=256, rescale_every=6, tie_word_embeddings=False)
    hf = transformers.RwkvForCausalLM(cfg)
    sd = make_checkpoint("4", n_layer=n_layer, seed=7)  # realistic ranges instead of HF's init
    ours = {}
    for k, t in hf.state_dict().items():
        b = k
        for pat, rep in HF_RENAMES:
            b = re.sub(pat, rep, b)
        ours[k] = sd[b].reshape(t.shape)
    hf.load_state_dict(ours, strict=True)
    hf.save_pretrained(path, safe_serialization=safe)
    return transformers.RwkvForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_hf_folder_matches_transformers(tmp_path, safe):
    hf = make_hf_folder(tmp_path, safe=safe)
    tokens = random_tokens(40, seed=8, batch=1)
    ref = hf(tokens).logits[0].numpy()  # eval mode: rescale_every=6 is active, over 7 layers
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "hf" and ckpt.version == "4" and ckpt.dims.n_layer == 7 and ckpt.rescale_every == 6
    m = load_model(ckpt)
    state, rows = m.init_state(1), []
    for t in tokens[0]:
        logits, state = m.step(t[None], state)
        rows.append(logits[0].numpy())
    assert normalised(np.stack(rows), ref) <= 1e-5
    seq, _ = m(tokens, m.init_state(1))
    assert normalised(seq[0].numpy(), ref) <= 1e-5


def test_hf_folder_equals_blinkdl_file(tmp_path):
    make_hf_folder(tmp_path, n_layer=3)
    a = load_checkpoint(tmp_path).weights
    b = make_checkpoint("4", n_layer=3, seed=7)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a)
