"""Optimizers, clipping and the schedule against PyTorch in float64 (same update order, so they agree
to rounding: <= 1e-14 relative after several steps)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from tinypeft.errors import ConfigError
from tinypeft.gradcheck import relative_error
from tinypeft.optim import SGD, AdamW, clip_grad_norm, cosine_schedule


def run_both(ours, make_torch, steps=6, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    # torch applies weight decay to what it is given; ours decays matrices only, so split groups
    topt = make_torch([{"params": [tparams["w"]]}, {"params": [tparams["b"]], "weight_decay": 0.0}])
    for step in range(steps):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        lr = 0.01 * (step + 1)
        ours.step(params, grads, lr)
        for g in topt.param_groups:
            g["lr"] = lr
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        topt.step()
    for k in params:
        assert relative_error(params[k], tparams[k].detach().numpy()) <= 1e-14, k


def test_adamw_matches_torch():
    run_both(
        AdamW(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        lambda g: torch.optim.AdamW(g, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    )


def test_sgd_with_momentum_matches_torch():
    run_both(
        SGD(lr=0.01, momentum=0.9, weight_decay=0.05),
        lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.9, weight_decay=0.05),
    )


def test_adamw_in_place_is_the_formula_term_by_term_bitwise():
    """The update goes through one scratch array; each term must be the number the docstring's
    formula gives when every term is a new array (float32, so any reordering would show)."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((6, 5)).astype(np.float32)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    opt = AdamW(lr=0.03, betas=(0.85, 0.99), eps=1e-6, weight_decay=0.1)
    params = {"w": p0.copy()}
    for t in range(1, 4):
        g = rng.standard_normal(p0.shape).astype(np.float32)
        opt.step(params, {"w": g}, 0.03)
        p = p * (1 - 0.03 * 0.1)
        m = 0.85 * m + (1 - 0.85) * g
        v = 0.99 * v + (1 - 0.99) * (g * g)
        denom = np.sqrt(v) / math.sqrt(1 - 0.99**t) + 1e-6
        p = p - (0.03 / (1 - 0.85**t)) * (m / denom)
        np.testing.assert_array_equal(params["w"], p)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_split_across_threads_is_bitwise_the_whole_update(monkeypatch, dtype):
    """AdamW on several threads updates slices of each large tensor: the same numbers, bitwise, as one
    thread, weight decay included (decided by the tensor, never by its flat slice), for tensors whose
    size does not divide evenly, small ones and a strided gradient (left whole)."""
    from tinypeft import optim

    monkeypatch.setattr(optim, "PARALLEL_UPDATE_SIZE", 1)
    monkeypatch.setattr(optim, "SPLIT_TENSOR_SIZE", 8)
    rng = np.random.default_rng(5)
    shapes = {"w": (7, 9), "v": (13, 5), "bias": (11,), "tiny": (2, 3), "strided": (6, 4)}
    start = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    steps = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()} for _ in range(3)]
    for grads in steps:
        grads["strided"] = np.asfortranarray(grads["strided"])
    results = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("TINYPEFT_THREADS", threads)
        params, opt = {k: v.copy() for k, v in start.items()}, AdamW(lr=0.05, weight_decay=0.1)
        for grads in steps:
            opt.step(params, grads)
        results[threads] = params, opt.state_dict()
    (one, state_one), (split, state_split) = results["1"], results["3"]
    for k in shapes:
        np.testing.assert_array_equal(split[k], one[k])
        assert not np.array_equal(one[k], start[k])
    assert state_one.keys() == state_split.keys()
    for k in state_one:
        np.testing.assert_array_equal(state_split[k], state_one[k])
    decayed = AdamW(lr=0.05, weight_decay=0.0)  # without decay the matrices come out otherwise: decay was applied
    params = {k: v.copy() for k, v in start.items()}
    for grads in steps:
        decayed.step(params, grads)
    assert not np.array_equal(params["w"], one["w"])
    np.testing.assert_array_equal(params["bias"], one["bias"])


def test_optimizer_state_round_trip():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2))}
    a = AdamW(lr=0.1)
    for _ in range(3):
        a.step(params, {"w": rng.standard_normal((3, 2))})
    b = AdamW(lr=0.1)
    b.load_state_dict(a.state_dict(), params)
    g = rng.standard_normal((3, 2))
    pa, pb = {"w": params["w"].copy()}, {"w": params["w"].copy()}
    a.step(pa, {"w": g})
    b.step(pb, {"w": g})
    np.testing.assert_array_equal(pa["w"], pb["w"])


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(1)
    grads = {"a": rng.standard_normal((5, 4)), "b": rng.standard_normal(7)}
    clipped, norm = clip_grad_norm(grads, 0.5)
    tensors = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = torch.tensor(g.copy())
    tnorm = torch.nn.utils.clip_grad_norm_(tensors, 0.5)
    assert abs(norm - tnorm.item()) <= 1e-14 * norm
    for t, g in zip(tensors, clipped.values(), strict=True):
        assert relative_error(g, t.grad.numpy()) <= 1e-14
    unclipped, _ = clip_grad_norm(grads, 1e9)
    for k in grads:
        np.testing.assert_array_equal(unclipped[k], grads[k])


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [cosine_schedule(s, 100, 1.0, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert cosine_schedule(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert cosine_schedule(55, 100, 1.0, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize(
    "make",
    [lambda: AdamW(lr=-1), lambda: AdamW(betas=(1.0, 0.9)), lambda: AdamW(eps=0), lambda: SGD(momentum=1.5)],
)
def test_bad_settings_are_refused(make):
    with pytest.raises(ConfigError):
        make()
