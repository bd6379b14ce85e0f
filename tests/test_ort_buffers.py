"""ONNX Runtime on the CPU, the ways a step can run: numpy feeds (the default), I/O binding (io_binding=True) and
the thread options (threads, spinning). They compute bit-identical logits and states, a State kept by the caller
stays valid while other steps run, and nothing accumulates over a long generation."""
import gc

import numpy as np
import pytest
from conftest import VERSIONS

from rwkv_deploy import open_session
from rwkv_deploy.runtime.contract import State

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed (pip install -e .[onnx])")

WAYS = {"plain": {}, "io_binding": {"io_binding": True}, "no_spinning": {"spinning": False}}


@pytest.fixture(scope="module")
def sessions(exported):
    """sessions(version, way) -> an OnnxSession on the CPU of the cached fp32 export of `version`."""
    cache = {}

    def get(version, way):
        if (version, way) not in cache:
            cache[version, way] = open_session(exported(version), providers="cpu", **WAYS[way])
        return cache[version, way]

    return get


def tokens(n: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 97, (n, batch))  # [steps, B]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_way_gives_bit_identical_logits_and_state(sessions, version):
    ids = tokens(200)
    out = {}
    for way in WAYS:
        sess = sessions(version, way)
        state, rows = sess.init_state(2), []
        for t in ids:
            logits, state = sess.step(t, state)
            rows.append(logits)
        out[way] = np.stack(rows), state.to_numpy()
    for way in list(WAYS)[1:]:
        np.testing.assert_array_equal(out[way][0], out["plain"][0], err_msg=way)
        for name, a in out["plain"][1].items():
            np.testing.assert_array_equal(out[way][1][name], a, err_msg=f"{way}: {name}")


@pytest.mark.parametrize("version", ["4", "7"])
@pytest.mark.parametrize("way", ["plain", "io_binding"])
@pytest.mark.parametrize("made_by", ["step", "forward"])
def test_a_kept_state_stays_valid_while_other_steps_run(sessions, version, way, made_by):
    """Branching: a kept State, and an array taken out of a State that was then dropped, keep their values while
    60 steps of other branches run; two steps from the kept State agree."""
    sess = sessions(version, way)
    ids = tokens(66, seed=1)
    if made_by == "step":
        kept = sess.init_state(2)
        for t in ids[:5]:
            _, kept = sess.step(t, kept)
    else:
        _, kept = sess.forward(ids[:5].T, sess.init_state(2))
    before = kept.to_numpy()
    first, branch = sess.step(ids[5], kept)
    held = {name: (sess._to_host(a), a) for name, a in branch.items()}  # values now, and the backend array itself
    s = branch
    for t in ids[6:56]:
        _, s = sess.step(t, s)
    del branch, s
    gc.collect()
    other = sess.init_state(2)
    for t in ids[56:]:  # steps after the other branch's arrays could have been freed and reused
        _, other = sess.step(t, other)
    for name, a in kept.to_numpy().items():
        np.testing.assert_array_equal(a, before[name], err_msg=f"kept State: {name}")
    for name, (values, array) in held.items():
        np.testing.assert_array_equal(sess._to_host(array), values, err_msg=f"held array: {name}")
    again, branch2 = sess.step(ids[5], kept)
    np.testing.assert_array_equal(again, first)
    for name, a in branch2.to_numpy().items():
        np.testing.assert_array_equal(a, held[name][0], err_msg=name)


def _live(kind) -> int:
    gc.collect()
    return sum(type(o) is kind for o in gc.get_objects())


@pytest.mark.parametrize("way", ["plain", "io_binding"])
def test_2000_steps_keep_no_state_behind(sessions, way):
    """Only the caller's latest State is alive after 2,000 steps: the session keeps no arrays of its own per
    step (counted as live State and OrtValue objects, not RSS, which the allocator's arena blurs)."""
    sess = sessions("7", way)
    ids = tokens(2010, batch=1, seed=2)
    state = sess.init_state(1)
    for t in ids[:10]:
        _, state = sess.step(t, state)
    start = _live(State), _live(ort.OrtValue)
    for t in ids[10:]:
        logits, state = sess.step(t, state)
    assert (_live(State), _live(ort.OrtValue)) == start
    assert np.isfinite(logits).all()


def test_thread_options_reach_onnx_runtime(exported):
    sess = open_session(exported("7"), providers="cpu", threads=1, spinning=False)
    assert sess._opts.intra_op_num_threads == 1
    assert sess._opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    sess = open_session(exported("7"), providers="cpu", spinning=True)
    assert sess._opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    default = open_session(exported("7"), providers="cpu")
    with pytest.raises(RuntimeError):  # left to ONNX Runtime's own default
        default._opts.get_session_config_entry("session.intra_op.allow_spinning")
