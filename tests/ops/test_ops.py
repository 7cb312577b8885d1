"""Each op's hand-written backward against autograd (differentiating the shipped forward) and
against element-wise central differences, in float64, on random shapes.

Tolerances: hand vs autograd <= 1e-10 relative (both are exact up to float64 rounding, measured
~1e-15); hand vs central differences (eps 1e-6, error O(eps^2) + O(1e-16/eps)) <= 1e-6 relative;
forwards against torch/NumPy references <= 1e-12..1e-14 relative (norm-wise: element-wise relative
error is meaningless where a sum cancels to near zero).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from autograd import grad
from hypothesis import given
from hypothesis import strategies as st

from tinypeft.gradcheck import relative_error
from tinypeft.ops import (
    attention_backward,
    attention_forward,
    attention_visibility,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_tanh_backward,
    gelu_tanh_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    softmax_backward,
    softmax_forward,
)

AUTOGRAD_TOL = 1e-10
FD_TOL = 1e-6


def numeric_grad(f, args, i, eps=1e-6):
    x = args[i]
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        hi = [a.copy() if j == i else a for j, a in enumerate(args)]
        lo = [a.copy() if j == i else a for j, a in enumerate(args)]
        hi[i][idx] += eps
        lo[i][idx] -= eps
        g[idx] = (f(*hi) - f(*lo)) / (2 * eps)
    return g


def error(a, b, floor=0.0):
    """||a - b|| / max(||a||, ||b||, floor): floor is the size of the terms that cancel to make a
    gradient small, below which a difference is rounding, not a wrong rule."""
    scale = max(np.linalg.norm(a), np.linalg.norm(b), floor)
    return 0.0 if scale == 0 else np.linalg.norm(a - b) / scale


def check_op(scalar_fn, args, hand_grads, fd=True, floors=None):
    """scalar_fn(*args) -> sum(output * R); hand_grads[i] is the hand gradient for args[i] (or None)."""
    for i, hand in enumerate(hand_grads):
        if hand is None:
            continue
        floor = 0.0 if floors is None else floors[i]
        auto = grad(scalar_fn, i)(*args)
        assert error(hand, auto, floor) <= AUTOGRAD_TOL, f"arg {i}: hand vs autograd"
        if fd:
            assert error(hand, numeric_grad(scalar_fn, args, i), floor) <= FD_TOL, f"arg {i}: hand vs FD"


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6))


@given(shapes, st.integers(1, 5), st.booleans(), st.integers(0, 2**16))
def test_linear(shape, n_out, with_bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((shape[-1], n_out))
    b = rng.standard_normal(n_out) if with_bias else None
    R = rng.standard_normal((*shape[:-1], n_out))
    y, cache = linear_forward(x, w, b)
    assert relative_error(y, np.einsum("...i,io->...o", x, w) + (0 if b is None else b)) <= 1e-14
    dx, dw, db = linear_backward(R, cache, need_dbias=with_bias)
    if with_bias:
        check_op(lambda x, w, b: (linear_forward(x, w, b)[0] * R).sum(), [x, w, b], [dx, dw, db])
    else:
        check_op(lambda x, w: (linear_forward(x, w, None)[0] * R).sum(), [x, w], [dx, dw])


def test_linear_skips_what_is_not_needed():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    _, cache = linear_forward(x, w, b)
    assert linear_backward(np.ones((2, 3, 5)), cache, need_dx=False, need_dweight=False, need_dbias=False) == (
        None,
        None,
        None,
    )


@given(shapes, st.integers(0, 2**16), st.sampled_from([1.0, 1e-3, 1e3]))
def test_layernorm(shape, seed, scale):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape) + rng.standard_normal()
    w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    R = rng.standard_normal(shape)
    y, cache = layernorm_forward(x, w, b)
    ref = torch.nn.functional.layer_norm(torch.tensor(x), (shape[-1],), torch.tensor(w), torch.tensor(b), eps=1e-5)
    assert relative_error(y, ref.numpy()) <= 1e-12
    dx, dw, db = layernorm_backward(R, cache)
    # dx = rstd (g - mean g - xhat mean(g xhat)) cancels to ~0 for rows of 1 or 2 features (xhat is then
    # fixed at 0 or +-1): measure it against the size of rstd * g, the terms that cancel
    floors = [np.linalg.norm(R * w * cache[1]), 0.0, 0.0]
    f = lambda x, w, b: (layernorm_forward(x, w, b)[0] * R).sum()  # noqa: E731
    check_op(f, [x, w, b], [dx, dw, db], fd=scale != 1e-3, floors=floors)


def test_layernorm_constant_row_is_finite():
    x = np.full((2, 3, 8), 7.0)
    y, cache = layernorm_forward(x, np.ones(8), np.zeros(8))
    dx, dw, db = layernorm_backward(np.ones_like(x), cache)
    assert all(np.isfinite(a).all() for a in (y, dx, dw, db))
    np.testing.assert_array_equal(y, 0.0)


@given(shapes, st.integers(0, 2**16))
def test_gelu_tanh(shape, seed):
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal(shape)
    R = rng.standard_normal(shape)
    y, cache = gelu_tanh_forward(x)
    ref = torch.nn.functional.gelu(torch.tensor(x), approximate="tanh").numpy()
    assert relative_error(y, ref) <= 1e-14
    check_op(lambda x: (gelu_tanh_forward(x)[0] * R).sum(), [x], [gelu_tanh_backward(R, cache)])


def test_gelu_is_the_tanh_form_not_erf():
    x = np.linspace(-4, 4, 101)
    erf = torch.nn.functional.gelu(torch.tensor(x)).numpy()
    y, _ = gelu_tanh_forward(x)
    assert np.abs(y - erf).max() > 1e-4  # the two forms differ; we must be the tanh one (above)


@given(shapes, st.integers(0, 2**16), st.sampled_from([1.0, 50.0, 1e4]))
def test_softmax(shape, seed, scale):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape)
    R = rng.standard_normal(shape)
    p, cache = softmax_forward(x)
    assert np.isfinite(p).all()
    assert relative_error(p, torch.softmax(torch.tensor(x), -1).numpy()) <= 1e-14
    # dx = p (R - <R, p>) cancels where p is nearly one-hot: measure against the size of p R
    floors = [np.linalg.norm(p * R)]
    f = lambda x: (softmax_forward(x)[0] * R).sum()  # noqa: E731
    check_op(f, [x], [softmax_backward(R, cache)], fd=scale == 1.0, floors=floors)


@given(st.integers(1, 6), st.integers(2, 7), st.integers(0, 2**16), st.sampled_from([1.0, 1e4]))
def test_cross_entropy(n, V, seed, scale):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((n, V))
    targets = rng.integers(0, V, size=n)
    targets[rng.random(n) < 0.3] = -100
    targets[0] = rng.integers(0, V)  # at least one target
    loss, cache = cross_entropy_forward(logits, targets)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(targets), ignore_index=-100)
    assert np.isfinite(loss)
    assert abs(loss - ref.item()) <= 1e-12 * max(1.0, abs(ref.item()))
    dlogits = cross_entropy_backward(1.0, cache)
    assert np.isfinite(dlogits).all()
    np.testing.assert_array_equal(dlogits[targets == -100], 0.0)
    check_op(lambda z: cross_entropy_forward(z, targets)[0], [logits], [dlogits], fd=scale == 1.0)


@given(st.integers(1, 5), st.integers(1, 4), st.integers(1, 8), st.integers(0, 2**16))
def test_embedding_with_repeated_ids(V, C, n, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((V, C))
    ids = rng.integers(0, V, size=(2, n))
    ids[0, 0] = ids[-1, -1]  # a repeat, always
    R = rng.standard_normal((2, n, C))
    out, cache = embedding_forward(w, ids)
    np.testing.assert_array_equal(out, w[ids])
    dw = embedding_backward(R, cache)
    expected = np.zeros_like(w)
    for idx, row in zip(ids.reshape(-1), R.reshape(-1, C), strict=True):
        expected[idx] += row
    assert relative_error(dw, expected) <= 1e-14
    check_op(lambda w: (embedding_forward(w, ids)[0] * R).sum(), [w], [dw])


@given(
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(0, 3),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_attention(B, n_head, hs, T, P, with_mask, seed):
    rng = np.random.default_rng(seed)
    C = n_head * hs
    qkv = rng.standard_normal((B, T, 3 * C))
    past_k = rng.standard_normal((B, n_head, P, hs)) if P else None
    past_v = rng.standard_normal((B, n_head, P, hs)) if P else None
    mask = (rng.random((B, P + T)) < 0.7).astype(int) if with_mask else None
    visible = attention_visibility(np, T, P, mask)
    R = rng.standard_normal((B, T, C))

    y, cache = attention_forward(qkv, n_head, visible, past_k, past_v)
    # reference: torch, written the way transformers' eager attention is
    tq = torch.tensor(qkv).view(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)
    k = torch.cat([torch.tensor(past_k), tq[1]], 2) if P else tq[1]
    v = torch.cat([torch.tensor(past_v), tq[2]], 2) if P else tq[2]
    scores = tq[0] @ k.transpose(-1, -2) / hs**0.5
    hidden = torch.full(scores.shape, torch.finfo(torch.float64).min, dtype=torch.float64)
    scores = scores + torch.where(torch.tensor(visible), torch.zeros_like(hidden), hidden)
    ref = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, C)
    assert relative_error(y, ref.numpy()) <= 1e-13

    dqkv, dpk, dpv = attention_backward(R, cache)
    if P:

        def f(qkv, pk, pv):
            return (attention_forward(qkv, n_head, visible, pk, pv)[0] * R).sum()

        check_op(f, [qkv, past_k, past_v], [dqkv, dpk, dpv])
    else:
        assert dpk is None and dpv is None
        check_op(lambda qkv: (attention_forward(qkv, n_head, visible)[0] * R).sum(), [qkv], [dqkv])


def test_attention_is_causal():
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, 6, 12))
    visible = attention_visibility(np, 6)
    y, _ = attention_forward(qkv, 2, visible)
    qkv2 = qkv.copy()
    qkv2[0, 4:] += 1.0  # change the future
    y2, _ = attention_forward(qkv2, 2, visible)
    np.testing.assert_array_equal(y[0, :4], y2[0, :4])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_keep_the_dtype(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(dtype)
    w = rng.standard_normal((4, 4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    outs = [
        linear_forward(x, w, b)[0],
        layernorm_forward(x, b, b)[0],
        gelu_tanh_forward(x)[0],
        softmax_forward(x)[0],
        attention_forward(np.concatenate([x, x, x], -1), 2, attention_visibility(np, 3))[0],
    ]
    assert all(o.dtype == dtype for o in outs)
    _, cache = linear_forward(x, w, b)
    assert all(g.dtype == dtype for g in linear_backward(x, cache))
    _, cache = layernorm_forward(x, b, b)
    assert all(g.dtype == dtype for g in layernorm_backward(x, cache))
    assert gelu_tanh_backward(x, x).dtype == dtype
