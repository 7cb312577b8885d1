"""Trainable tokens: gradients three ways over random models, token sets and padding (trained ids repeated
in the batch); the adapter starts as the identity; only Δ trains and only the rows idx change; the tied head
reads the same rows; merge equals the unmerged model; errors; cached generation equals the full forward."""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import assert_checks_catch, assert_gradients_check, greedy_by_full_forward
from hypothesis import given, settings
from strategies import perturbed_model
from token_strategies import token_cases

import tinypeft as tp
from tinypeft.errors import CheckpointError, ConfigError
from tinypeft.gradcheck import relative_error
from tinypeft.methods import token_table
from tinypeft.methods.trainable_tokens import DELTA, TIED_DELTA

WTE = "transformer.wte.weight"


def small(vocab_size=23, **kw):
    cfg = dict(vocab_size=vocab_size, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64") | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


@settings(max_examples=20)
@given(token_cases())
def test_gradients(case_indices):
    case, indices = case_indices
    config = tp.TrainableTokensConfig(token_indices=indices, init_weights=False)
    model = tp.get_peft_model(case.model, config, seed=case.seed)
    assert_gradients_check(model, case.ids, mask=case.mask, output_weights=case.output_weights)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


def test_checks_catch_a_wrong_backward(monkeypatch):
    model = tp.get_peft_model(small(), tp.TrainableTokensConfig(token_indices=[3, 5, 1], init_weights=False))
    ids = np.array([[3, 3, 5, 0, 7], [1, 2, 3, 5, 5]])
    assert_checks_catch(monkeypatch, token_table, "trainable_tokens_backward", model, ids, ids)


def test_the_head_shares_the_gradient():
    """Δ's gradient is the lookup's share plus the head's: a batch that never reads token 4 still trains
    its row through the head (the softmax over every token), and the lookup adds repeats."""
    model = tp.get_peft_model(small(), tp.TrainableTokensConfig(token_indices=[4, 9], init_weights=False))
    ids = np.array([[9, 1, 9, 2, 9]])
    _, grads = model.loss_and_grad(ids, ids)
    d = grads[DELTA]
    assert np.abs(d[0]).max() > 0  # token 4: the head alone
    view = model.view()
    from tinypeft import gpt
    from tinypeft.ops import causal_lm_loss_backward, causal_lm_loss_forward

    logits, cache = gpt.forward(view.params, view.config, ids, None, view.sites)
    _, loss_cache = causal_lm_loss_forward(logits, ids)
    dlogits = causal_lm_loss_backward(1.0, loss_cache)
    head = dlogits.reshape(-1, 23)[:, [4, 9]].T @ cache.x_final.reshape(-1, 12)
    assert relative_error(d[0], head[0]) <= 1e-13  # token 4 is never looked up: the head's share alone
    assert np.abs(d[1] - head[1]).max() > 1e-3  # token 9 is, three times: the lookup adds its share


def test_starts_as_the_identity_and_changes_only_its_rows():
    base = small()
    ids = np.random.default_rng(0).integers(0, 23, size=(2, 9))
    model = tp.get_peft_model(base, tp.TrainableTokensConfig(token_indices=[6, 2]))
    np.testing.assert_array_equal(model.active.params[DELTA], base.params[WTE][[6, 2]])
    np.testing.assert_array_equal(model(ids), base(ids))
    assert set(model.trainable_parameters()) == {DELTA}
    model.active.params[DELTA] = model.active.params[DELTA] + 1.0
    merged = model.merge_and_unload().params[WTE]
    changed = np.flatnonzero(np.abs(merged - base.params[WTE]).max(axis=1) > 0)
    assert changed.tolist() == [2, 6]
    np.testing.assert_array_equal(merged[[6, 2]], model.active.params[DELTA])  # row idx_j is Δ_j, exactly


@settings(max_examples=10)
@given(token_cases())
def test_merge_equals_the_unmerged_model(case_indices):
    """The head reads the same table as the lookup, so merging W.index_copy(idx, Δ) into wte changes nothing."""
    case, indices = case_indices
    model = tp.get_peft_model(case.model, tp.TrainableTokensConfig(token_indices=indices, init_weights=False))
    merged = model.merge_and_unload()
    assert relative_error(merged(case.ids, case.mask), model(case.ids, case.mask)) <= 1e-12
    model.merge_adapter()
    assert relative_error(model(case.ids, case.mask), merged(case.ids, case.mask)) == 0
    model.unmerge_adapter()
    np.testing.assert_array_equal(model.base_model.params[WTE], case.model.params[WTE])


def test_generation_with_the_cache_equals_the_full_forward():
    model = tp.get_peft_model(small(), tp.TrainableTokensConfig(token_indices=[0, 7, 11], init_weights=False))
    prompt = np.array([[7, 1, 11]])
    np.testing.assert_array_equal(model.generate(prompt, 6), greedy_by_full_forward(model, prompt, 6))


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"token_indices": []}, "non-empty list"),
        ({"token_indices": None}, "non-empty list"),
        ({"token_indices": [1, 1]}, "token 1 more than once"),
        ({"token_indices": [True]}, "non-negative integer"),
        ({"token_indices": [2.0]}, "non-negative integer"),
        ({"token_indices": [1], "init_weights": "yes"}, "True or False"),
    ],
)
def test_config_errors(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        tp.TrainableTokensConfig(**kwargs)


def test_range_and_target_errors():
    with pytest.raises(ConfigError, match=r"token id 23, outside the vocabulary: ids are 0\.\.22"):
        tp.get_peft_model(small(), tp.TrainableTokensConfig(token_indices=[0, 23]))
    with pytest.raises(ConfigError, match="'lm_head' matches no module"):
        tp.get_peft_model(small(), tp.TrainableTokensConfig(token_indices=[0], target_modules=["lm_head"]))
    tp.get_peft_model(small(), tp.TrainableTokensConfig(token_indices=[0], target_modules=["transformer.wte"]))


def test_files_round_trip_and_the_tied_copy(tmp_path):
    base = small()
    model = tp.get_peft_model(base, tp.TrainableTokensConfig(token_indices=[5, 3], init_weights=False))
    model.save_pretrained(tmp_path)
    state = model.adapter_state_dict()
    assert set(state) == {DELTA, TIED_DELTA}
    np.testing.assert_array_equal(state[DELTA], state[TIED_DELTA])
    loaded = tp.PeftModel.from_pretrained(base, tmp_path)
    ids = np.array([[5, 3, 1, 5]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
    loaded.load_adapter_state_dict({DELTA: state[DELTA]})  # the tied copy may be absent
    bad = {DELTA: state[DELTA], TIED_DELTA: state[DELTA] + 1}
    with pytest.raises(CheckpointError, match=r"lm_head\.trainable_tokens_delta differs"):
        loaded.load_adapter_state_dict(bad)
