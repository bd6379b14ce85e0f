"""Internal consistency of the reference: sequence form = single steps, batch rows independent, fp32 ~ fp64."""
import pytest
import torch
from conftest import VERSIONS, normalised, random_tokens

from rwkv_deploy.models import load_model

torch.set_grad_enabled(False)


def steps(m, tokens, state):
    rows = []
    for t in range(tokens.shape[1]):
        logits, state = m.step(tokens[:, t], state)
        rows.append(logits)
    return torch.stack(rows, 1), state


@pytest.mark.parametrize("version", VERSIONS)
def test_sequence_equals_steps(make_ckpt, version):
    m = load_model(make_ckpt(version))
    tokens = random_tokens(24, seed=4, batch=2)
    seq, s_seq = m(tokens, m.init_state(2))  # [B, T, V]
    one, s_one = steps(m, tokens, m.init_state(2))
    assert normalised(seq.numpy(), one.numpy()) <= 1e-5
    for a, b in zip(s_seq, s_one):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # a prompt in two chunks continues from the state of the first
    first, st = m(tokens[:, :10], m.init_state(2))
    rest, _ = m(tokens[:, 10:], st)
    assert normalised(torch.cat([first, rest], 1).numpy(), one.numpy()) <= 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_batch_rows_are_independent(make_ckpt, version):
    m = load_model(make_ckpt(version))
    tokens = random_tokens(12, seed=5, batch=3)
    batched, _ = steps(m, tokens, m.init_state(3))
    for i in range(3):
        alone, _ = steps(m, tokens[i:i + 1], m.init_state(1))
        assert normalised(batched[i].numpy(), alone[0].numpy()) <= 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_float32_close_to_float64(make_ckpt, version):
    path = make_ckpt(version)
    tokens = random_tokens(32, seed=6, batch=1)
    m32, m64 = load_model(path, "float32"), load_model(path, "float64")
    a, _ = steps(m32, tokens, m32.init_state(1))
    b, _ = steps(m64, tokens, m64.init_state(1))
    assert b.dtype == torch.float64 and m64.init_state(1)[1].dtype == torch.float64
    assert normalised(a.numpy(), b.numpy()) <= 1e-5


def test_v4_first_token_gives_wkv_equal_v():
    """pp = -1e30 makes e1 = 0: the first token's wkv is exactly v (spec §6)."""
    from rwkv_deploy.models.wkv import wkv4

    k, v = torch.randn(2, 8) * 3, torch.randn(2, 8)
    wkv, *_ = wkv4(-torch.rand(8), torch.randn(8), k, v, torch.zeros(2, 8), torch.zeros(2, 8), torch.full((2, 8), -1e30))
    assert torch.equal(wkv, v)


def test_state_tuned_initial_state_is_used(make_ckpt):
    m = load_model(make_ckpt("6", time_state=True))
    S0 = m.init_state(2)[1]
    assert S0.abs().sum() > 0 and torch.equal(S0[0], S0[1])
    plain = load_model(make_ckpt("6"))
    assert plain.init_state(1)[1].abs().sum() == 0


def test_wkv5_matches_chunked_closed_form():
    """The recurrence against spec §7's closed form, computed independently in float64."""
    from rwkv_deploy.models.wkv import run_wkv5

    B, T, H, N = 1, 9, 2, 4
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 0.5 + 0.4
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    S0 = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    y, S = run_wkv5(r, k, v, w, u, S0)
    P = torch.cumprod(w, 1)  # P_t = prod_{j<=t} w_j
    for t in range(T):
        Pprev = P[:, t - 1] if t else torch.ones_like(P[:, 0])
        expect = torch.einsum("bhc,bhcv->bhv", r[:, t] * Pprev, S0)
        for s in range(t):
            coef = (r[:, t] * Pprev * k[:, s] / P[:, s]).sum(-1, keepdim=True)
            expect = expect + coef * v[:, s]
        expect = expect + (r[:, t] * u * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        assert torch.allclose(y[:, t], expect, atol=1e-12)
    S_T = P[:, -1][..., None] * S0 + sum((P[:, -1] / P[:, s])[..., None] * k[:, s][..., None] * v[:, s][..., None, :]
                                         for s in range(T))
    assert torch.allclose(S, S_T, atol=1e-12)


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("T", [2, 16, 17, 40])
def test_chunked_wkv4_equals_token_loop(T, fresh):
    """run_wkv4 takes 16-token chunks in closed form; in float64 it must equal the token-by-token "pp" cell,
    from the initial state (pp = -1e30) and from a running one, state representation (aa, bb, pp) included."""
    from rwkv_deploy.models.wkv import run_wkv4, wkv4

    B, A = 2, 24
    g = torch.Generator().manual_seed(T)
    rand = lambda *s, lo=-1.0, hi=1.0: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w, u = -torch.exp(rand(A, lo=-5, hi=2)), rand(A)  # decays from slow to fast
    k, v = rand(B, T, A, lo=-3, hi=3), rand(B, T, A)
    if fresh:
        state = (torch.zeros(B, A, dtype=torch.float64),) * 2 + (torch.full((B, A), -1e30, dtype=torch.float64),)
    else:
        state = (rand(B, A), rand(B, A, lo=0.1, hi=2), rand(B, A, lo=-2, hi=2))
    y, chunked = run_wkv4(w, u, k, v, *state)
    for t in range(T):
        y_t, *state = wkv4(w, u, k[:, t], v[:, t], *state)
        assert torch.allclose(y[:, t], y_t, atol=1e-10)
    for got, want in zip(chunked, state):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [2, 16, 17, 40])
def test_chunked_wkv5_equals_token_loop(T):
    """run_wkv5 takes 16-token chunks in matrix form; in float64 it must equal the token-by-token cell."""
    from rwkv_deploy.models.wkv import run_wkv5, step_wkv5

    B, H, N = 2, 3, 8
    g = torch.Generator().manual_seed(T)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.exp(-torch.exp(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 7 - 6))  # fast and slow
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    S = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    y, S_chunked = run_wkv5(r, k, v, w, u, S)
    for t in range(T):
        y_t, S = step_wkv5(r[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], w[:, t:t + 1], u, S)
        assert torch.allclose(y[:, t:t + 1], y_t, atol=1e-10)
    assert torch.allclose(S_chunked, S, atol=1e-10)
