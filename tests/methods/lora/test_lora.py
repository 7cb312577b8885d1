"""LoRA, rsLoRA, DoRA and PiSSA on their own (the comparisons with PEFT are in test_lora_peft.py).

- Gradients three ways over random models and random LoRA configs, always with B != 0 (with B = 0, dA is
  identically zero and a check proves nothing): hand-written == autograd of the shipped forward
  (<= 1e-10 relative) and == a fourth-order finite difference along random directions (<= 1e-6). DoRA's
  gradient treats the weight norm as a constant, so it is not the derivative of the loss: it is checked
  against autograd of the forward, whose norm is computed from stopped inputs, and against finite
  differences of a forward whose norms are held at their current values.
- dA and dB are what the effective weight's gradient implies; the default init is the identity exactly;
  merged == unmerged; unmerge restores; merge/unmerge twice warn; disable_adapter is the base; safe_merge
  refuses non-finite weights; training moves only adapter tensors; several adapters; files round-trip;
  bad configs are clear errors; dropout masks are fixed within a step and absent in eval mode.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_strategies import held_norm_view, lora_cases, lora_model, perturb_adapter, well_conditioned_cases
from strategies import perturbed_model

import tinypeft as tp
import tinypeft.methods.lora as lora_module
from tinypeft import engine
from tinypeft.gradcheck import (
    check_gradients,
    directional_check,
    model_loss_fn,
    per_tensor_directional_check,
    relative_error,
)
from tinypeft.optim import AdamW

AUTOGRAD_TOL = 1e-10
DIRECTIONAL_TOL = 1e-6


def small_model(dtype: str = "float64", seed: int = 0, **kw) -> tp.GPT:
    cfg = dict(vocab_size=29, n_positions=16, n_embd=8, n_layer=2, n_head=2, dtype=dtype) | kw
    return perturbed_model(tp.GPTConfig(**cfg), seed)


def batch(vocab_size: int = 29, shape=(2, 9), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape)


def adapter_with(base: tp.GPT, seed: int = 0, **config) -> tp.PeftModel:
    """A PeftModel whose adapter is not the identity (B != 0 and every tensor perturbed)."""
    config = {"r": 3, "lora_alpha": 6, "target_modules": ["c_attn", "c_proj"], "init_lora_weights": False} | config
    model = tp.get_peft_model(base, tp.LoraConfig(**config), seed=seed)
    perturb_adapter(model, seed)
    return model


def max_error(report, column):
    return max(errors[column] for errors in report.values())


# ------------------------------------------------------------------ gradients
@given(lora_cases(case_kwargs={"min_len": 2}))
def test_gradients_three_ways(args):
    case, config = args
    model = lora_model(case, config, train=True)  # training mode: dropout masks on
    expected = set(model.trainable_parameters())
    assert {n for n in expected if "lora_B" in n}, "every config trains some B"
    report = check_gradients(model, case.ids, labels=case.labels, attention_mask=case.mask, seed=case.seed)
    assert set(report) - {"__all__"} == expected
    # hand == autograd of the shipped forward (DoRA's norm is stopped in that forward, as in PEFT)
    assert max_error(report, "autograd") <= AUTOGRAD_TOL, report
    if not config.use_dora:
        assert max_error(report, "directional") <= DIRECTIONAL_TOL, report
        return
    # DoRA: finite differences of the forward with its norms held at their current values
    view = model.view()
    held = held_norm_view(view)
    loss_fn, hand = model_loss_fn(held, case.ids, case.labels, case.mask)
    _, held_grads = hand()
    _, grads = model_loss_fn(view, case.ids, case.labels, case.mask)[1]()
    for name, g in grads.items():  # holding the norms changes no value, so no gradient either
        assert relative_error(held_grads[name], g) <= 1e-13, name
    rng = np.random.default_rng(case.seed)
    per_tensor = per_tensor_directional_check(loss_fn, held.params, held_grads, rng)
    assert max(per_tensor.values()) <= DIRECTIONAL_TOL, per_tensor
    assert directional_check(loss_fn, held.params, held_grads, rng)[0] <= DIRECTIONAL_TOL


@given(well_conditioned_cases(min_len=2), st.data())
def test_gradients_with_a_padding_mask_through_output_weights(case, data):
    """The functional sum(logits * R) reaches the last position too, and padding masks rows."""
    config = data.draw(st.sampled_from([{}, {"use_rslora": True}, {"bias": "all"}, {"target_modules": ["c_proj"]}]))
    config = {"target_modules": ["c_fc", "c_attn"], "r": 1} | config
    model = adapter_with(case.model, case.seed, **config)
    report = check_gradients(model, case.ids, attention_mask=case.mask, output_weights=case.output_weights)
    assert max_error(report, "autograd") <= AUTOGRAD_TOL, report
    assert max_error(report, "directional") <= DIRECTIONAL_TOL, report


@settings(max_examples=15)
@given(lora_cases(case_kwargs={"min_len": 2}, dora=False, dropout=False, biases=("none", "lora_only")))
def test_dA_and_dB_are_what_the_effective_weight_gradient_implies(args):
    """With W_eff = W + s (B A)ᵀ and dW the gradient a full fine-tune of the merged model gives W_eff:
    dA = s Bᵀ dWᵀ and dB = s dWᵀ Aᵀ; a trained bias gets the merged model's bias gradient."""
    case, config = args
    model = lora_model(case, config)
    _, grads = model.loss_and_grad(case.ids, case.labels, case.mask)
    merged = model.merge_and_unload()
    _, full = merged.loss_and_grad(case.ids, case.labels, case.mask)
    s = config.scaling
    for layer in model.active.layers:
        A, B, dW = model.active.params[layer.lora_A], model.active.params[layer.lora_B], full[layer.weight]
        assert relative_error(grads[layer.lora_A], s * B.T @ dW.T) <= 1e-12, layer.module
        assert relative_error(grads[layer.lora_B], s * dW.T @ A.T) <= 1e-12, layer.module
        if config.bias == "lora_only":
            assert relative_error(grads[layer.trained_bias], full[layer.bias]) <= 1e-12, layer.module


def test_the_detached_norm_gradient_is_not_the_loss_derivative():
    """Why DoRA needs the held-norm check: against finite differences of the real forward, the
    magnitude's gradient is exact (the norm does not depend on m) and A's and B's are not."""
    base = small_model()
    ids = batch()
    model = adapter_with(base, use_dora=True, target_modules=["c_attn"])
    report = check_gradients(model, ids, labels=ids)
    for name, errors in report.items():
        assert errors["autograd"] <= AUTOGRAD_TOL
        if name.endswith("lora_magnitude_vector"):
            assert errors["directional"] <= DIRECTIONAL_TOL, name
        elif name != "__all__":
            assert errors["directional"] > 1e-4, name


# the checks must be able to fail: scale one output of a LoRA/DoRA backward by 1.001
@pytest.mark.parametrize(
    ("rule", "index", "config"),
    [
        ("lora_backward", 0, {}),  # dx
        ("lora_backward", 1, {}),  # dA
        ("lora_backward", 2, {}),  # dB
        ("lora_backward", 3, {"bias": "lora_only"}),  # db
        ("dora_backward", 0, {"use_dora": True}),
        ("dora_backward", 1, {"use_dora": True}),
        ("dora_backward", 2, {"use_dora": True}),
        ("dora_backward", 3, {"use_dora": True}),  # dm
    ],
)
def test_checks_catch_a_small_error_in_the_lora_backward(monkeypatch, rule, index, config):
    base = small_model(n_layer=1)
    ids = batch()
    model = adapter_with(base, target_modules=["c_attn", "mlp.c_proj"], lora_dropout=0.3, **config).train()
    assert max_error(check_gradients(model, ids, labels=ids), "autograd") <= AUTOGRAD_TOL
    original = getattr(lora_module, rule)

    def broken(*args, **kwargs):
        out = list(original(*args, **kwargs))
        out[index] = None if out[index] is None else out[index] * 1.001
        return tuple(out)

    monkeypatch.setattr(lora_module, rule, broken)
    assert max_error(check_gradients(model, ids, labels=ids), "autograd") > 1e-5


def test_the_frozen_base_weight_gets_no_gradient_and_may_not_be_trained():
    base = small_model()
    ids = batch()
    model = adapter_with(base)
    _, grads = model.loss_and_grad(ids, ids)
    assert not any(name.endswith(".weight") and "lora_" not in name for name in grads)
    view = model.view()
    trainable = view.trainable | {"transformer.h.0.attn.c_attn.weight"}
    with pytest.raises(tp.ConfigError, match="frozen"):
        engine.loss_and_grad(dataclasses.replace(view, trainable=trainable), ids, ids)


# ------------------------------------------------------------------ init and identity
@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}, {"lora_dropout": 0.5}])
def test_the_default_init_is_exactly_the_identity(init, variant):
    base = small_model()
    ids = batch()
    model = tp.get_peft_model(base, tp.LoraConfig(target_modules=["c_proj"], init_lora_weights=init, r=4, **variant))
    B = [v for k, v in model.active.params.items() if "lora_B" in k]
    assert B and all(not b.any() for b in B)
    np.testing.assert_array_equal(model(ids), base(ids))
    model.train()  # dropout on the branch still multiplies by B = 0
    np.testing.assert_array_equal(model(ids), base(ids))


def test_init_distributions_are_peft_s():
    base = small_model(n_embd=64, n_head=4)
    for init, bound_A, bound_B in [(True, 1 / 8, 0.0), (False, 1 / 8, 1 / 4)]:
        model = tp.get_peft_model(base, tp.LoraConfig(r=16, init_lora_weights=init))
        A = model.active.params["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]  # (r, in)
        B = model.active.params["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]  # (out, r)
        assert A.shape == (16, 64) and B.shape == (192, 16)
        assert np.abs(A).max() <= bound_A and np.abs(A).max() > 0.9 * bound_A  # U(±1/√in)
        assert np.abs(B).max() <= bound_B and (bound_B == 0 or np.abs(B).max() > 0.9 * bound_B)  # 0 or U(±1/√r)
    model = tp.get_peft_model(base, tp.LoraConfig(r=16, init_lora_weights="gaussian"))
    A = model.active.params["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    assert abs(A.std() - 1 / 16) < 0.1 / 16  # N(0, std 1/r)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_splits_the_weight_into_its_top_r_part_and_a_residual(use_rslora):
    base = small_model(n_embd=12, n_head=3)
    before = {k: v.copy() for k, v in base.params.items()}
    config = tp.LoraConfig(r=4, lora_alpha=3, init_lora_weights="pissa", use_rslora=use_rslora)
    model = tp.get_peft_model(base, config)
    s = config.scaling
    for layer in model.active.layers:
        W = base.params[layer.weight]
        A, B = model.active.params[layer.lora_A], model.active.params[layer.lora_B]
        residual = model.active.residual_weights[layer.module]
        assert relative_error(residual + s * (B @ A).T, W) <= 1e-14
        U, S, Vh = np.linalg.svd(W)
        best_rank_4 = (U[:, :4] * S[:4]) @ Vh[:4]
        assert relative_error(s * (B @ A).T, best_rank_4) <= 1e-12
        # the residual keeps the rest of the spectrum
        assert relative_error(np.linalg.svd(residual, compute_uv=False)[: min(W.shape) - 4], S[4:]) <= 1e-12
    for name, value in base.params.items():  # the base GPT is untouched
        np.testing.assert_array_equal(value, before[name])
    ids = batch()
    assert relative_error(model(ids), base(ids)) <= 1e-12  # W_res + s B A = W up to rounding


# ------------------------------------------------------------------ merge
@settings(max_examples=15)
@given(lora_cases(inits=(False, "pissa"), dropout=False))
def test_merged_equals_unmerged_and_unmerge_restores(args):
    case, config = args
    model = lora_model(case, config)
    base = model.base_model
    originals = dict(base.params)
    unmerged = model(case.ids, case.mask)
    assert relative_error(unmerged, base(case.ids, case.mask)) > 1e-6  # the adapter does something
    model.merge_adapter()
    merged_params = dict(base.params)
    assert relative_error(model(case.ids, case.mask), unmerged) <= 1e-12
    merged = model.merge_and_unload()
    assert isinstance(merged, tp.GPT) and not isinstance(merged, tp.PeftModel)
    assert relative_error(merged(case.ids, case.mask), unmerged) <= 1e-12
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()  # a no-op, as in PEFT
    assert all(base.params[k] is merged_params[k] for k in merged_params)
    model.unmerge_adapter()
    assert all(base.params[k] is originals[k] for k in originals)  # the very arrays, bit for bit
    with pytest.warns(UserWarning, match="not merged"):
        model.unmerge_adapter()
    np.testing.assert_array_equal(model(case.ids, case.mask), unmerged)


@settings(max_examples=10)
@given(lora_cases(case_kwargs={"dtype": "float32", "min_len": 2}, inits=(False, "pissa"), dropout=False))
def test_merged_equals_unmerged_in_float32(args):
    case, config = args
    model = lora_model(case, config)
    unmerged = model(case.ids, case.mask)
    assert unmerged.dtype == np.float32
    _, grads = model.loss_and_grad(case.ids, case.labels, case.mask)
    assert all(g.dtype == np.float32 for g in grads.values())
    merged = model.merge_and_unload()
    assert all(v.dtype == np.float32 for v in merged.params.values())
    assert relative_error(merged(case.ids, case.mask), unmerged) <= 1e-5


@pytest.mark.parametrize("config", [{}, {"use_dora": True, "lora_dropout": 0.3}, {"init_lora_weights": "pissa"}])
def test_cached_generation_equals_the_merged_model_s(config):
    """Generation feeds one token at a time through the linear sites (eval mode: no dropout)."""
    base = small_model()
    model = adapter_with(base, **config).train()
    ids = batch(shape=(2, 4))
    assert not model.eval().training
    np.testing.assert_array_equal(model.generate(ids, 8), model.merge_and_unload().generate(ids, 8))


def test_merge_and_unload_leaves_the_peft_model_and_its_base_as_they_were():
    base = small_model()
    before = {k: v.copy() for k, v in base.params.items()}
    ids = batch()
    model = adapter_with(base, use_dora=True, bias="all")
    out = model(ids)
    merged = model.merge_and_unload()
    for name, value in base.params.items():
        np.testing.assert_array_equal(value, before[name])
    np.testing.assert_array_equal(model(ids), out)
    assert relative_error(merged(ids), out) <= 1e-12
    assert model.unload() is not base and all(model.unload().params[k] is v for k, v in base.params.items())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # DoRA's inf / inf, on purpose
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
def test_safe_merge_refuses_non_finite_weights(bad, variant):
    base = small_model()
    originals = dict(base.params)
    model = adapter_with(base, **variant)
    name = "base_model.model.transformer.h.1.attn.c_proj.lora_B.weight"
    model.active.params[name] = model.active.params[name].copy()
    model.active.params[name][0, 0] = bad
    with pytest.raises(tp.MergeError, match=r"safe_merge.*transformer\.h\.1\.attn\.c_proj\.weight"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(tp.MergeError):
        model.merge_and_unload(safe_merge=True)
    assert all(base.params[k] is originals[k] for k in originals)  # nothing changed
    model.merge_adapter()  # without safe_merge the merge goes ahead, as in PEFT
    assert not np.isfinite(base.params["transformer.h.1.attn.c_proj.weight"]).all()


# ------------------------------------------------------------------ the PeftModel around it
@pytest.mark.parametrize(
    "config", [{}, {"use_dora": True}, {"init_lora_weights": "pissa"}, {"bias": "all"}, {"bias": "lora_only"}]
)
def test_disable_adapter_gives_the_base_model(config):
    base = small_model()
    ids = batch()
    reference = base(ids)
    model = adapter_with(base, **config)
    assert relative_error(model(ids), reference) > 1e-6
    with model.disable_adapter():
        np.testing.assert_array_equal(model(ids), reference)
    assert relative_error(model(ids), reference) > 1e-6


@pytest.mark.parametrize(
    "config",
    [
        {"init_lora_weights": True, "lora_dropout": 0.2},
        {"use_dora": True, "bias": "all", "lora_dropout": 0.1},
        {"init_lora_weights": "pissa", "use_rslora": True, "bias": "lora_only"},
    ],
)
def test_training_changes_only_the_adapter(config):
    base = small_model()
    before = {k: v.copy() for k, v in base.params.items()}
    model = tp.get_peft_model(base, tp.LoraConfig(r=2, target_modules=["c_attn", "mlp.c_fc"], **config)).train()
    start = {k: v.copy() for k, v in model.trainable_parameters().items()}
    opt = AdamW(lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(3):  # B moves on step 1; A (whose gradient is 0 while B = 0) from step 2
        ids = rng.integers(0, 29, size=(2, 9))
        _, grads = model.loss_and_grad(ids, ids)
        assert set(grads) == set(model.trainable_parameters())
        opt.step(model.trainable_parameters(), grads)
    assert set(opt.state) == set(model.trainable_parameters())
    for name, value in model.trainable_parameters().items():
        assert not np.array_equal(value, start[name]), name
    for name, value in base.params.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_several_named_adapters():
    base = small_model()
    ids = batch()
    model = adapter_with(base, seed=0)
    first = model(ids)
    model.add_adapter("dora", tp.LoraConfig(r=2, use_dora=True, target_modules=["mlp.c_fc"], init_lora_weights=False))
    model.add_adapter("pissa", tp.LoraConfig(r=2, init_lora_weights="pissa", target_modules=["c_attn"]))
    np.testing.assert_array_equal(model(ids), first)  # adding does not activate
    model.set_adapter("dora")
    second = model(ids)
    assert relative_error(second, first) > 1e-6
    _, grads = model.loss_and_grad(ids, ids)
    assert set(grads) == set(model.adapters["dora"].params) and all("mlp.c_fc" in n for n in grads)
    model.set_adapter("pissa")  # PiSSA's residual lives in its adapter: the other adapters still see W
    assert relative_error(model(ids), base(ids)) <= 1e-12
    model.set_adapter("default")
    np.testing.assert_array_equal(model(ids), first)
    model.delete_adapter("dora")
    assert sorted(model.adapters) == ["default", "pissa"]
    model.merge_adapter()
    with pytest.raises(tp.MergeError):
        model.set_adapter("pissa")
    model.unmerge_adapter()


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_dora": True, "use_rslora": True},
        {"init_lora_weights": "pissa"},
        {"bias": "all", "lora_dropout": 0.1},
        {"bias": "lora_only", "target_modules": r"transformer\.h\.1\.mlp\.c_(fc|proj)"},
    ],
)
def test_save_and_load_round_trip(tmp_path, config):
    base = small_model()
    ids = batch()
    model = adapter_with(base, **config)
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(base, tmp_path)
    assert loaded.active.config == model.active.config
    assert set(loaded.adapter_state_dict()) == set(model.adapter_state_dict())
    np.testing.assert_array_equal(loaded(ids), model(ids))
    model.load_adapter(tmp_path, "again")
    model.set_adapter("again")
    np.testing.assert_array_equal(model(ids), loaded(ids))


def test_tensor_names_and_shapes_are_peft_s():
    base = small_model(n_embd=8)
    model = tp.get_peft_model(base, tp.LoraConfig(r=2, use_dora=True, target_modules=["c_attn"], bias="lora_only"))
    shapes = {k: v.shape for k, v in model.adapter_state_dict().items()}
    p = "base_model.model.transformer.h.0.attn.c_attn"
    assert shapes[f"{p}.lora_A.weight"] == (2, 8)
    assert shapes[f"{p}.lora_B.weight"] == (24, 2)
    assert shapes[f"{p}.lora_magnitude_vector"] == (24,)
    assert shapes[f"{p}.base_layer.bias"] == (24,)
    assert len(shapes) == 2 * 4


# ------------------------------------------------------------------ dropout
def test_dropout_masks_are_fixed_within_a_step_fresh_across_steps_and_off_in_eval():
    base = small_model()
    ids = batch()
    model = adapter_with(base, lora_dropout=0.5)
    no_dropout = adapter_with(base, lora_dropout=0.0)
    eval_out = model(ids)
    np.testing.assert_array_equal(eval_out, no_dropout(ids))  # eval mode: no dropout
    model.train()
    view = model.view()
    once = engine.logits(view, ids, None)
    np.testing.assert_array_equal(engine.logits(view, ids, None), once)  # same mask
    assert relative_error(once, eval_out) > 1e-6
    assert relative_error(model(ids), once) > 1e-6  # a new step draws new masks
    site = view.sites.linear["transformer.h.0.attn.c_attn"]
    mask = site.keep_mask("transformer.h.0.attn.c_attn", (40, 50, 8))
    assert set(np.unique(mask)) == {0.0, 2.0}  # inverted dropout: kept inputs scaled by 1 / (1 - p)
    assert abs((mask == 0).mean() - 0.5) < 0.02
    other = site.keep_mask("transformer.h.1.attn.c_attn", (40, 50, 8))
    assert not np.array_equal(mask, other)  # each layer has its own mask


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "positive integer"),
        ({"r": 2.0}, "positive integer"),
        ({"r": 9}, r"r=9 exceeds min\(in, out\) = min\(8, 24\)"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_dropout": 1.0}, r"\[0, 1\)"),
        ({"lora_dropout": -0.1}, r"\[0, 1\)"),
        ({"init_lora_weights": "pissa_niter_four"}, "init_lora_weights must be one of"),
        ({"init_lora_weights": 1}, "init_lora_weights must be one of"),
        ({"bias": "some"}, "bias must be one of"),
        ({"use_dora": "yes"}, "use_dora must be True or False"),
        ({"target_modules": ["q_proj"]}, r"'q_proj' matches no module; the modules are \['attn.c_attn'"),
        ({"target_modules": ["ln_1"]}, "matches no module"),
        ({"target_modules": r".*\.h\.7\..*"}, "matches no module"),
        ({"target_modules": []}, "non-empty list"),
        ({"alpha_pattern": {"c_attn": 4}}, "does not implement"),
        ({"lora_bias": True}, "does not implement"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    base = small_model(n_embd=8)
    with pytest.raises(tp.ConfigError, match=message):
        tp.get_peft_model(base, tp.LoraConfig(**kwargs))


def test_config_defaults_and_json_are_peft_s():
    config = tp.LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.target_modules == ["c_attn"] and config.init_lora_weights is True
    d = config.to_dict()
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM" and d["fan_in_fan_out"] is True
    assert tp.PeftConfig.from_dict(d) == config
    assert tp.LoraConfig(r=4, lora_alpha=8).scaling == 2.0
    assert tp.LoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    with pytest.warns(UserWarning, match="Conv1D"):
        assert tp.LoraConfig(fan_in_fan_out=False).fan_in_fan_out is True
    with pytest.raises(tp.CheckpointError, match="rank_pattern"):
        tp.PeftConfig.from_dict(d | {"rank_pattern": {"c_attn": 2}})


@pytest.mark.parametrize("n_rows", [3, 40])  # fewer rows than outputs: two products; more: the merged weight
def test_lora_dx_is_the_same_on_either_path(n_rows):
    """Without dropout, lora_backward takes dx through the merged weight when there are more rows than
    outputs, else through the base weight plus the rank-r product: both must be dy (W + s (B A)ᵀ)ᵀ."""
    from tinypeft.methods.lora import lora_backward, lora_forward

    rng = np.random.default_rng(n_rows)
    n_in, n_out, r, s = 7, 12, 3, 0.7
    x = rng.normal(size=(n_rows, n_in))
    W, b = rng.normal(size=(n_in, n_out)), rng.normal(size=n_out)
    A, B = rng.normal(size=(r, n_in)), rng.normal(size=(n_out, r))
    dy = rng.normal(size=(n_rows, n_out))
    _, cache = lora_forward(x, W, b, A, B, s, None)
    dx, *_ = lora_backward(dy, cache)
    np.testing.assert_allclose(dx, dy @ (W + s * (B @ A).T).T, rtol=1e-12, atol=1e-12)
