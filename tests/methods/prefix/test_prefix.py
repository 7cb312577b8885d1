"""Prefix tuning: gradients three ways, with and without the projection MLP, over random models,
prefixes (NV 1..20) and padding masks; the table's layout; a prefix holding the base model's own KV
cache of some tokens gives exactly what the base model gives with those tokens in front (positions,
mask, labels); TEXT init is that cache for the text's bytes (the projection solved to compute it), its
errors, and its fields kept out of adapter_config.json; zero init dilutes attention rather than being
the identity; no merge; only the prefix trains; PEFT's save format (the projected table); cached
generation equals the full forward."""

from __future__ import annotations

import json
import re

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
from tinypeft.generation import forward_cached
from tinypeft.gradcheck import relative_error
from tinypeft.methods import prefix as prefix_module
from tinypeft.ops import attention_forward, attention_visibility


def small(n_positions=32, **kw):
    cfg = dict(vocab_size=37, n_positions=n_positions, n_embd=12, n_layer=2, n_head=3, dtype="float64") | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


def prefix_config(NV: int, projection: bool, hidden: int | None = None, **kw) -> tp.PrefixTuningConfig:
    return tp.PrefixTuningConfig(
        num_virtual_tokens=NV, prefix_projection=projection, encoder_hidden_size=hidden if projection else None, **kw
    )


@settings(max_examples=20)
@given(virtual_token_cases(min_len=2), st.booleans(), st.integers(1, 8))
def test_gradients(case_nv, projection, hidden):
    case, NV = case_nv
    model = tp.get_peft_model(case.model, prefix_config(NV, projection, hidden), seed=case.seed)
    expected = set(prefix_module.PROJECTION_NAMES) if projection else {"prompt_embeddings"}
    assert set(model.trainable_parameters()) == expected
    assert_gradients_check(model, case.ids, mask=case.mask, output_weights=case.output_weights)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


@pytest.mark.parametrize(
    ("projection", "function_name"),
    [
        (False, "prefix_keys_values_backward"),
        (True, "prefix_keys_values_backward"),
        (True, "prefix_projection_backward"),
    ],
)
def test_checks_catch_a_wrong_prefix_backward(monkeypatch, projection, function_name):
    model = tp.get_peft_model(small(), prefix_config(3, projection, 5))
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 6))
    assert_checks_catch(monkeypatch, prefix_module, function_name, model, ids, ids)


def test_table_layout_is_layer_then_key_value_then_head_then_head_dim():
    L, NH, hs, NV, B = 3, 2, 4, 5, 2
    C = NH * hs
    table = np.arange(NV * 2 * L * C, dtype=np.float64).reshape(NV, 2 * L * C)
    layers, _ = prefix_module.prefix_keys_values_forward(table, B, L, NH)
    for i, (keys, values) in enumerate(layers):
        assert keys.shape == values.shape == (B, NH, NV, hs)
        for kv, array in enumerate((keys, values)):
            for h in range(NH):
                start = ((2 * i + kv) * NH + h) * hs
                for b in range(B):
                    np.testing.assert_array_equal(array[b, h], table[:, start : start + hs])


def table_from_kv_cache(presents) -> np.ndarray:
    """(NV, 2LC) from per-layer (keys, values) of one sequence, each (1, NH, NV, hs), in PEFT's layout,
    built independently of prefix_module: stack to (L, 2, NH, NV, hs), move NV first, flatten."""
    stacked = np.stack([np.stack([k[0], v[0]]) for k, v in presents])  # [L, 2, NH, NV, hs]
    NV = stacked.shape[3]
    return stacked.transpose(3, 0, 1, 2, 4).reshape(NV, -1)


@settings(max_examples=15)
@given(virtual_token_cases(min_len=2), st.booleans())
def test_a_prefix_holding_a_kv_cache_equals_those_tokens_in_front(case_nv, padded):
    """Take the base model's keys and values for NV tokens p as the prefix: the prefix model on ids then
    computes exactly what the base model computes for concat(p, ids) at the last T positions. This pins
    the layout, the positions (real tokens at NV..NV+T-1), the mask (prefix always visible) and the
    labels (not padded: no target for token 0)."""
    case, NV = case_nv
    base = case.model
    B, T = case.ids.shape
    mask = case.mask if padded else None
    labels = case.labels if padded else case.ids
    prefix_ids = np.random.default_rng(case.seed).integers(0, base.config.vocab_size, size=(1, NV))
    _, kv_cache = forward_cached(base.view(), prefix_ids, None)
    model = tp.get_peft_model(base, prefix_config(NV, projection=False))
    model.load_adapter_state_dict({"prompt_embeddings": table_from_kv_cache(kv_cache.keys_values)})
    full_ids = np.concatenate([np.tile(prefix_ids, (B, 1)), case.ids], axis=1)
    full_mask = None if mask is None else np.concatenate([np.ones((B, NV), dtype=mask.dtype), mask], axis=1)
    ours = model(case.ids, mask)
    assert ours.shape == (B, T, base.config.vocab_size)
    assert relative_error(ours, base(full_ids, full_mask)[:, NV:]) <= 1e-13
    full_labels = np.concatenate([np.full((B, NV + 1), -100), labels[:, 1:]], axis=1)
    if (labels[:, 1:] != -100).any():
        assert abs(model.loss(case.ids, labels, mask) - base.loss(full_ids, full_labels, full_mask)) <= 1e-13


@settings(max_examples=15)
@given(virtual_token_cases(min_len=2), st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
       max_size=30), st.booleans())  # fmt: skip
def test_text_init_is_the_base_models_keys_and_values_of_that_text(case_nv, text, projection):
    """prefix_init="TEXT": the table is the base model's KV cache after reading the text's bytes (tiled or cut
    to NV, as prompt tuning's TEXT rule), so the adapted model on ids computes what the base model computes
    for concat(text, ids); with the projection, W2 is solved so that the MLP computes that same table."""
    case, NV = case_nv
    base = perturbed_model(case.model.config.replace(vocab_size=128), case.seed)  # room for ASCII bytes
    ids = case.ids % 128
    text_ids = np.tile(np.frombuffer(text.encode(), dtype=np.uint8), NV)[:NV][None].astype(np.int64)
    _, kv_cache = forward_cached(base.view(), text_ids, None)
    expected = table_from_kv_cache(kv_cache.keys_values)
    hidden = NV + case.seed % 3 if projection else None  # the solve needs H >= NV
    config = prefix_config(NV, projection, hidden, prefix_init="TEXT", prefix_init_text=text)
    model = tp.get_peft_model(base, config, seed=case.seed)
    if projection:
        assert set(model.trainable_parameters()) == set(prefix_module.PROJECTION_NAMES)
        assert relative_error(model.active.table(), expected) <= 1e-10  # a least-squares solve, in float64
    else:
        np.testing.assert_array_equal(model.active.table(), expected)
    full = base(np.concatenate([np.tile(text_ids, (len(ids), 1)), ids], axis=1))[:, NV:]
    assert relative_error(model(ids), full) <= (1e-9 if projection else 1e-13)


def test_text_init_starts_the_shipped_base_where_that_text_leaves_it():
    """On the shipped base (float32), the default text's prefix gives the logits the base gives after it."""
    base = tp.GPT.from_pretrained(tp.SHIPPED_BASE, dtype="float64")
    text = prefix_module.DEFAULT_INIT_TEXT
    model = tp.get_peft_model(base, tp.PrefixTuningConfig(prefix_init="TEXT", prefix_init_text=text))
    ids = np.frombuffer(b"def add(a, b):\n    return a + b\n", dtype=np.uint8)[None].astype(np.int64)
    text_ids = np.frombuffer(text.encode()[:20], dtype=np.uint8)[None].astype(np.int64)
    assert relative_error(model(ids), base(np.concatenate([text_ids, ids], axis=1))[:, 20:]) <= 1e-13


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prefix_init="WORDS"), "prefix_init must be one of ('RANDOM', 'TEXT'); got 'WORDS'"),
        (dict(prefix_init="TEXT"), "prefix_init='TEXT' needs a non-empty prefix_init_text; got None"),
        (dict(prefix_init="TEXT", prefix_init_text=""), "needs a non-empty prefix_init_text"),
        (dict(prefix_init="TEXT", prefix_init_text="\udcff"), "prefix_init_text must be text"),
        (dict(prefix_init="TEXT", prefix_init_text="a", init_weights="zero"), "two initialisations; choose one"),
    ],
)
def test_text_init_config_errors(kwargs, message):
    with pytest.raises(tp.ConfigError, match=re.escape(message)):
        tp.PrefixTuningConfig(**kwargs)


def test_text_init_errors_that_need_the_base():
    base = small()  # vocab_size 37: bytes of ASCII letters are no tokens of it
    with pytest.raises(tp.ConfigError, match="prefix_init_text holds byte 104, which is no token of this model"):
        tp.get_peft_model(base, prefix_config(4, False, prefix_init="TEXT", prefix_init_text="hello"))
    text = "\x01\x02"
    with pytest.raises(tp.ConfigError, match=r"needs encoder_hidden_size >= num_virtual_tokens.*got 3 < 4"):
        tp.get_peft_model(base, prefix_config(4, True, 3, prefix_init="TEXT", prefix_init_text=text))
    tp.get_peft_model(base, prefix_config(4, True, 4, prefix_init="TEXT", prefix_init_text=text))


def test_the_init_is_recorded_but_adapter_config_json_holds_peft_s_fields_alone(tmp_path):
    """to_dict (summary.json, a run's identity) says TEXT and the text; adapter_config.json has no field PEFT
    lacks (PEFT would warn of it), and a RANDOM config's dict is as it was (golden vectors unchanged)."""
    base = perturbed_model(tp.GPTConfig(vocab_size=128, n_positions=32, n_embd=12, n_layer=2, n_head=3), 0)
    config = prefix_config(4, False, prefix_init="TEXT", prefix_init_text="Hi!")
    model = tp.get_peft_model(base, config)
    recorded = model.active.config.to_dict()
    assert recorded["prefix_init"] == "TEXT" and recorded["prefix_init_text"] == "Hi!"
    assert tp.PrefixTuningConfig.from_dict(recorded) == model.active.config
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not {"prefix_init", "prefix_init_text"} & set(saved)
    loaded = tp.PeftModel.from_pretrained(base, tmp_path)
    np.testing.assert_array_equal(loaded(np.array([[1, 2, 3]])), model(np.array([[1, 2, 3]])))
    assert not {"prefix_init", "prefix_init_text"} & set(prefix_config(4, False).to_dict())


def test_zero_init_dilutes_attention_instead_of_being_the_identity():
    """NV zero keys score 0 with every query and carry zero values, so attention output shrinks by
    S / (S + NV), S = sum over the real keys of exp(score): the model is not the base model."""
    rng = np.random.default_rng(0)
    B, T, NH, hs, NV = 2, 5, 3, 4, 6
    qkv = rng.standard_normal((B, T, 3 * NH * hs))
    zeros = np.zeros((B, NH, NV, hs))
    y0, (q, k, _, _, _, _, scale) = attention_forward(qkv, NH, attention_visibility(np, T))
    y, _ = attention_forward(qkv, NH, attention_visibility(np, T, NV), zeros, zeros)
    scores = (q @ k.swapaxes(-1, -2)) * scale  # [B, NH, T, T]
    S = np.where(np.tril(np.ones((T, T), dtype=bool)), np.exp(scores), 0.0).sum(-1)  # [B, NH, T]
    shrink = (S / (S + NV)).transpose(0, 2, 1)  # [B, T, NH]
    expected = (y0.reshape(B, T, NH, hs) * shrink[..., None]).reshape(B, T, NH * hs)
    assert relative_error(y, expected) <= 1e-14

    base = small()
    ids = np.array([[1, 2, 3, 4]])
    for projection in (False, True):
        model = tp.get_peft_model(base, prefix_config(4, projection, 6, init_weights="zero"))
        table = model.active.table()
        np.testing.assert_array_equal(table, 0.0)
        assert relative_error(model(ids), base(ids)) > 1e-3


def test_init_draws():
    base = small()
    plain = tp.get_peft_model(base, prefix_config(20, False), seed=1).active.params["prompt_embeddings"]
    assert plain.shape == (20, 2 * 2 * 12)
    assert abs(plain.mean()) < 0.1 and abs(plain.std() - 1.0) < 0.1  # N(0, 1), 960 draws
    projected = tp.get_peft_model(base, prefix_config(3, True, 7), seed=1).active.params
    shapes = {k: v.shape for k, v in projected.items()}
    assert shapes == {
        "prompt_encoder.embedding.weight": (3, 12),
        "prompt_encoder.transform.0.weight": (7, 12),  # torch.nn.Linear's (out, in)
        "prompt_encoder.transform.0.bias": (7,),
        "prompt_encoder.transform.2.weight": (48, 7),
        "prompt_encoder.transform.2.bias": (48,),
    }
    bound = 1 / np.sqrt(12)  # torch's Linear default, U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(projected["prompt_encoder.transform.0.weight"]).max() <= bound
    assert tp.get_peft_model(base, prefix_config(3, True)).active.params[prefix_module.W1].shape == (12, 12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1"),
        (dict(prefix_projection="yes"), "prefix_projection must be True or False"),
        (dict(encoder_hidden_size=0), "encoder_hidden_size must be a positive integer"),
        (dict(init_weights="ones"), "init_weights must be one of"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(tp.ConfigError, match=message):
        tp.PrefixTuningConfig(**kwargs)


def test_length_errors():
    base = small(n_positions=16)
    with pytest.raises(tp.ConfigError, match="leaves no room for tokens"):
        tp.get_peft_model(base, prefix_config(16, False))
    with pytest.raises(tp.ConfigError, match="num_layers=5, but the base model has 2"):
        tp.get_peft_model(base, prefix_config(4, False, num_layers=5))
    model = tp.get_peft_model(base, prefix_config(10, False))
    model(np.zeros((1, 6), dtype=int))
    with pytest.raises(tp.InputError, match=r"17 positions \(10 past/prefix/virtual \+ 7 tokens\)"):
        model(np.zeros((1, 7), dtype=int))


@pytest.mark.parametrize("projection", [False, True])
def test_merge_is_refused_with_the_reason(projection):
    model = tp.get_peft_model(small(), prefix_config(2, projection, 4))
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(
            tp.MergeError, match="prefix tuning cannot be merged: its prefixes are extra keys and values"
        ):
            merge()


@pytest.mark.parametrize("projection", [False, True])
def test_only_the_prefix_trains(projection):
    model = tp.get_peft_model(small(), prefix_config(4, projection, 6))
    assert_only_adapter_changes(model, vocab_size=37)


@settings(max_examples=15)
@given(virtual_token_cases(max_len=6), st.booleans(), st.integers(1, 5))
def test_greedy_generation_equals_argmax_of_the_full_forward(case_nv, projection, n_new):
    case, NV = case_nv
    base = case.model
    T = case.ids.shape[1]
    if base.config.n_positions < NV + T + n_new:
        base = perturbed_model(base.config.replace(n_positions=NV + T + n_new), case.seed)
    model = tp.get_peft_model(base, prefix_config(NV, projection, 5), seed=case.seed)
    out = model.generate(case.ids, n_new)
    assert out.shape == (case.ids.shape[0], T + n_new)
    np.testing.assert_array_equal(out, greedy_by_full_forward(model, case.ids, n_new))


def test_projection_saves_only_its_output_and_loads_back_as_a_table(tmp_path):
    base = small()
    model = tp.get_peft_model(base, prefix_config(4, True, 6), seed=2)
    table = model.active.table()
    state = model.adapter_state_dict()
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (4, 48)
    np.testing.assert_array_equal(state["prompt_embeddings"], table)
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(small(), tmp_path)
    assert loaded.peft_config["default"].prefix_projection  # the config still says how it was trained
    assert list(loaded.trainable_parameters()) == ["prompt_embeddings"]  # the MLP is gone, its output stays
    assert relative_error(loaded(ids), model(ids)) <= 1e-15
    # the projection's own tensors load too, and keep the projection
    other = tp.get_peft_model(small(), prefix_config(4, True, 6), seed=9)
    other.load_adapter_state_dict(model.active.params)
    assert set(other.trainable_parameters()) == set(prefix_module.PROJECTION_NAMES)
    np.testing.assert_array_equal(other(ids), model(ids))
    with pytest.raises(tp.CheckpointError, match="has shape"):
        other.load_adapter_state_dict({"prompt_embeddings": np.zeros((4, 47))})
    with pytest.raises(tp.CheckpointError, match="expected"):
        other.load_adapter_state_dict({"prompt_encoder.embedding.weight": np.zeros((4, 12))})


def test_save_and_load_round_trip_without_projection(tmp_path):
    model = tp.get_peft_model(small(), prefix_config(5, False), seed=3)
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(small(), tmp_path)
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
    saved = loaded.peft_config["default"].to_dict()
    assert (saved["peft_type"], saved["token_dim"], saved["num_layers"], saved["num_attention_heads"]) == (
        "PREFIX_TUNING",
        12,
        2,
        3,
    )
