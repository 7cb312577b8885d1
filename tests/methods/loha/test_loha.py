"""LoHa on its own (the comparisons with PEFT are in tests/hf/test_lycoris_peft.py).

- The shared harness over hypothesis-drawn models, batches (padding at the right, the left, both ends;
  B up to 3), ranks (r up to 5, above some layers' sizes), scales, target lists and regexes: hand
  gradient == autograd (<= 1e-10 relative) == a fourth-order central difference (<= 1e-6), the engine ==
  the reference, merged == unmerged (<= 1e-12), unmerge exact. In training mode, with rank and module
  dropout, the same gradient checks.
- The pair `loha_delta_forward`/`loha_delta_backward` on its own over odd shapes, and the factors'
  gradients are what the effective weight's gradient implies; the checks catch a backward off by 0.1%.
- The default init is the base model bit for bit, with PEFT's kaiming bounds; dropout follows PEFT's
  rules (one coin and one row mask per layer and forward, kept rows divided by their mean); files
  round-trip; only the factors train.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from additive_utils import assert_checks_catch, assert_gradients_check, assert_only_adapter_changes
from autograd import grad
from hypothesis import given, settings
from hypothesis import strategies as st
from lycoris_strategies import loha_configs, perturb_adapter
from strategies import cases, gpt_configs, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import relative_error
from tinypeft.harness import Batch, HarnessCase, check_case
from tinypeft.methods import loha as loha_module
from tinypeft.methods.loha import loha_delta_backward, loha_delta_forward

PREFIX = "base_model.model.transformer.h.0.attn.c_attn."


def small(dtype="float64", **kw):
    cfg = dict(vocab_size=37, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype=dtype) | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


def random_loha(base, seed=0, **config):
    config = {"r": 3, "alpha": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "init_weights": False} | config
    model = tp.get_peft_model(base, tp.LoHaConfig(**config), seed=seed)
    perturb_adapter(model, seed)
    return model


# ------------------------------------------------------------------ gradients, engine, merge
@settings(max_examples=30)
@given(
    cfg=gpt_configs(max_layers=2, min_embd=3),
    B=st.integers(1, 3),
    T=st.integers(2, 9),
    padding=st.sampled_from(["none", "mixed", "ends"]),
    seed=st.integers(0, 2**16),
    config=loha_configs(),
)
def test_the_harness_passes_over_drawn_configs(cfg, B, T, padding, seed, config):
    report = check_case(lambda _: config, HarnessCase("drawn", cfg, Batch(B, T, padding), seed))
    assert not report.failures, report.failures
    assert report.merge is not None and report.merge <= 1e-12


@pytest.mark.filterwarnings("ignore:Output seems independent of input")  # every target skipped by module dropout
@settings(max_examples=15)
@given(cases(min_len=2, min_embd=3), loha_configs(dropout=True))
def test_gradients_in_training_mode_with_dropout(case, config):
    model = tp.get_peft_model(case.model, config, seed=case.seed).train()
    perturb_adapter(model, case.seed)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


@settings(max_examples=25)
@given(st.integers(1, 11), st.integers(1, 11), st.integers(1, 6), st.floats(0.1, 4.0), st.integers(0, 2**16))
def test_the_delta_pair_is_the_chain_rule(n_out, n_in, r, scale, seed):
    """dΔ -> (dW1a, dW1b, dW2a, dW2b) equals autograd's gradient of <Δ, G> for a random G, at odd shapes."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal(s) for s in ((n_out, r), (r, n_in), (n_out, r), (r, n_in))]
    G = rng.standard_normal((n_out, n_in))
    delta, cache = loha_delta_forward(*factors, scale)
    np.testing.assert_allclose(delta, scale * (factors[0] @ factors[1]) * (factors[2] @ factors[3]), rtol=1e-14)
    hand = loha_delta_backward(G, cache)
    for i, g in enumerate(hand):

        def inner(f, i=i):
            args = [*factors[:i], f, *factors[i + 1 :]]
            return (loha_delta_forward(*args, scale)[0] * G).sum()

        assert relative_error(g, grad(inner)(factors[i])) <= 1e-13, i


def test_factor_gradients_are_what_the_effective_weight_gradient_implies():
    """With W_eff = W + Δᵀ and dW the gradient a full fine-tune of the merged model gives W_eff, dΔ = dWᵀ,
    so dW1a = s (dWᵀ ⊙ P2) W1bᵀ, dW1b = s W1aᵀ (dWᵀ ⊙ P2), and the same for the second product."""
    base = small()
    model = random_loha(base)
    ids = np.random.default_rng(1).integers(0, 37, size=(2, 9))
    _, grads = model.loss_and_grad(ids, ids)
    _, full = model.merge_and_unload().loss_and_grad(ids, ids)
    s = model.active.config.scaling
    for layer in model.active.layers:
        w1a, w1b, w2a, w2b = (model.active.params[layer.tensors[k]] for k in loha_module.TENSORS)
        dD = full[layer.weight].T
        dP1, dP2 = s * dD * (w2a @ w2b), s * dD * (w1a @ w1b)
        expected = {
            "hada_w1_a": dP1 @ w1b.T,
            "hada_w1_b": w1a.T @ dP1,
            "hada_w2_a": dP2 @ w2b.T,
            "hada_w2_b": w2a.T @ dP2,
        }
        for suffix, value in expected.items():
            assert relative_error(grads[layer.tensors[suffix]], value) <= 1e-12, (layer.module, suffix)


def test_checks_catch_a_wrong_delta_backward(monkeypatch):
    model = random_loha(small())
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 6))
    assert_checks_catch(monkeypatch, loha_module, "loha_delta_backward", model, ids, ids)


# ------------------------------------------------------------------ init
def test_default_init_is_the_base_model_bit_for_bit_with_peft_s_bounds():
    base = small()
    ids = np.random.default_rng(1).integers(0, 37, size=(3, 9))
    model = tp.get_peft_model(base, tp.LoHaConfig(r=4, target_modules=["c_attn", "mlp.c_proj"]))
    np.testing.assert_array_equal(model(ids), base(ids))
    params = model.active.params
    shapes = {k.removeprefix(PREFIX): v.shape for k, v in params.items() if k.startswith(PREFIX)}
    assert shapes == {"hada_w1_a": (36, 4), "hada_w1_b": (4, 12), "hada_w2_a": (36, 4), "hada_w2_b": (4, 12)}
    for name, value in params.items():
        if name.endswith("hada_w2_b"):
            assert not value.any()
        else:  # kaiming_uniform(a=√5): U(±1/√fan_in), fan_in the second dimension
            bound = 1 / math.sqrt(value.shape[1])
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.5 * bound, name
    random = tp.get_peft_model(base, tp.LoHaConfig(r=4, init_weights=False))
    assert all(v.any() for v in random.active.params.values())
    assert relative_error(random(ids), base(ids)) > 1e-6


def test_the_config_s_fields_and_defaults_are_peft_s():
    config = tp.LoHaConfig()
    assert (config.r, config.alpha, config.scaling, config.target_modules) == (8, 8, 1.0, ["c_attn"])
    d = config.to_dict()
    assert d["peft_type"] == "LOHA" and "fan_in_fan_out" not in d
    assert tp.PeftConfig.from_dict(d) == config
    assert tp.LoHaConfig(target_modules={"c_fc", "c_attn"}).target_modules == ["c_attn", "c_fc"]


# ------------------------------------------------------------------ dropout
def test_eval_mode_draws_nothing_and_training_mode_draws_per_forward():
    base = small()
    model = random_loha(base, rank_dropout=0.5, module_dropout=0.3)
    ids = np.random.default_rng(2).integers(0, 37, size=(2, 7))
    np.testing.assert_array_equal(model(ids), model(ids))  # eval: deterministic, no dropout
    model.train()
    view = model.view()
    site = view.sites.linear["transformer.h.0.attn.c_attn"]
    assert not view.sites.stochastic  # one draw per layer, not per row: row blocks of a batch share it
    first = [site.draw(layer.module) for layer in model.active.layers]
    again = [site.draw(layer.module) for layer in model.active.layers]
    for (a1, k1), (a2, k2) in zip(first, again, strict=True):
        assert a1 == a2 and np.array_equal(k1, k2)
    other = model.view().sites.linear["transformer.h.0.attn.c_attn"]
    assert any(
        not np.array_equal(k, other.draw(layer.module)[1])
        for (_, k), layer in zip(first, model.active.layers, strict=True)
    )


def test_rank_dropout_keeps_rows_and_divides_by_their_mean_and_module_dropout_skips():
    base = small(n_layer=1)
    model = random_loha(base, rank_dropout=0.5, module_dropout=0.5, target_modules=["c_attn"]).train()
    module = "transformer.h.0.attn.c_attn"
    x = np.random.default_rng(3).standard_normal((2, 4, 12))
    W, b = base.params[module + ".weight"], base.params[module + ".bias"]
    adapter = model.active
    layer = adapter.layers[0]
    delta = adapter.delta_t_forward(adapter.params, layer)[0].T  # (out, in)
    seen = set()
    for _ in range(20):
        view = model.view()
        site = view.sites.linear[module]
        coin, rows = site.uniforms(module)
        applied, keep = site.draw(module)
        assert applied == (coin > 0.5)
        kept = (rows > 0.5).astype(float)
        np.testing.assert_array_equal(keep, kept / kept.mean())
        y, _ = site.forward(view.params, module, x)
        expected = x @ (W + (delta * keep[:, None]).T) + b if applied else x @ W + b
        assert relative_error(y, expected) <= 1e-14
        seen.add(applied)
    assert seen == {True, False}


def test_rank_dropout_that_drops_every_row_gives_zero_not_nan(monkeypatch):
    model = random_loha(small(n_layer=1), rank_dropout=0.5, target_modules=["c_attn"]).train()
    site = model.view().sites.linear["transformer.h.0.attn.c_attn"]
    monkeypatch.setattr(site, "uniforms", lambda module: (1.0, np.zeros(36)))
    applied, keep = site.draw("transformer.h.0.attn.c_attn")
    assert applied and not keep.any() and np.isfinite(keep).all()


# ------------------------------------------------------------------ merge, files, training
def test_merge_adds_the_transposed_delta_and_unmerge_restores_exactly():
    base = small()
    originals = {k: v.copy() for k, v in base.params.items()}
    model = random_loha(base)
    ids = np.random.default_rng(2).integers(0, 37, size=(2, 10))
    unmerged = model(ids)
    merged = model.merge_and_unload()
    adapter = model.active
    for layer in adapter.layers:
        p = adapter.params
        w1a, w1b, w2a, w2b = (p[layer.tensors[k]] for k in loha_module.TENSORS)
        delta = adapter.config.scaling * (w1a @ w1b) * (w2a @ w2b)  # (out, in): PEFT's Linear layout
        np.testing.assert_allclose(merged.params[layer.weight], base.params[layer.weight] + delta.T, rtol=1e-15)
    assert relative_error(merged(ids), unmerged) <= 1e-12
    model.merge_adapter()
    model.unmerge_adapter()
    for k, v in originals.items():
        np.testing.assert_array_equal(base.params[k], v, err_msg=k)
    np.testing.assert_array_equal(model(ids), unmerged)


def test_safe_merge_refuses_non_finite_factors():
    base = small()
    model = random_loha(base)
    model.active.params[PREFIX + "hada_w1_a"][0, 0] = np.inf
    with np.errstate(invalid="ignore"), pytest.raises(tp.MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)


def test_save_and_load_round_trip(tmp_path):
    model = random_loha(small(), rank_dropout=0.1, alpha=5)
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(small(), tmp_path)
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
    saved = loaded.peft_config["default"].to_dict()
    assert saved["peft_type"] == "LOHA" and saved["alpha"] == 5 and saved["rank_dropout"] == 0.1


def test_only_the_factors_train():
    model = tp.get_peft_model(small(), tp.LoHaConfig(r=2, target_modules=["c_attn", "mlp.c_proj"]))
    assert_only_adapter_changes(model, vocab_size=37)


def test_a_rank_too_large_for_the_memory_is_refused_at_once(monkeypatch):
    """LoHa's rank has no upper bound (the Hadamard product reaches rank r²), so a huge r is the memory
    check's to refuse, before anything is allocated."""
    from tinypeft import memory

    monkeypatch.setattr(memory, "available_bytes", lambda xp=None: 16 * memory.GiB)
    with pytest.raises(tp.ConfigError, match=r"LoHaConfig's adapter needs about .* 16.0 GiB available"):
        tp.get_peft_model(small(), tp.LoHaConfig(r=10**12))


def test_estimated_parameters_are_exact():
    base = small()
    for config in (tp.LoHaConfig(), tp.LoHaConfig(r=5, target_modules=["c_proj", "c_fc"])):
        model = tp.get_peft_model(base, config)
        assert config.estimated_parameters(base) == sum(v.size for v in model.trainable_parameters().values())
