"""Prompt tuning: gradients three ways over random models, prompts (NV 1..20) and padding masks; virtual
tokens behave exactly like real tokens whose embeddings they hold (positions, mask, labels); the three
initialisations; no merge; only the prompt trains; cached generation equals the full forward."""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import (
    assert_checks_catch,
    assert_gradients_check,
    assert_only_adapter_changes,
    greedy_by_full_forward,
    virtual_token_cases,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import perturbed_model

import tinypeft as tp
from tinypeft.data import encode
from tinypeft.gradcheck import relative_error
from tinypeft.methods import prompt as prompt_module


def small(vocab_size=37, n_positions=32, **kw):
    cfg = dict(vocab_size=vocab_size, n_positions=n_positions, n_embd=12, n_layer=2, n_head=3, dtype="float64") | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


@settings(max_examples=20)
@given(virtual_token_cases())
def test_gradients(case_nv):
    case, NV = case_nv
    model = tp.get_peft_model(case.model, tp.PromptTuningConfig(num_virtual_tokens=NV), seed=case.seed)
    B, T = case.ids.shape
    # logits have NV + T positions: weight every one of them, the virtual ones included
    weights = np.random.default_rng(case.seed).standard_normal((B, NV + T, case.model.config.vocab_size))
    assert_gradients_check(model, case.ids, mask=case.mask, output_weights=weights)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


def test_checks_catch_a_wrong_prompt_backward(monkeypatch):
    model = tp.get_peft_model(small(), tp.PromptTuningConfig(num_virtual_tokens=3))
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 6))
    assert_checks_catch(monkeypatch, prompt_module, "prompt_backward", model, ids, ids)


@settings(max_examples=15)
@given(virtual_token_cases(), st.booleans())
def test_virtual_tokens_act_as_tokens_with_those_embeddings(case_nv, padded):
    """A prompt holding wte rows of ids p gives exactly what the base model gives for concat(p, ids):
    logits at all NV + T positions, the mask extended by ones, and the loss with labels -100 on p.
    This pins positions (virtual tokens at 0..NV-1, real ones shifted by NV), the mask and the labels."""
    case, NV = case_nv
    base = case.model
    mask = case.mask if padded else None
    labels = case.labels if padded else case.ids
    model = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=NV, prompt_tuning_init="SAMPLE_VOCAB"))
    B = case.ids.shape[0]
    virtual_ids = np.random.default_rng(case.seed).integers(0, base.config.vocab_size, size=NV)
    model.active.params["prompt_embeddings"] = base.params["transformer.wte.weight"][virtual_ids]
    full_ids = np.concatenate([np.tile(virtual_ids, (B, 1)), case.ids], axis=1)
    full_mask = None if mask is None else np.concatenate([np.ones((B, NV), dtype=mask.dtype), mask], axis=1)
    ours = model(case.ids, mask)
    assert ours.shape == (B, NV + case.ids.shape[1], base.config.vocab_size)
    assert relative_error(ours, base(full_ids, full_mask)) <= 1e-13
    if case.ids.shape[1] > 1 or NV > 0:
        full_labels = np.concatenate([np.full((B, NV), -100), labels], axis=1)
        assert abs(model.loss(case.ids, labels, mask) - base.loss(full_ids, full_labels, full_mask)) <= 1e-13


def test_the_last_virtual_position_predicts_the_first_token():
    """PEFT's label padding: after the shift, the loss has T targets (token 0 included), not T - 1."""
    base = small()
    model = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=4))
    ids = np.array([[5, 9, 2]])
    logits = model(ids)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean([log_p[0, 3 + t, ids[0, t]] for t in range(3)])  # positions NV-1 .. NV+T-2
    assert abs(model.loss(ids, ids) - expected) <= 1e-13
    assert abs(model.loss(ids[:, :1], ids[:, :1]) + log_p[0, 3, 5]) <= 1e-13  # one token is enough


def test_initialisations():
    base = small(vocab_size=300)
    wte = base.params["transformer.wte.weight"]

    random = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=20), seed=3).active.params
    again = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=20), seed=3).active.params
    table = random["prompt_embeddings"]
    assert table.shape == (20, 12) and table.dtype == np.float64
    np.testing.assert_array_equal(table, again["prompt_embeddings"])  # seeded
    assert abs(table.mean()) < 0.25 and abs(table.std() - 1.0) < 0.15  # N(0, 1), 240 draws

    sampled = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = sampled.active.params["prompt_embeddings"]
    for row in rows:  # every row is a row of wte
        assert (np.abs(wte - row).max(axis=1) == 0).any()

    text = "héllo"  # 6 UTF-8 bytes: repeated to fill 14 virtual tokens, then truncated
    ids = encode(text)
    config = tp.PromptTuningConfig(num_virtual_tokens=14, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    text_model = tp.get_peft_model(base, config)
    expected_ids = np.concatenate([ids, ids, ids[:2]])
    np.testing.assert_array_equal(text_model.active.params["prompt_embeddings"], wte[expected_ids])
    short = tp.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    np.testing.assert_array_equal(tp.get_peft_model(base, short).active.params["prompt_embeddings"], wte[ids[:3]])
    # PEFT needs tokenizer_name_or_path for TEXT; the adapter's config names the byte tokenizer
    assert text_model.peft_config["default"].to_dict()["tokenizer_name_or_path"] == prompt_module.BYTE_TOKENIZER
    assert config.tokenizer_name_or_path is None  # the caller's config is not modified


def test_float32_model_gets_a_float32_prompt():
    base = perturbed_model(tp.GPTConfig(vocab_size=37, n_positions=32, n_embd=12, n_layer=2, n_head=3), 0)
    for init in ("RANDOM", "SAMPLE_VOCAB"):
        model = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init=init))
        assert model.active.params["prompt_embeddings"].dtype == np.float32
        _, grads = model.loss_and_grad([[1, 2, 3]], [[1, 2, 3]])
        assert grads["prompt_embeddings"].dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1"),
        (dict(num_virtual_tokens=2.5), "num_virtual_tokens must be an integer >= 1"),
        (dict(prompt_tuning_init="ZEROS"), "prompt_tuning_init must be one of"),
        (dict(prompt_tuning_init="TEXT"), "needs a non-empty prompt_tuning_init_text"),
        (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=""), "needs a non-empty prompt_tuning_init_text"),
        (dict(num_transformer_submodules=2), "one transformer stack"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(tp.ConfigError, match=message):
        tp.PromptTuningConfig(**kwargs)


def test_errors_against_the_model():
    base = small(n_positions=16)
    with pytest.raises(tp.ConfigError, match="leaves no room for tokens"):
        tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=16))
    with pytest.raises(tp.ConfigError, match="byte 195, which is no token of this model"):
        tp.get_peft_model(
            base, tp.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="é")
        )
    with pytest.raises(tp.ConfigError, match="token_dim=64, but the base model has 12"):
        tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=4, token_dim=64))
    model = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=10))
    model(np.zeros((1, 6), dtype=int))  # 10 + 6 = 16 positions fit
    with pytest.raises(tp.InputError, match=r"17 positions \(10 past/prefix/virtual \+ 7 tokens\).*at most 6 tokens"):
        model(np.zeros((1, 7), dtype=int))
    with pytest.raises(tp.InputError, match="needs 17 positions"):
        model.generate(np.zeros((1, 6), dtype=int), max_new_tokens=2)


def test_merge_is_refused_with_the_reason():
    model = tp.get_peft_model(small(), tp.PromptTuningConfig(num_virtual_tokens=2))
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(tp.MergeError, match="prompt tuning cannot be merged: its virtual tokens are extra inputs"):
            merge()
    ids = np.array([[1, 2, 3]])
    assert model(ids).shape[1] == 5  # still unmerged and working


def test_only_the_prompt_trains():
    model = tp.get_peft_model(small(), tp.PromptTuningConfig(num_virtual_tokens=5))
    assert list(model.trainable_parameters()) == ["prompt_embeddings"]
    assert_only_adapter_changes(model, vocab_size=37)


@settings(max_examples=15)
@given(virtual_token_cases(max_len=6), st.integers(1, 5))
def test_greedy_generation_equals_argmax_of_the_full_forward(case_nv, n_new):
    """KV-cached generation: the prompt enters the cache once, at the start, and later steps continue
    at positions NV + T, NV + T + 1, ...; the output holds the real tokens only."""
    case, NV = case_nv
    base = case.model
    T = case.ids.shape[1]
    if base.config.n_positions < NV + T + n_new:
        base = perturbed_model(base.config.replace(n_positions=NV + T + n_new), case.seed)
    model = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=NV), seed=case.seed)
    out = model.generate(case.ids, n_new)
    assert out.shape == (case.ids.shape[0], T + n_new)
    np.testing.assert_array_equal(out[:, :T], case.ids)
    np.testing.assert_array_equal(out, greedy_by_full_forward(model, case.ids, n_new))


def test_save_and_load_round_trip(tmp_path):
    base = small()
    model = tp.get_peft_model(base, tp.PromptTuningConfig(num_virtual_tokens=6), seed=1)
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(small(), tmp_path)
    assert isinstance(loaded.peft_config["default"], tp.PromptTuningConfig)
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
    saved = tp.PeftConfig.from_dict(model.peft_config["default"].to_dict())
    assert (saved.num_virtual_tokens, saved.token_dim, saved.num_layers, saved.num_attention_heads) == (6, 12, 2, 3)


def test_label_zero_can_be_the_only_target():
    """With virtual tokens in front, label 0 is predicted (by the last virtual position), so labels whose
    only target is label 0 are valid, as in PEFT; all -100 is still an error."""
    model = tp.get_peft_model(small(), tp.PromptTuningConfig(num_virtual_tokens=2))
    ids = np.array([[4, 7, 1]])
    loss, grads = model.loss_and_grad(ids, [[4, -100, -100]])
    assert np.isfinite(loss) and np.abs(grads["prompt_embeddings"]).sum() > 0
    with pytest.raises(tp.InputError, match="every label is -100"):
        model.loss(ids, [[-100, -100, -100]])
    with pytest.raises(tp.InputError, match="every label after the first is -100"):
        model.base_model.loss(ids, [[4, -100, -100]])  # the base model has no position before token 0
