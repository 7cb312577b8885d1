"""LoKr on its own (the comparisons with PEFT are in tests/hf/test_lycoris_peft.py).

- The shared harness over hypothesis-drawn models, batches, ranks (small: low-rank factors; large: full
  ones), scales, targets, decompose_both and decompose_factor: hand gradient == autograd (<= 1e-10
  relative) == a central difference (<= 1e-6), the engine == the reference, merged == unmerged
  (<= 1e-12), unmerge exact; in training mode with rank and module dropout, the gradient checks.
- `factorization` is PEFT's; the Kronecker pair on its own over odd shapes; the factors' gradients are
  what the effective weight's gradient implies; the checks catch a backward off by 0.1%.
- Which factors are low-rank follows PEFT's rule; the inits (True, "lycoris", False) are PEFT's, True the
  base model bit for bit; rank dropout rescales only with rank_dropout_scale; files round-trip.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from additive_utils import assert_checks_catch, assert_gradients_check, assert_only_adapter_changes
from autograd import grad
from hypothesis import given, settings
from hypothesis import strategies as st
from lycoris_strategies import lokr_configs, perturb_adapter
from strategies import cases, gpt_configs, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import relative_error
from tinypeft.harness import Batch, HarnessCase, check_case
from tinypeft.methods import lokr as lokr_module
from tinypeft.methods.lokr import factorization, kron, lokr_delta_backward, lokr_delta_forward

PREFIX = "base_model.model.transformer.h.0."


def small(dtype="float64", **kw):
    cfg = dict(vocab_size=37, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype=dtype) | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


def random_lokr(base, seed=0, **config):
    config = {"r": 1, "alpha": 2, "target_modules": ["c_attn", "c_proj", "c_fc"], "init_weights": False} | config
    model = tp.get_peft_model(base, tp.LoKrConfig(**config), seed=seed)
    perturb_adapter(model, seed)
    return model


def shapes_of(model, module="attn.c_attn"):
    prefix = PREFIX + module + "."
    return {k.removeprefix(prefix): v.shape for k, v in model.active.params.items() if k.startswith(prefix)}


# ------------------------------------------------------------------ gradients, engine, merge
@settings(max_examples=30)
@given(
    cfg=gpt_configs(max_layers=2, min_embd=3),
    B=st.integers(1, 3),
    T=st.integers(2, 9),
    padding=st.sampled_from(["none", "mixed", "ends"]),
    seed=st.integers(0, 2**16),
    config=lokr_configs(),
)
def test_the_harness_passes_over_drawn_configs(cfg, B, T, padding, seed, config):
    report = check_case(lambda _: config, HarnessCase("drawn", cfg, Batch(B, T, padding), seed))
    assert not report.failures, report.failures
    assert report.merge is not None and report.merge <= 1e-12


@pytest.mark.filterwarnings("ignore:Output seems independent of input")  # every target skipped by module dropout
@settings(max_examples=15)
@given(cases(min_len=2, min_embd=3), lokr_configs(dropout=True))
def test_gradients_in_training_mode_with_dropout(case, config):
    model = tp.get_peft_model(case.model, config, seed=case.seed).train()
    perturb_adapter(model, case.seed)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


@settings(max_examples=25)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**16))
def test_the_kronecker_pair_is_the_chain_rule(a, c, b, d, seed):
    """kron is numpy's; dΔ -> (dW1, dW2) equals autograd's gradient of <Δ, G> for a random G."""
    rng = np.random.default_rng(seed)
    w1, w2, G = rng.standard_normal((a, c)), rng.standard_normal((b, d)), rng.standard_normal((a * b, c * d))
    np.testing.assert_array_equal(kron(w1, w2), np.kron(w1, w2))
    _, cache = lokr_delta_forward(w1, w2, 0.7)
    dw1, dw2 = lokr_delta_backward(G, cache)
    assert relative_error(dw1, grad(lambda w: (lokr_delta_forward(w, w2, 0.7)[0] * G).sum())(w1)) <= 1e-13
    assert relative_error(dw2, grad(lambda w: (lokr_delta_forward(w1, w, 0.7)[0] * G).sum())(w2)) <= 1e-13


def test_factor_gradients_are_what_the_effective_weight_gradient_implies():
    """With dΔ = dWᵀ (dW the merged model's weight gradient) cut into (b, d) blocks G_ij:
    dW1[i, j] = s <G_ij, W2> and dW2 = s Σ_ij W1[i, j] G_ij, then dA = dW Bᵀ, dB = Aᵀ dW for a product."""
    base = small()
    model = random_lokr(base, decompose_both=True)
    ids = np.random.default_rng(1).integers(0, 37, size=(2, 9))
    _, grads = model.loss_and_grad(ids, ids)
    _, full = model.merge_and_unload().loss_and_grad(ids, ids)
    s, p = model.active.config.scaling, model.active.params
    for layer in model.active.layers:
        t = layer.tensors
        w1a, w1b, w2a, w2b = (p[t[k]] for k in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"))
        w1, w2 = w1a @ w1b, w2a @ w2b
        (a, c), (b, d) = w1.shape, w2.shape
        dD = full[layer.weight].T
        blocks = [[dD[i * b : (i + 1) * b, j * d : (j + 1) * d] for j in range(c)] for i in range(a)]
        dw1 = s * np.array([[np.sum(blocks[i][j] * w2) for j in range(c)] for i in range(a)])
        dw2 = s * sum(w1[i, j] * blocks[i][j] for i in range(a) for j in range(c))
        expected = {"lokr_w1_a": dw1 @ w1b.T, "lokr_w1_b": w1a.T @ dw1}
        expected |= {"lokr_w2_a": dw2 @ w2b.T, "lokr_w2_b": w2a.T @ dw2}
        for suffix, value in expected.items():
            assert relative_error(grads[t[suffix]], value) <= 1e-12, (layer.module, suffix)


@pytest.mark.parametrize("config", [{}, {"decompose_both": True}, {"r": 8}])  # W2 low-rank, both, neither
def test_checks_catch_a_wrong_kronecker_backward(monkeypatch, config):
    model = random_lokr(small(), **config)
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 6))
    assert_checks_catch(monkeypatch, lokr_module, "lokr_delta_backward", model, ids, ids)


# ------------------------------------------------------------------ factorization and shapes
def test_factorization_examples_from_peft_s_docstring():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(128, 64) == (64, 2)  # a dividing factor comes first, even when larger
    assert factorization(9, 2) == (1, 9)  # 2 does not divide 9, and no divisor of 9 is <= 2 but 1


@settings(max_examples=300)
@given(st.integers(1, 5000), st.sampled_from([-1, 1, 2, 3, 4, 5, 7, 8, 16, 64, 1000]))
def test_factorization_is_the_largest_divisor_up_to_the_square_root(dimension, factor):
    """What docs/lokr.md says PEFT's walk computes: a factor f > 0 that divides the size gives (f, dim / f);
    otherwise m is the largest divisor of dim with m <= √dim (and m <= f for a factor f > 0)."""
    m, n = factorization(dimension, factor)
    assert m * n == dimension
    if factor > 0 and dimension % factor == 0:
        assert (m, n) == (factor, dimension // factor)
    else:
        limit = math.isqrt(dimension) if factor == -1 else min(math.isqrt(dimension), factor)
        assert m == max(k for k in range(1, limit + 1) if dimension % k == 0)


def test_which_factors_are_low_rank_follows_peft_s_rule():
    """c_attn of n_embd 12: in 12 = 3·4, out 36 = 6·6, W1 (6, 3), W2 (6, 4). W2 is low-rank when
    r < max(6, 4) / 2 = 3; W1 when decompose_both and r < max(6, 3) / 2 = 3."""
    base = small()
    assert shapes_of(tp.get_peft_model(base, tp.LoKrConfig(r=2))) == {
        "lokr_w1": (6, 3), "lokr_w2_a": (6, 2), "lokr_w2_b": (2, 4)}  # fmt: skip
    assert shapes_of(tp.get_peft_model(base, tp.LoKrConfig(r=3))) == {"lokr_w1": (6, 3), "lokr_w2": (6, 4)}
    assert shapes_of(tp.get_peft_model(base, tp.LoKrConfig(r=2, decompose_both=True))) == {
        "lokr_w1_a": (6, 2), "lokr_w1_b": (2, 3), "lokr_w2_a": (6, 2), "lokr_w2_b": (2, 4)}  # fmt: skip
    # decompose_factor 4: in 12 = 4·3, out 36 = 4·9
    assert shapes_of(tp.get_peft_model(base, tp.LoKrConfig(r=8, decompose_factor=4))) == {
        "lokr_w1": (4, 4), "lokr_w2": (9, 3)}  # fmt: skip


# ------------------------------------------------------------------ init
@pytest.mark.parametrize(("init", "zero"), [(True, "lokr_w1"), ("lycoris", "lokr_w2"), (False, None)])
def test_inits_are_peft_s(init, zero):
    base = small()
    ids = np.random.default_rng(1).integers(0, 37, size=(3, 9))
    model = tp.get_peft_model(base, tp.LoKrConfig(r=8, init_weights=init, target_modules=["c_attn", "c_fc"]))
    for name, value in model.active.params.items():
        if zero is not None and name.endswith(zero):
            assert not value.any(), name
        else:  # kaiming_uniform(a=√5): U(±1/√fan_in)
            bound = 1 / math.sqrt(value.shape[1])
            assert 0 < np.abs(value).max() <= bound, name
    if zero is None:
        assert relative_error(model(ids), base(ids)) > 1e-6
    else:
        np.testing.assert_array_equal(model(ids), base(ids))
    low_rank = tp.get_peft_model(base, tp.LoKrConfig(r=1, decompose_both=True, init_weights=init))
    zeros = {k.rsplit(".", 1)[-1] for k, v in low_rank.active.params.items() if not v.any()}
    assert zeros == {True: {"lokr_w1_a"}, "lycoris": {"lokr_w2_b"}, False: set()}[init]


def test_the_config_s_fields_and_defaults_are_peft_s():
    config = tp.LoKrConfig()
    assert (config.r, config.alpha, config.decompose_both, config.decompose_factor) == (8, 8, False, -1)
    assert config.target_modules == ["c_attn"] and config.rank_dropout_scale is False
    d = config.to_dict()
    assert d["peft_type"] == "LOKR"
    assert tp.PeftConfig.from_dict(d) == config
    assert tp.LoKrConfig(init_weights="lycoris").init_weights == "lycoris"


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout_rescales_only_when_asked(rescale):
    model = random_lokr(small(n_layer=1), rank_dropout=0.5, rank_dropout_scale=rescale, target_modules=["c_attn"])
    site = model.train().view().sites.linear["transformer.h.0.attn.c_attn"]
    _, rows = site.uniforms("transformer.h.0.attn.c_attn")
    _, keep = site.draw("transformer.h.0.attn.c_attn")
    kept = (rows > 0.5).astype(float)
    np.testing.assert_array_equal(keep, kept / kept.mean() if rescale else kept)


# ------------------------------------------------------------------ merge, files, training
def test_merge_adds_the_transposed_kronecker_product_and_unmerge_restores_exactly():
    base = small()
    originals = {k: v.copy() for k, v in base.params.items()}
    model = random_lokr(base, r=8)  # full W1 and W2
    ids = np.random.default_rng(2).integers(0, 37, size=(2, 10))
    unmerged = model(ids)
    merged = model.merge_and_unload()
    adapter = model.active
    for layer in adapter.layers:
        w1, w2 = (adapter.params[layer.tensors[k]] for k in ("lokr_w1", "lokr_w2"))
        delta = adapter.config.scaling * np.kron(w1, w2)  # (out, in): PEFT's Linear layout
        np.testing.assert_allclose(merged.params[layer.weight], base.params[layer.weight] + delta.T, rtol=1e-15)
    assert relative_error(merged(ids), unmerged) <= 1e-12
    model.merge_adapter()
    model.unmerge_adapter()
    for k, v in originals.items():
        np.testing.assert_array_equal(base.params[k], v, err_msg=k)
    np.testing.assert_array_equal(model(ids), unmerged)


def test_save_and_load_round_trip(tmp_path):
    model = random_lokr(small(), decompose_both=True, decompose_factor=3, init_weights="lycoris")
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(small(), tmp_path)
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
    saved = loaded.peft_config["default"].to_dict()
    assert saved["peft_type"] == "LOKR" and saved["decompose_factor"] == 3 and saved["init_weights"] == "lycoris"


def test_only_the_factors_train():
    model = tp.get_peft_model(small(), tp.LoKrConfig(r=1, decompose_both=True, target_modules=["c_attn", "c_fc"]))
    assert_only_adapter_changes(model, vocab_size=37)


def test_estimated_parameters_are_exact():
    base = small()
    for config in (tp.LoKrConfig(), tp.LoKrConfig(r=1, decompose_both=True, target_modules=["c_proj", "c_fc"])):
        model = tp.get_peft_model(base, config)
        assert config.estimated_parameters(base) == sum(v.size for v in model.trainable_parameters().values())
