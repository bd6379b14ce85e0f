"""Serving an export needs onnxruntime, numpy and a tokenizer only: torch is blocked in a child process."""
import subprocess
import sys

import pytest

from rwkv_deploy import export

CHILD = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from rwkv_deploy import open_session
from rwkv_deploy.runtime.generate import generate
s = open_session(sys.argv[1])
logits, state = s.forward(np.array([[1, 2, 3]]), s.init_state(1))
logits, state = s.step(np.array([4]), state)
print(logits.shape, "".join(generate(s, "Hello", max_tokens=5, seed=0)) is not None)
"""


@pytest.mark.parametrize("wkv", ["portable", "fused"])
def test_open_session_and_generate_without_torch(tmp_path, wkv):
    from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint

    ckpt = tmp_path / "w.pth"
    save_checkpoint(make_checkpoint("7", n_layer=2, n_embd=32, head_size=16, vocab_size=65536), ckpt)
    out = export(ckpt, tmp_path / "o", wkv=wkv, prefill=True)
    r = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 65536) True"
