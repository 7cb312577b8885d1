"""Numerical guards: softmax and cross-entropy stay finite (and right) for logits of +-1e4, in the
ops and through the whole model; LayerNorm of a constant row is finite with finite gradients.
(A non-finite loss stopping training is in test_train.py, and through the CLI in test_killed.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from autograd import grad

import tinypeft as tp
from tinypeft.ops import (
    cross_entropy_backward,
    cross_entropy_forward,
    layernorm_backward,
    layernorm_forward,
    softmax_backward,
    softmax_forward,
)

EXTREME_ROWS = np.array(
    [
        [1e4, -1e4, 0.0, 5.0],  # one huge, one hugely negative
        [1e4, 1e4, 1e4, 1e4],  # all equal and huge
        [-1e4, -1e4, -1e4, -1e4],  # all equal and hugely negative
        [1e4, 1e4 - 1.0, -1e4, -1e4],  # two close at the top
        [-1e4, -1e4, -1e4, 1e4],  # the target (index 0) hopeless
    ]
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_cross_entropy_at_plus_minus_1e4(dtype):
    logits = EXTREME_ROWS.astype(dtype)
    p, cache = softmax_forward(logits)
    reference = torch.softmax(torch.tensor(EXTREME_ROWS), -1).numpy()
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, reference, atol=1e-6 if dtype == np.float32 else 1e-15)
    assert np.isfinite(softmax_backward(np.ones_like(p), cache)).all()

    targets = np.zeros(len(logits), dtype=np.int64)
    loss, ce_cache = cross_entropy_forward(logits, targets)
    expected = torch.nn.functional.cross_entropy(torch.tensor(EXTREME_ROWS), torch.tensor(targets)).item()
    assert np.isfinite(loss) and expected > 3000  # the last row alone costs 2e4 nats
    assert abs(float(loss) - expected) <= (1e-6 if dtype == np.float32 else 1e-12) * expected
    dlogits = cross_entropy_backward(1.0, ce_cache)
    assert np.isfinite(dlogits).all()
    np.testing.assert_allclose(dlogits, (reference - np.eye(4)[targets]) / len(logits), atol=1e-7)


def extreme_model(dtype: str) -> tp.GPT:
    """A model whose logits reach +-1e4 and whose attention scores are in the thousands: the final
    LayerNorm scaled by 3000, the query/key projections by 30."""
    cfg = tp.GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, dtype=dtype)
    model = tp.GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    model.params["transformer.wte.weight"] = rng.choice([-1.0, 1.0], size=(16, 8)).astype(dtype)
    model.params["transformer.ln_f.weight"] = np.full(8, 3000.0, dtype=dtype)
    for i in range(cfg.n_layer):
        w = model.params[f"transformer.h.{i}.attn.c_attn.weight"]
        w[:, : 2 * 8] *= 30 / 0.02  # q and k columns: entries of about 30
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_whole_model_finite_at_logits_of_1e4(dtype):
    model = extreme_model(dtype)
    ids = np.random.default_rng(1).integers(0, 16, size=(2, 8))
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no inf or NaN even in between
        logits = model(ids)
        loss, grads = model.loss_and_grad(ids, ids)
    assert np.abs(logits).max() >= 1e4
    assert np.isfinite(logits).all() and np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in grads.values())
    shifted = torch.tensor(logits[:, :-1].astype(np.float64)).reshape(-1, 16)
    expected = torch.nn.functional.cross_entropy(shifted, torch.tensor(ids[:, 1:]).reshape(-1)).item()
    assert abs(loss - expected) <= (1e-5 if dtype == "float32" else 1e-12) * expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [0.0, 7.0, -3e6, 1e4])
def test_layernorm_of_a_constant_row(dtype, value):
    """Variance 0: rstd = 1/sqrt(eps), xhat = 0, y = bias, and every gradient finite; in float64 the
    hand gradient equals autograd's."""
    rng = np.random.default_rng(0)
    x = np.full((2, 3, 8), value, dtype=dtype)
    w, b = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, cache = layernorm_forward(x, w, b)
    dx, dw, db = layernorm_backward(dy, cache)
    assert all(np.isfinite(a).all() for a in (y, dx, dw, db))
    np.testing.assert_allclose(y, np.broadcast_to(b, y.shape), atol=1e-6 if dtype == np.float32 else 0)
    if dtype == np.float64:
        auto = grad(lambda x: (layernorm_forward(x, w, b)[0] * dy).sum())(x)
        np.testing.assert_allclose(dx, auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_with_constant_layernorm_inputs_has_finite_gradients(dtype):
    """Token 0's embedding constant and positions zero: ln_1 of the first block sees constant rows."""
    cfg = tp.GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, dtype=dtype)
    model = tp.GPT(cfg, seed=0)
    model.params["transformer.wte.weight"][0] = 5.0
    model.params["transformer.wpe.weight"][...] = 0.0
    ids = np.zeros((2, 6), dtype=np.int64)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grads = model.loss_and_grad(ids, ids)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    assert np.abs(grads["transformer.wte.weight"][0]).sum() > 0  # the gradient does reach through ln_1


def test_sampling_at_a_tiny_temperature_is_greedy():
    """logits / 1e-300 overflows; shifting by the maximum first keeps the distribution a one-hot."""
    model = tp.GPT(tp.GPTConfig(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2), seed=0)
    ids = np.random.default_rng(0).integers(0, 16, size=(3, 4))
    greedy = model.generate(ids, 6)
    with np.errstate(over="raise", invalid="raise"):
        np.testing.assert_array_equal(model.generate(ids, 6, temperature=1e-300), greedy)
