"""The model's gradients three ways: hand-written backward == autograd of the shipped forward
(<= 1e-10 relative per tensor) and == a fourth-order central difference along random directions
(<= 1e-6 relative; see gradcheck.directional_check), for full fine-tuning and every selective method,
over random configs, weights, batches and padding masks. Also: the checks catch a 0.1% error in any
backward rule, frozen parameters get nothing, and frozen weight-gradient matmuls are never run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import cases, perturbed_model

import tinypeft as tp
import tinypeft.gpt as model_module
from tinypeft.gradcheck import check_gradients
from tinypeft.optim import AdamW

AUTOGRAD_TOL = 1e-10
DIRECTIONAL_TOL = 1e-6


def assert_report(report, expected_names):
    assert set(report) - {"__all__"} == set(expected_names)
    for name, errors in report.items():
        assert errors["autograd"] <= AUTOGRAD_TOL, (name, errors)
        assert errors["directional"] <= DIRECTIONAL_TOL, (name, errors)


@given(cases(min_embd=3))
def test_full_finetuning_gradients(case):
    model = case.model
    report = check_gradients(model, case.ids, attention_mask=case.mask, output_weights=case.output_weights)
    assert_report(report, model.params)
    if case.ids.shape[1] > 1:
        report = check_gradients(model, case.ids, labels=case.labels, attention_mask=case.mask)
        assert_report(report, model.params)


SELECTIVE = {
    "bitfit": lambda cfg: tp.BitFitConfig(),
    "ln": lambda cfg: tp.LNTuningConfig(),
    "ln_f_only": lambda cfg: tp.LNTuningConfig(target_modules=["ln_f"]),
    "last_block": lambda cfg: tp.LastBlocksConfig(num_blocks=1),
    "attention_of_block_0": lambda cfg: tp.SelectiveConfig(patterns=["transformer.h.0.attn.*"]),
    "mlp_regex": lambda cfg: tp.SelectiveConfig(regex=r"transformer\.h\.\d+\.mlp\.c_fc\.weight"),
    "embeddings": lambda cfg: tp.SelectiveConfig(patterns=["transformer.wte.weight", "transformer.wpe.weight"]),
}


@given(cases(min_len=2, min_embd=3), st.sampled_from(sorted(SELECTIVE)))
def test_selective_gradients_through_peft_model(case, method):
    config = SELECTIVE[method](case.model.config)
    model = tp.get_peft_model(case.model, config)
    expected = set(model.trainable_parameters())
    report = check_gradients(model, case.ids, attention_mask=case.mask, output_weights=case.output_weights)
    assert_report(report, expected)
    _, grads = model.loss_and_grad(case.ids, case.labels, case.mask)
    assert set(grads) == expected


@given(
    cases(min_len=2, min_embd=3),
    st.sampled_from(["*.bias", "transformer.h.0.ln_1.*", "transformer.wpe.weight", "*.c_fc.*"]),
)
def test_unfreeze_on_a_plain_gpt(case, pattern):
    model = case.model
    tp.freeze(model)
    names = tp.unfreeze(model, [pattern])
    assert set(model.trainable) == set(names)
    report = check_gradients(model, case.ids, labels=case.labels, attention_mask=case.mask)
    assert_report(report, names)


def test_frozen_parameters_stay_bit_identical_through_training():
    model = perturbed_model(tp.GPTConfig(vocab_size=17, n_positions=12, n_embd=8, n_layer=2, n_head=2), 0)
    tp.trainable_only(model, ["*.ln_1.*", "transformer.h.1.mlp.c_fc.weight"])
    before = {k: v.copy() for k, v in model.params.items()}
    opt = AdamW(lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = rng.integers(0, 17, size=(2, 10))
        _, grads = model.loss_and_grad(ids, ids)
        assert set(grads) == model.trainable
        opt.step(model.trainable_parameters(), grads)
    assert set(opt.state) == model.trainable  # no optimizer state for frozen tensors
    for name, value in model.params.items():
        if name in model.trainable:
            assert not np.array_equal(value, before[name]), name
        else:
            np.testing.assert_array_equal(value, before[name], err_msg=name)


# ---- the checks must be able to fail: break one rule by 0.1% and see it caught
BROKEN_RULES = [
    "linear_backward",
    "layernorm_backward",
    "gelu_tanh_backward",
    "attention_backward",
    "embedding_backward",
]


@pytest.mark.parametrize("rule", BROKEN_RULES)
def test_checks_catch_a_small_error_in_any_backward_rule(monkeypatch, rule):
    original = getattr(model_module, rule)

    def scaled(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(None if o is None else o * 1.001 for o in out)
        return out * 1.001

    model = perturbed_model(
        tp.GPTConfig(vocab_size=11, n_positions=8, n_embd=6, n_layer=1, n_head=2, dtype="float64"), 3
    )
    ids = np.random.default_rng(0).integers(0, 11, size=(2, 7))
    clean = check_gradients(model, ids, labels=ids)
    assert max(e["autograd"] for e in clean.values()) <= AUTOGRAD_TOL
    monkeypatch.setattr(model_module, rule, scaled)
    if rule == "attention_backward":  # the reference kernel holds the function itself
        kernel = model_module.Attention(model_module.attention_forward, scaled)
        monkeypatch.setattr(model_module, "REFERENCE_ATTENTION", kernel)
    broken = check_gradients(model, ids, labels=ids)
    assert max(e["autograd"] for e in broken.values()) > 1e-5
    assert max(e["directional"] for e in broken.values()) > 1e-5


def test_nothing_trainable_gives_no_gradients():
    model = tp.GPT(tp.GPTConfig(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    tp.freeze(model)
    ids = np.arange(7).reshape(1, 7)
    loss, grads = model.loss_and_grad(ids, ids)
    assert grads == {} and np.isfinite(loss)
