"""End to end: the tritonserver bundled in nvidia-pytriton serves a repository made by `rwkv-deploy triton
--backend python`; 8 interleaved sequences from 4 client threads get exactly the logits of rwkv-deploy's own
Session for the same tokens (so no state leaks between sequences), and the server is stopped by its pid.

Needs the Triton venv (scripts/test.sh makes .venv-triton; or set RWKV_TRITON_VENV)."""
import os
import subprocess
import threading

import numpy as np
import pytest
from conftest import VERSIONS, run_cli

from rwkv_deploy import open_session
from rwkv_deploy.triton.local import VENV_ENV, LocalTriton, triton_venv

pytest.importorskip("tritonclient.grpc", reason="the gRPC client is needed (pip install -e .[test])")
VENV = triton_venv()
pytestmark = pytest.mark.skipif(
    VENV is None, reason=f"no Triton venv with nvidia-pytriton (.venv-triton or ${VENV_ENV}); scripts/test.sh "
                         "creates it: pytriton needs numpy<2, so it cannot share this environment")

THREADS, PER_THREAD, STEPS = 4, 2, 6


@pytest.fixture(scope="module", autouse=True)
def venv_has_rwkv_deploy():
    """The model runs inside the server's Python: rwkv-deploy's runtime must import there, without torch."""
    r = subprocess.run([str(VENV / "bin" / "python"), "-c", "import sys; sys.modules['torch'] = None; "
                        "import rwkv_deploy.triton.sequences, rwkv_deploy.runtime.session"],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"rwkv-deploy's runtime does not import in {VENV} (scripts/test.sh installs it):\n{r.stderr}"


def _conversation(seed: int, vocab: int) -> list[np.ndarray]:
    """A prompt of 2-6 tokens, then STEPS single tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(2, 7))] + [rng.integers(0, vocab, 1) for _ in range(STEPS)]


@pytest.mark.parametrize("version", VERSIONS)
def test_interleaved_sequences_match_the_session(exported, tmp_path, version):
    from rwkv_deploy.triton.client import SequenceClient

    folder = exported(version)
    repo = tmp_path / "repo"
    r = run_cli("triton", folder, "-o", repo, "--backend", "python", "--max-batch", "8")
    assert r.returncode == 0, r.stderr
    sess = open_session(folder, providers="cpu")
    ids = list(range(1, THREADS * PER_THREAD + 1))
    chats = {c: _conversation(c, sess.vocab_size) for c in ids}
    got: dict[int, list] = {c: [] for c in ids}
    errors = []
    barrier = threading.Barrier(THREADS)

    def client(mine: list[int], url: str):
        try:
            c = SequenceClient(url)
            barrier.wait(timeout=30)  # all threads send at once: the server batches their sequences together
            for k in range(STEPS + 1):
                for seq in mine:  # this thread's sequences alternate, each one chunk at a time
                    got[seq].append(c.feed(seq, chats[seq][k], start=k == 0, end=k == STEPS))
            c.close()
        except Exception as e:  # reported by the main thread
            errors.append(e)

    server = LocalTriton(repo, VENV)
    with server:
        assert server.proc.poll() is None
        threads = [threading.Thread(target=client, args=(ids[t::THREADS], server.grpc_url)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, f"{errors[0]!r}\n{server.log_tail()}"
        c = SequenceClient(server.grpc_url)
        c.feed(1, chats[2][0], start=True)  # id 1 again (its sequence ended), and left OPEN with a changed state
        again = c.feed(1, chats[1][0], start=True, end=True)  # START on the open sequence: from the initial state
        c.close()
    # stopped by its pid, and its Python-backend stubs (same process group) with it
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(server.proc.pid, 0)
    for seq in ids:
        assert len(got[seq]) == STEPS + 1
        state = sess.init_state(1)
        for k, tokens in enumerate(chats[seq]):
            ref, state = sess.forward(tokens[None], state)
            np.testing.assert_allclose(got[seq][k], ref[0], rtol=1e-5, atol=1e-5,
                                       err_msg=f"sequence {seq}, chunk {k}")
    np.testing.assert_allclose(again, got[1][0], rtol=1e-5, atol=1e-5)  # = a fresh sequence's, not a continuation


def test_client_example_runs_a_conversation(world_model, tmp_path):
    """examples/triton_client.py: two turns of one conversation (one sequence) against the served World model."""
    import sys
    from pathlib import Path

    _, folder = world_model
    repo = tmp_path / "repo"
    assert run_cli("triton", folder, "-o", repo, "--backend", "python").returncode == 0
    example = Path(__file__).parent.parent / "examples" / "triton_client.py"
    with LocalTriton(repo, VENV) as server:
        r = subprocess.run([sys.executable, str(example), "--url", server.grpc_url, "--export", str(folder),
                            "--max-tokens", "8", "Hello!", "And then?"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{r.stderr}\n{server.log_tail()}"
    assert "User: Hello!\n\nAssistant:" in r.stdout and "User: And then?\n\nAssistant:" in r.stdout
