"""VeRA on its own (the comparisons with PEFT, and with torch's generator, are in test_vera_peft.py).

- Gradients three ways over random models and random VeRA configs (rank, targets, dropout, bias, key), always
  with λ_b != 0 (at λ_b = 0, dλ_d is identically zero and a check proves nothing): hand-written == autograd of
  the shipped forward (<= 1e-10 relative) and == a fourth-order finite difference along random directions
  (<= 1e-6), through the loss and through a linear functional of the logits with padding.
- dλ_d and dλ_b are what the effective weight's gradient implies; each layer uses the top-left block of the
  shared A and B; the default init is the base model exactly; merged == unmerged (<= 1e-12); unmerge restores
  the base's very arrays; training moves only λ_d, λ_b (and trained biases), never A or B; dropout only in
  training mode; files round-trip with save_projection True and False.
"""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import assert_checks_catch, assert_only_adapter_changes
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_strategies import well_conditioned_cases
from strategies import perturbed_model

import tinypeft as tp
import tinypeft.methods.vera as vera_module
from tinypeft.gradcheck import check_gradients, relative_error
from tinypeft.methods.vera import VERA_A, VERA_B, torch_kaiming_uniform

AUTOGRAD_TOL = 1e-10
DIRECTIONAL_TOL = 1e-6
MERGE_TOL = 1e-12
TARGET_CHOICES = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "c_proj")


@st.composite
def vera_configs(draw, dropout: bool = True, biases=("none", "all", "vera_only")) -> tp.VeraConfig:
    """A random VeraConfig: rank 1..12 (VeRA's r is not bounded by the layer sizes), a target subset, a key
    (past 2**32 too: torch keeps its low 32 bits), sometimes dropout, a bias option; λ_b = 1, λ_d ~ N(0, 1)."""
    return tp.VeraConfig(
        r=draw(st.integers(1, 12)),
        target_modules=draw(st.lists(st.sampled_from(TARGET_CHOICES), min_size=1, max_size=3, unique=True)),
        projection_prng_key=draw(st.sampled_from([0, 1, 7, 2**32 + 1, -5])),
        vera_dropout=draw(st.sampled_from([0.0, 0.0, 0.25, 0.5])) if dropout else 0.0,
        bias=draw(st.sampled_from(biases)),
        init_weights=False,
    )


def perturb(model: tp.PeftModel, seed: int, scale: float = 0.3) -> tp.PeftModel:
    """Every trained tensor moved off its init, so no gradient vanishes by construction."""
    rng = np.random.default_rng(seed)
    params = model.active.params
    for name, value in params.items():
        params[name] = value + scale * rng.standard_normal(value.shape)
    return model


def small_model(dtype: str = "float64", seed: int = 0, **kw) -> tp.GPT:
    cfg = dict(vocab_size=29, n_positions=16, n_embd=8, n_layer=2, n_head=2, dtype=dtype) | kw
    return perturbed_model(tp.GPTConfig(**cfg), seed)


def random_vera(base: tp.GPT, seed: int = 0, **config) -> tp.PeftModel:
    config = {"r": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "init_weights": False} | config
    return perturb(tp.get_peft_model(base, tp.VeraConfig(**config), seed=seed), seed)


def ids_for(vocab_size: int = 29, shape=(2, 9), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape)


def assert_report_ok(report: dict, model: tp.PeftModel) -> None:
    assert set(report) - {"__all__"} == set(model.trainable_parameters())
    worst_autograd = max(e["autograd"] for e in report.values())
    worst_directional = max(e["directional"] for e in report.values())
    assert worst_autograd <= AUTOGRAD_TOL, report
    assert worst_directional <= DIRECTIONAL_TOL, report


# ------------------------------------------------------------------ gradients
@settings(max_examples=40)
@given(well_conditioned_cases(min_len=2), st.data())
def test_gradients_three_ways(case, data):
    config = data.draw(vera_configs())
    model = perturb(tp.get_peft_model(case.model, config, seed=case.seed), case.seed).train()  # dropout on
    report = check_gradients(model, case.ids, labels=case.labels, attention_mask=case.mask, seed=case.seed)
    assert_report_ok(report, model)


@settings(max_examples=20)
@given(well_conditioned_cases(min_len=2, padding=True), st.data())
def test_gradients_through_output_weights_with_padding(case, data):
    """The functional sum(logits * R) reaches every position, the last included; padding masks rows."""
    model = perturb(tp.get_peft_model(case.model, data.draw(vera_configs(dropout=False)), seed=case.seed), case.seed)
    report = check_gradients(model, case.ids, attention_mask=case.mask, output_weights=case.output_weights)
    assert_report_ok(report, model)


def test_checks_catch_a_wrong_vera_backward(monkeypatch):
    model = random_vera(small_model())
    ids = ids_for()
    assert_checks_catch(monkeypatch, vera_module, "vera_backward", model, ids, ids)


@settings(max_examples=15)
@given(well_conditioned_cases(min_len=2), st.data())
def test_dlambdas_are_what_the_effective_weight_gradient_implies(case, data):
    """With W_eff = W + (Λ_b B Λ_d A)ᵀ and G = dW_effᵀ (out, in), the gradient a full fine-tune of the merged model
    gives: dλ_b = rowsum(G ⊙ (B Λ_d A)) and dλ_d = diag(Bᵀ Λ_b G Aᵀ); a trained bias gets the merged bias's."""
    config = data.draw(vera_configs(dropout=False, biases=("none", "vera_only")))
    model = perturb(tp.get_peft_model(case.model, config, seed=case.seed), case.seed)
    _, grads = model.loss_and_grad(case.ids, case.labels, case.mask)
    _, full = model.merge_and_unload().loss_and_grad(case.ids, case.labels, case.mask)
    adapter = model.active
    for layer in adapter.layers:
        A, B = adapter.projections(layer)
        d, b = adapter.params[layer.lambda_d], adapter.params[layer.lambda_b]
        G = full[layer.weight].T  # [out, in]
        assert relative_error(grads[layer.lambda_b], (G * ((B * d) @ A)).sum(axis=1)) <= 1e-12, layer.module
        assert relative_error(grads[layer.lambda_d], np.diag(B.T @ (b[:, None] * G) @ A.T)) <= 1e-12, layer.module
        if config.bias == "vera_only":
            assert relative_error(grads[layer.trained_bias], full[layer.bias]) <= 1e-12, layer.module


# ------------------------------------------------------------------ the shared projections
def test_every_layer_uses_the_top_left_block_of_one_shared_pair():
    """A (r, max in) and B (max out, r) over the targets; c_attn (8 -> 24) reads A[:, :8] and all of B, mlp.c_proj
    (32 -> 8) all of A and B[:8]; the pair is PEFT's draw from the key (kaiming-uniform bounds sqrt(6 / fan_in))."""
    base = small_model(n_layer=1)
    model = random_vera(base, r=3, target_modules=["c_attn", "mlp.c_proj"], projection_prng_key=11)
    adapter = model.active
    assert adapter.vera_A.shape == (3, 32) and adapter.vera_B.shape == (24, 3)  # mlp.c_proj: in 32; c_attn: out 24
    A, B = torch_kaiming_uniform(11, [(3, 32), (24, 3)])
    np.testing.assert_array_equal(adapter.vera_A, A)
    np.testing.assert_array_equal(adapter.vera_B, B)
    assert np.abs(A).max() <= np.sqrt(6 / 32) and np.abs(B).max() <= np.sqrt(6 / 3)
    view = model.view()
    for module, n_in, n_out in (("transformer.h.0.attn.c_attn", 8, 24), ("transformer.h.0.mlp.c_proj", 32, 8)):
        x = np.random.default_rng(0).standard_normal((2, 5, n_in))
        layer = next(layer for layer in adapter.layers if layer.module == module)
        d, b = adapter.params[layer.lambda_d], adapter.params[layer.lambda_b]
        W, bias = base.params[module + ".weight"], base.params[module + ".bias"]
        y, _ = view.sites.linear[module].forward(view.params, module, x)
        expected = x @ W + bias + b * ((d * (x @ A[:, :n_in].T)) @ B[:n_out].T)
        assert relative_error(y, expected) <= 1e-15, module


def test_the_key_alone_sets_the_projections():
    """Two adapters with one key hold equal projections; another key, other ones; the seed of get_peft_model
    (which draws λ_d with init_weights=False) does not touch them."""
    base = small_model()
    one = tp.get_peft_model(base, tp.VeraConfig(r=2, projection_prng_key=3), seed=0).active
    same = tp.get_peft_model(base, tp.VeraConfig(r=2, projection_prng_key=3 + 2**32), seed=9).active
    other = tp.get_peft_model(base, tp.VeraConfig(r=2, projection_prng_key=4)).active
    np.testing.assert_array_equal(one.vera_A, same.vera_A)
    np.testing.assert_array_equal(one.vera_B, same.vera_B)
    assert not np.array_equal(one.vera_A, other.vera_A)


# ------------------------------------------------------------------ init, merge, training
@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"], r".*\.h\.1\.mlp\..*"])
def test_the_default_init_is_the_base_model_bit_for_bit(targets):
    base = small_model()
    model = tp.get_peft_model(base, tp.VeraConfig(r=16, target_modules=targets))
    for layer in model.active.layers:
        assert np.all(model.active.params[layer.lambda_b] == 0.0)
        assert np.all(model.active.params[layer.lambda_d] == 0.1)
    ids = ids_for()
    np.testing.assert_array_equal(model(ids), base(ids))


@pytest.mark.parametrize("config", [{}, {"bias": "all"}, {"bias": "vera_only", "target_modules": ["mlp.c_fc"]}])
def test_merge_equals_unmerged_and_unmerge_restores_the_base(config):
    base = small_model()
    originals = dict(base.params)
    model = random_vera(base, **config)
    ids = ids_for()
    unmerged = model(ids)
    assert relative_error(unmerged, base(ids)) > 1e-3  # the adapter does something
    merged = model.merge_and_unload()
    assert relative_error(merged(ids), unmerged) <= MERGE_TOL
    assert all(base.params[k] is v for k, v in originals.items())  # merge_and_unload leaves the base alone
    model.merge_adapter()
    assert relative_error(model(ids), unmerged) <= MERGE_TOL
    model.unmerge_adapter()
    assert all(base.params[k] is v for k, v in originals.items())  # the very arrays, bit for bit
    np.testing.assert_array_equal(model(ids), unmerged)


def test_the_merge_adds_the_delta_weight():
    base = small_model()
    model = random_vera(base, target_modules=["c_fc"])
    merged = model.merge_and_unload().params
    adapter = model.active
    for layer in adapter.layers:
        A, B = adapter.projections(layer)
        d, b = adapter.params[layer.lambda_d], adapter.params[layer.lambda_b]
        delta = (np.diag(b) @ B @ np.diag(d) @ A).T  # (Λ_b B Λ_d A)ᵀ: [in, out]
        assert relative_error(merged[layer.weight], base.params[layer.weight] + delta) <= 1e-15


def test_safe_merge_refuses_non_finite_vectors():
    base = small_model()
    model = random_vera(base)
    name = next(iter(model.trainable_parameters()))
    model.active.params[name][0] = np.inf
    with pytest.raises(tp.MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_only_the_vectors_train_never_the_projections(bias):
    model = tp.get_peft_model(small_model(), tp.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], bias=bias))
    perturb(model, 1)  # λ_b = 0 would leave λ_d untrained in the first step
    A, B = model.active.vera_A.copy(), model.active.vera_B.copy()
    assert_only_adapter_changes(model, vocab_size=29)
    np.testing.assert_array_equal(model.active.vera_A, A)
    np.testing.assert_array_equal(model.active.vera_B, B)


def test_dropout_only_in_training_mode_and_fixed_within_a_step():
    model = random_vera(small_model(), vera_dropout=0.5)
    ids = ids_for()
    np.testing.assert_array_equal(model(ids), model(ids))  # eval mode: no masks
    model.train()
    view = model.view()  # one draw of masks
    site = next(iter(view.sites.linear.values()))
    assert view.sites.stochastic
    first = site.keep_mask("transformer.h.0.attn.c_attn", (2, 9, 8))
    np.testing.assert_array_equal(first, site.keep_mask("transformer.h.0.attn.c_attn", (2, 9, 8)))
    assert set(np.unique(first)) <= {0.0, 2.0} and 0 < first.mean() < 2
    assert not np.array_equal(model(ids), model(ids))  # a fresh mask per forward


def test_the_trainable_count_holds_the_vectors_and_not_the_projections(capsys):
    model = tp.get_peft_model(small_model(), tp.VeraConfig(r=5, target_modules=["c_attn", "mlp.c_proj"]))
    model.print_trainable_parameters()
    # per layer: λ_d (5) + λ_b (24 for c_attn, 8 for mlp.c_proj); two layers
    assert capsys.readouterr().out.startswith(f"trainable params: {2 * (5 + 24 + 5 + 8)} ||")


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load_round_trip(tmp_path, save_projection):
    model = random_vera(small_model(), r=3, projection_prng_key=5, save_projection=save_projection, bias="vera_only")
    model.save_pretrained(tmp_path)
    state = model.adapter_state_dict()
    assert (VERA_A in state and VERA_B in state) == save_projection
    assert state.get(VERA_A, model.active.vera_A).shape == (3, 32)
    loaded = tp.PeftModel.from_pretrained(small_model(), tmp_path)
    np.testing.assert_array_equal(loaded(ids_for()), model(ids_for()))
    saved = loaded.peft_config["default"].to_dict()
    assert saved["peft_type"] == "VERA" and saved["save_projection"] is save_projection
    assert saved["fan_in_fan_out"] is True and saved["projection_prng_key"] == 5


def test_saved_projections_are_the_ones_used():
    """With save_projection=True the file's A and B win over the key's: a file from a machine whose torch drew
    them differently still loads as saved."""
    model = random_vera(small_model(), r=2)
    state = model.adapter_state_dict()
    state[VERA_A] = state[VERA_A] * 1.5
    other = tp.get_peft_model(small_model(), model.active.config)
    other.load_adapter_state_dict(state)
    np.testing.assert_array_equal(other.active.vera_A, state[VERA_A])
    assert relative_error(other(ids_for()), model(ids_for())) > 1e-6


def test_without_save_projection_saved_projections_are_ignored_with_a_warning():
    model = random_vera(small_model(), r=2)
    state = model.adapter_state_dict()
    config = tp.VeraConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"], init_weights=False, save_projection=False)
    other = tp.get_peft_model(small_model(), config)
    with pytest.warns(UserWarning, match="redrawn from projection_prng_key"):
        other.load_adapter_state_dict({**state, VERA_A: state[VERA_A] * 2})
    np.testing.assert_array_equal(other.active.vera_A, model.active.vera_A)
    np.testing.assert_array_equal(other(ids_for()), model(ids_for()))


def test_a_failed_load_changes_nothing():
    model = random_vera(small_model(), r=2)
    before = {k: v.copy() for k, v in model.trainable_parameters().items()}
    A = model.active.vera_A
    state = model.adapter_state_dict()
    with pytest.raises(tp.CheckpointError, match="non-finite"):
        model.load_adapter_state_dict({**state, VERA_B: np.full_like(state[VERA_B], np.nan)})
    assert model.active.vera_A is A
    for k, v in before.items():
        np.testing.assert_array_equal(model.trainable_parameters()[k], v)


def test_fan_in_fan_out_false_is_forced_true_with_a_warning():
    with pytest.warns(UserWarning, match="setting fan_in_fan_out=True, as PEFT does"):
        config = tp.VeraConfig(fan_in_fan_out=False)
    assert config.fan_in_fan_out is True


def test_a_huge_rank_is_refused_before_anything_is_drawn():
    """VeRA's r has no bound from the layer sizes (PEFT's default is 256 on any model), so the memory check is
    what refuses r = 10**12: A and B alone would hold 4 * 10**13 numbers."""
    with pytest.raises(tp.ConfigError, match=r"VeraConfig's adapter needs about .* make the adapter smaller"):
        tp.get_peft_model(small_model(), tp.VeraConfig(r=10**12))
