"""The WKV recurrences, written once (spec §5, §7).

`wkv4`, `wkv5`, `wkv7` take one token per batch row (v5/v7: each head's vectors as rows [B, H, 1, N]).
`run_wkv*` take whole sequences [B, T, ...]: with T = 1 (the decode step) they call the cell directly; otherwise
a TorchScript loop over 16-token chunks in closed form (v4, v5.x, v6: the first chunk shorter when T is not a
multiple of 16; v7: every chunk's own work done at once before the loop, the last chunk padded, the loop carrying
only the state from chunk to chunk), which the ONNX exporter turns into an ONNX `Loop` whose trip count follows
the graph's dynamic sequence length. The reference model, the ONNX exports (traced), the custom-op reference
kernels and the tests all call these.
Shapes: B batch, T tokens, A attention width, H heads, N head size.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor


def _script(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, but it is what turns
        return torch.jit.script(fn)  # these loops into ONNX Loop nodes with a dynamic trip count


def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """RWKV-4 in the stable "pp" form (spec §5.1).

    w = -exp(time_decay) [A]; u = time_first [A]; k, v [B, A]; aa, bb, pp [B, A], where the running
    numerator/denominator are aa*e^pp and bb*e^pp. Returns wkv [B, A] and the new (aa, bb, pp).
    """
    ww = u + k  # [B, A]: the current token's bonus weight
    p = torch.maximum(pp, ww)
    e1 = torch.exp(pp - p)
    e2 = torch.exp(ww - p)
    wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)  # [B, A]
    ww = w + pp  # decay the past by one step
    p = torch.maximum(ww, k)
    e1 = torch.exp(ww - p)
    e2 = torch.exp(k - p)
    return wkv, e1 * aa + e2 * v, e1 * bb + e2, p


def _col(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)  # a row [..., 1, N] as a column [..., N, 1]


def wkv5(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, S: Tensor) -> Tuple[Tensor, Tensor]:
    """RWKV-5.x/6 (spec §5.2, §5.3): linear attention with per-key-channel decay and a bonus for the current token.

    r, k, v [B, H, 1, N]: one token, each a row; w decay in (0, 1) [B, H, 1, N]; u [H, N];
    S [B, H, N(key), N(value)]. The output reads the OLD state. Returns y [B, H, 1, N] and the new S.
    """
    # y = r (u kᵀv + S) with the bonus as (r·u·k) v: S and kᵀv are each read once, not summed into a third matrix
    y = r @ S + (r * u.unsqueeze(-2) * k).sum(-1, keepdim=True) * v  # [B, H, 1, N]
    return y, _col(k) @ v + _col(w) * S


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, S: Tensor) -> Tuple[Tensor, Tensor]:
    """RWKV-7 generalised delta rule (spec §5.4): S' = S·diag(w) + (S a) bᵀ + v kᵀ, y = S' r.

    r, w, k, v, a, b [B, H, 1, N]: one token, each a row; S [B, H, N(value), N(key)]. v7 uses a = -kk and
    b = kk*a_rate. The output reads the UPDATED state. Returns y [B, H, N, 1] (a column) and the new S.
    """
    # both rank-1 updates as one [N, 2] x [2, N] product: three passes over an N x N state, not five
    S = S * w + torch.cat([S @ _col(a), _col(v)], -1) @ torch.cat([b, k], -2)  # [B, H, N, N]
    return S @ _col(r), S


def wkv4_powers(w: Tensor, u: Tensor, L: int) -> Tensor:
    """[L(t), L(s), A]: the power of e that token s of a chunk carries at token t, less its k_s: (t-1-s)·w for
    s < t, u at s = t, -inf after t. It depends on the layer alone: computed once, before the chunks' loop (the
    top-left h x h of it is the table of an h-token chunk)."""
    t = torch.arange(L, dtype=w.dtype, device=w.device)  # [L]
    lag = t.unsqueeze(1) - 1 - t.unsqueeze(0)  # [L(t), L(s)]: t-1-s
    pw = torch.where((lag == -1).unsqueeze(-1), u, lag.unsqueeze(-1) * w)  # [L, L, A]
    return pw.masked_fill((lag < -1).unsqueeze(-1), -float("inf"))  # later tokens do not count


def wkv4_chunk(w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor, powers: Tensor
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """wkv4 over a chunk of L tokens at once (spec §7's closed form); equal to L calls of `wkv4`.

    k, v [B, L, A]; powers [L, L, A] from `wkv4_powers`; the rest as in `wkv4`. Token t weighs, as powers of e:
    the state by pp + t·w, an earlier token s by (t-1-s)·w + k_s, itself by u + k_t; each token divides by its own
    largest power, as the "pp" form does. The new pp is the largest power after the chunk, which is the pp that L
    steps reach.
    """
    L = k.shape[1]
    t = torch.arange(L, dtype=k.dtype, device=k.device)  # [L]
    pw = powers + k.unsqueeze(1)  # [B, L(t), L(s), A]: powers of token s at t
    ps = pp.unsqueeze(1) + t.unsqueeze(-1) * w  # [B, L, A]: the state's power at token t
    top = torch.maximum(pw.amax(2), ps)  # [B, L, A]
    e, es = torch.exp(pw - top.unsqueeze(2)), torch.exp(ps - top)
    y = ((e * v.unsqueeze(1)).sum(2) + es * aa.unsqueeze(1)) / (e.sum(2) + es * bb.unsqueeze(1))  # [B, L, A]
    pk = (L - 1 - t).unsqueeze(-1) * w + k  # [B, L, A]: each token's power after the chunk
    pl = pp + L * w  # [B, A]
    p = torch.maximum(pk.amax(1), pl)
    e, el = torch.exp(pk - p.unsqueeze(1)), torch.exp(pl - p)
    return y, el * aa + (e * v).sum(1), el * bb + e.sum(1), p


def wkv5_chunk(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, S: Tensor) -> Tuple[Tensor, Tensor]:
    """wkv5 over a chunk of L tokens at once, in matrix form (spec §7); equal to L calls of `wkv5`.

    r, k, v, w [B, L, H, N]; u [H, N]; S [B, H, N, N]. With P_t = w_0 ⋯ w_t per key channel:
      y_t = Σ_{s<t} (r_t ⊙ P_{t-1}/P_s)·k_s v_s + (r_t ⊙ u)·k_t v_t + (r_t ⊙ P_{t-1})ᵀ S
      S'  = diag(P_{L-1}) S + Σ_s diag(P_{L-1}/P_s) k_s v_sᵀ
    in log space. Chunks of 16 keep fp32 error at the level of the token loop (|log P| stays small).
    """
    L = r.shape[1]
    cum = torch.cumsum(torch.log(w), 1)  # [B, L, H, N]: log P_t
    prev = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], 1)  # log P_{t-1}: the same floats as cum
    past = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)[None, :, :, None, None]  # s < t
    gap = prev.unsqueeze(2) - cum.unsqueeze(1)  # [B, L(t), L(s), H, N]
    decay = torch.exp(torch.where(past, gap, torch.full_like(gap, -float("inf"))))
    att = (r.unsqueeze(2) * k.unsqueeze(1) * decay).sum(-1).permute(0, 3, 1, 2)  # [B, H, L(t), L(s)]
    vh = v.transpose(1, 2)  # [B, H, L, N]
    y = att @ vh + (r * u * k).sum(-1, keepdim=True).transpose(1, 2) * vh  # within the chunk, bonus at s = t
    y = y + (r * torch.exp(prev)).transpose(1, 2) @ S  # what the state brings in
    last = cum[:, -1:]  # [B, 1, H, N]
    S = torch.exp(last[:, 0]).unsqueeze(-1) * S + (k * torch.exp(last - cum)).permute(0, 2, 3, 1) @ vh
    return y.transpose(1, 2), S  # [B, L, H, N], [B, H, N, N]


def _unit_lower_inverse(L: Tensor, c: int) -> Tensor:
    """(I - L)⁻¹ for L [..., c, c] strictly lower-triangular, c a power of 2, in log2(c) steps of matmuls.

    Step m inverts the diagonal blocks of size 2s = 2^(m+1) from those of size s, already in X: a block
    [[A, 0], [C, D]] of I - L has the inverse [[A⁻¹, 0], [D⁻¹ (-C) A⁻¹, D⁻¹]], i.e. X + X (L on the C blocks) X.
    Every intermediate is a block of the true inverse, so nothing grows; the Neumann product
    (I + L)(I + L²)(I + L⁴)… sums powers of L whose entries do grow (binomially, when keys repeat) and cancel.
    """
    if c < 1 or c & (c - 1):
        raise ValueError(f"chunk {c} is not a power of 2")
    i = torch.arange(c, device=L.device)
    row, col = i.unsqueeze(1), i.unsqueeze(0)  # [c, 1], [1, c]
    X = torch.eye(c, dtype=L.dtype, device=L.device)  # the inverse of the 1 x 1 blocks
    s = 1
    while s < c:  # unrolled at trace time: c is a constant
        C = (row // (2 * s) == col // (2 * s)) & (row // s > col // s)  # [c, c]: each 2s-block's lower-left
        X = X + X @ (L * C.to(L.dtype)) @ X  # [..., c, c]
        s *= 2
    return X


def wkv7_chunk(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, c: int
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """c tokens of `wkv7` as two maps of the state S at the chunk's start: y = Q Sᵀ + Y0, S' = S G + Hs (spec §5.4).

    r, w, k, v, a, b [..., c, N] (any leading dims: every chunk of a sequence at once); c a power of 2.
    Returns Q [..., c, N(key)], Y0 [..., c, N(value)], G [..., N(key), N(key)], Hs [..., N(value), N(key)].
    With P_t = w_1 ⋯ w_t per key channel (P_0 = 1) and z_t = S_{t-1} a_t, unrolling the recurrence gives
      S_t = (S + Σ_{s≤t} (z_s b_sᵀ + v_s k_sᵀ) diag(1/P_s)) diag(P_t)
      z_t = S (a_t ⊙ P_{t-1}) + Σ_{s<t} z_s (b_s·a_t P_{t-1}/P_s) + v_s (k_s·a_t P_{t-1}/P_s)
    so the z_t solve the unit lower-triangular system Z = (I - L_ab)⁻¹ (Ã Sᵀ + L_ak V) = W Sᵀ + U (WY form),
    and y_t = S_t r_t and S_c are linear in S and Z. v7's decay w > e^-e^-0.5 ≈ 0.545 keeps 1/P_s ≤ 0.545^-c
    (2e4 at c = 16) well inside fp32's range; the products that are kept only use ratios P_t/P_s ≤ 1.
    """
    cum = torch.cumsum(torch.log(w), -2)  # [..., c, N]: log P_t
    prev = torch.cat([torch.zeros_like(cum[..., :1, :]), cum[..., :-1, :]], -2)  # log P_{t-1}: the same floats
    last = cum[..., -1:, :]  # [..., 1, N]: log P_c
    ad, rd = a * torch.exp(prev), r * torch.exp(cum)  # [..., c, N]: a_t, r_t decayed from the chunk's start
    bu, ku = b * torch.exp(-cum), k * torch.exp(-cum)  # b_s, k_s undecayed back to the chunk's start
    be, ke = b * torch.exp(last - cum), k * torch.exp(last - cum)  # b_s, k_s decayed to the chunk's end
    # masks as factors, not Where (ORT broadcasts Where slowly): the entries they zero are finite, ≤ 0.545^-c
    upto = torch.ones(c, c, dtype=r.dtype, device=r.device).tril()  # [c(t), c(s)]: s ≤ t, what y_t sees
    past = upto.tril(-1)  # s < t, what z_t sees
    L_ab = ad @ bu.transpose(-1, -2) * past  # [..., c, c]
    L_ak = ad @ ku.transpose(-1, -2) * past
    M_rb = rd @ bu.transpose(-1, -2) * upto
    M_rk = rd @ ku.transpose(-1, -2) * upto
    inv = _unit_lower_inverse(L_ab, c)  # [..., c, c]
    W, U = inv @ ad, inv @ (L_ak @ v)  # [..., c, N(key)], [..., c, N(value)]: Z = W Sᵀ + U
    Q, Y0 = rd + M_rb @ W, M_rb @ U + M_rk @ v  # Y = rd Sᵀ + M_rb Z + M_rk V
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)  # [N, N]
    G = eye * torch.exp(last) + W.transpose(-1, -2) @ be  # [..., N, N]: S' = S diag(P_c) + Zᵀ be + Vᵀ ke
    return Q, Y0, G, U.transpose(-1, -2) @ be + v.transpose(-1, -2) @ ke


CHUNK = 16  # v7: as fast as 32 with ONNX Runtime on CPU, and as accurate in fp32 as the token loop

# The sequence loops below are exported as ONNX Loops that TensorRT(-RTX) must parse and build, and that ONNX
# Runtime must run fast. What that rules out, and what they do instead:
# - lists (`ys.append(y)`, `torch.cat(ys)`) become Sequence ops, which TensorRT's parser rejects: outputs go
#   into a tensor allocated before the loop, one row per iteration (ScatterND).
# - a shape that changes from one iteration to the next (a shorter last chunk, even a Slice that starts at the
#   loop counter) fails TensorRT's builder: the chunked loops see whole chunks only, [n, B, CHUNK, ...], and the
#   short chunk, when T is not a multiple of CHUNK, is the FIRST one and runs before the loop (v7: the last one,
#   padded with tokens that leave the state as it is).
# - a Gather from an empty axis fails TensorRT's shape checks even in a loop that runs zero times: the chunks
#   carry one spare chunk of zeros that no iteration reads.
# - `x[:, t]` inside the loop exports as a copy of all of x then a Gather, every iteration: the loops index
#   time-major tensors (`xt[t]`, one Gather) and write time-major outputs (`ys[t] = y`, one-row ScatterND).
# The trip count is a tensor made by a Shape op: an int would be frozen into the graph.

@_script
def _head(T: int, chunk: int) -> int:
    """Length of the chunk that runs before the loop: 1..chunk, so that the rest is whole chunks."""
    return (T - 1) % chunk + 1


@_script
def _chunks(x: Tensor, start: int, chunk: int) -> Tensor:
    """x[:, start:] [B, T', ...] as T' // chunk whole chunks plus a spare one of zeros: [T' // chunk + 1, B, chunk, ...]."""
    rest = x[:, start:]
    B, n = rest.shape[0], rest.shape[1] // chunk
    spare = rest.new_zeros([B, chunk] + rest.shape[2:])
    return torch.cat([rest, spare], 1).reshape([B, n + 1, chunk] + rest.shape[2:]).transpose(0, 1)


@_script
def _unchunk(y0: Tensor, ys: Tensor) -> Tensor:
    """The head chunk's y0 [B, h, ...] and the loop's ys [n + 1, B, chunk, ...] as one [B, h + n * chunk, ...]."""
    n1, B, chunk = ys.shape[0], ys.shape[1], ys.shape[2]
    # reshaped with the spare chunk, then cut: in a reshape to n * chunk = 0 tokens, ONNX reads 0 as "copy that dim"
    flat = ys.transpose(0, 1).reshape([B, n1 * chunk] + ys.shape[3:])  # [B, (n + 1) * chunk, ...]
    return torch.cat([y0, flat[:, :(n1 - 1) * chunk]], 1)


@_script
def _wkv4_seq(w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor, steps: Tensor,
              chunk: int):
    T = int(steps)
    h = _head(T, chunk)
    powers = wkv4_powers(w, u, chunk)  # [chunk, chunk, A]
    y0, aa, bb, pp = wkv4_chunk(w, u, k[:, :h], v[:, :h], aa, bb, pp, powers[:h, :h])  # [B, h, A]
    ks, vs = _chunks(k, h, chunk), _chunks(v, h, chunk)  # [n + 1, B, chunk, A]
    ys = y0.new_zeros(ks.shape)
    for i in range((T - h) // chunk):
        y, aa, bb, pp = wkv4_chunk(w, u, ks[i], vs[i], aa, bb, pp, powers)
        ys[i] = y
    return _unchunk(y0, ys), aa, bb, pp  # [B, T, A]


@_script
def _wkv5_seq(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, S: Tensor, steps: Tensor, chunk: int):
    T = int(steps)
    h = _head(T, chunk)
    y0, S = wkv5_chunk(r[:, :h], k[:, :h], v[:, :h], w[:, :h], u, S)  # [B, h, H, N]
    rs, ks, vs, ws = _chunks(r, h, chunk), _chunks(k, h, chunk), _chunks(v, h, chunk), _chunks(w, h, chunk)
    ys = y0.new_zeros(rs.shape)  # [n + 1, B, chunk, H, N]
    for i in range((T - h) // chunk):
        y, S = wkv5_chunk(rs[i], ks[i], vs[i], ws[i], u, S)
        ys[i] = y
    return _unchunk(y0, ys), S  # [B, T, H, N]


@_script
def _pad_chunks(x: Tensor, fill: float, chunk: int) -> Tensor:
    """x [B, T, H, N] padded at the end with `fill` to whole chunks, head-major: [n, B, H, chunk, N]."""
    B, T = x.shape[0], x.shape[1]
    n = (T + chunk - 1) // chunk
    pad = torch.full([B, chunk] + x.shape[2:], fill, dtype=x.dtype, device=x.device)  # a whole chunk, then cut:
    x = torch.cat([x, pad], 1)[:, :n * chunk]  # no tensor is ever empty (see above)
    return x.reshape([B, n, chunk] + x.shape[2:]).permute(1, 0, 3, 2, 4)


@_script
def _wkv7_chunks(Q: Tensor, Y0: Tensor, G: Tensor, Hs: Tensor, S: Tensor) -> Tuple[Tensor, Tensor]:
    """The chunks in turn, from `wkv7_chunk`'s maps [n, B, H, ...]: y [n, B, H, chunk, N] and the last state."""
    ys = torch.zeros_like(Y0)
    for i in range(G.shape[0]):  # the only sequential part: T / chunk steps of a few matmuls
        # y here rather than from states kept for after the loop: each ScatterND copies all of ys, and a chunk's
        # y is chunk x N per head where a state is N x N
        ys[i] = Q[i] @ S.transpose(-1, -2) + Y0[i]
        S = S @ G[i] + Hs[i]
    return ys, S


@_script
def _unchunk7(y: Tensor, steps: Tensor) -> Tensor:
    """y [n, B, H, chunk, N] -> [B, T, H, N]: the padding at the end cut."""
    n, B, H, chunk, N = y.shape[0], y.shape[1], y.shape[2], y.shape[3], y.shape[4]
    return y.permute(1, 0, 3, 2, 4).reshape([B, n * chunk, H, N])[:, :int(steps)]


def _wkv7_seq(r, w, k, v, a, b, S, steps: Tensor, chunk: int):
    # not scripted, but traced: wkv7_chunk's loop over the levels of its triangular inverse must unroll
    # padding tokens are w = 1, a = b = k = v = 0: S' = S exactly, so the state after the last chunk is S_T
    r, k, v, a, b = (_pad_chunks(x, 0.0, chunk) for x in (r, k, v, a, b))  # [n, B, H, chunk, N]
    w = _pad_chunks(w, 1.0, chunk)
    Q, Y0, G, Hs = wkv7_chunk(r, w, k, v, a, b, chunk)  # every chunk at once, before the loop
    ys, S = _wkv7_chunks(Q, Y0, G, Hs, S)  # [n, B, H, chunk, N]
    return _unchunk7(ys, steps), S  # [B, T, H, N]


def _steps(x: Tensor) -> Tensor:
    return torch._shape_as_tensor(x)[1]  # traced as Shape + Gather, so it stays dynamic in ONNX


# The decode step (T = 1) and the sequence form are separate functions, chosen by the caller (RWKV.step vs
# RWKV.forward), never by looking at T inside traced code: the step graph and the prefill graph are traced from
# different entry points, and a data-dependent branch would be frozen into whichever graph was traced.

def step_wkv4(w, u, k, v, aa, bb, pp):
    """k, v [B, 1, A] -> wkv [B, 1, A], (aa, bb, pp): the decode step, the cell alone."""
    y, aa, bb, pp = wkv4(w, u, k[:, 0], v[:, 0], aa, bb, pp)
    return y.unsqueeze(1), (aa, bb, pp)


def run_wkv4(w, u, k, v, aa, bb, pp):
    """k, v [B, T, A] -> wkv [B, T, A], (aa, bb, pp), for any T >= 1."""
    y, aa, bb, pp = _wkv4_seq(w, u, k, v, aa, bb, pp, _steps(k), CHUNK)
    return y, (aa, bb, pp)


def _rows(x: Tensor) -> Tensor:
    return x.transpose(1, 2)  # [B, 1, H, N] -> [B, H, 1, N]: one token's heads as rows (moves no data)


def step_wkv5(r, k, v, w, u, S):
    """r, k, v, w [B, 1, H, N] -> y [B, 1, H, N], S."""
    y, S = wkv5(_rows(r), _rows(k), _rows(v), _rows(w), u, S)
    return _rows(y), S


def run_wkv5(r, k, v, w, u, S):
    """r, k, v, w [B, T, H, N] -> y [B, T, H, N], S, for any T >= 1."""
    return _wkv5_seq(r, k, v, w, u, S, _steps(r), CHUNK)


def step_wkv7(r, w, k, v, a, b, S):
    """r, w, k, v, a, b [B, 1, H, N] -> y [B, 1, H, N], S."""
    y, S = wkv7(*(_rows(x) for x in (r, w, k, v, a, b)), S)  # y [B, H, N, 1]
    return y.permute(0, 3, 1, 2), S


def run_wkv7(r, w, k, v, a, b, S):
    """r, w, k, v, a, b [B, T, H, N] -> y [B, T, H, N], S, for any T >= 1."""
    return _wkv7_seq(r, w, k, v, a, b, S, _steps(r), CHUNK)


@dataclass(frozen=True)
class WKVOps:
    """Which implementation of the recurrences a model calls: PORTABLE (standard ONNX ops once traced) or the
    fused rwkv-domain operators (custom_ops.torch_ops.FUSED). Same signatures as run_wkv4/5/7."""

    v4: Callable
    v5: Callable
    v7: Callable


PORTABLE = WKVOps(run_wkv4, run_wkv5, run_wkv7)
PORTABLE_STEP = WKVOps(step_wkv4, step_wkv5, step_wkv7)
