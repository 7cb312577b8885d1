"""Properties of the base model that are cheap to state and easy to get wrong: causality, rows of a
batch computed independently, padding that changes nothing it should not, an idempotent backward,
cached generation equal to the full forward, dtypes kept, files that round-trip."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft import gpt
from tinypeft.generation import forward_cached
from tinypeft.gradcheck import relative_error


def small(dtype="float64", **kw):
    cfg = dict(vocab_size=37, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype=dtype) | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


@given(cases(min_len=2), st.data())
def test_causality(case, data):
    """Changing token t leaves every logit at positions < t unchanged (bit for bit)."""
    T = case.ids.shape[1]
    t = data.draw(st.integers(1, T - 1))
    ids2 = case.ids.copy()
    ids2[:, t] = (ids2[:, t] + 1) % case.model.config.vocab_size
    a, b = case.model(case.ids), case.model(ids2)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    if case.model.config.n_embd > 2:  # below that, ln_f maps every state to its bias
        assert not np.array_equal(a[:, t:], b[:, t:])


@given(cases(max_batch=3))
def test_rows_of_a_batch_are_independent(case):
    full = case.model(case.ids, case.mask)
    for b in range(case.ids.shape[0]):
        mask = None if case.mask is None else case.mask[b : b + 1]
        single = case.model(case.ids[b : b + 1], mask)
        assert relative_error(full[b], single[0]) <= 1e-13


def test_right_padding_changes_nothing_before_it():
    model = small()
    ids = np.random.default_rng(0).integers(0, 37, size=(1, 10))
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    padded = model(ids, mask)
    unpadded = model(ids[:, :7])
    assert relative_error(padded[:, :7], unpadded) <= 1e-13


def test_backward_twice_gives_the_same_gradients():
    model = small()
    ids = np.random.default_rng(1).integers(0, 37, size=(2, 9))
    loss1, g1 = model.loss_and_grad(ids, ids)
    loss2, g2 = model.loss_and_grad(ids, ids)
    assert loss1 == loss2
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    # and backward from one cache twice: fresh arrays, nothing accumulated in place
    view = model.view()
    logits, cache = gpt.forward(view.params, view.config, ids)
    dlogits = np.random.default_rng(2).standard_normal(logits.shape)
    a = gpt.backward(dlogits, cache, view.trainable)
    b = gpt.backward(dlogits, cache, view.trainable)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@given(cases(max_len=10), st.integers(1, 6))
def test_greedy_generation_equals_argmax_of_the_full_forward(case, n_new):
    model = case.model
    T = case.ids.shape[1]
    n_new = min(n_new, model.config.n_positions - T)
    out = model.generate(case.ids, n_new)
    ids = case.ids
    for _ in range(n_new):
        next_ids = model(ids)[:, -1].argmax(-1)
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)


def test_kv_cache_matches_the_full_forward():
    model = small()
    ids = np.random.default_rng(3).integers(0, 37, size=(2, 12))
    full = model(ids)
    view = model.view()
    logits, kv = forward_cached(view, ids[:, :7], None)
    pieces = [logits]
    for t in range(7, 12):
        logits, kv = forward_cached(view, ids[:, t : t + 1], kv)
        pieces.append(logits)
    assert relative_error(np.concatenate(pieces, axis=1), full) <= 1e-13


def test_sampling_is_seeded_and_top_k_is_respected():
    model = small()
    ids = np.zeros((2, 3), dtype=int)
    a = model.generate(ids, 8, temperature=1.0, top_k=3, seed=5)
    b = model.generate(ids, 8, temperature=1.0, top_k=3, seed=5)
    np.testing.assert_array_equal(a, b)
    first = model(ids)[:, -1]
    allowed = np.argsort(first, axis=-1)[:, -3:]
    assert all(a[i, 3] in allowed[i] for i in range(2))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_kept_everywhere(dtype):
    model = small(dtype)
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 9))
    assert model(ids).dtype == dtype
    _, grads = model.loss_and_grad(ids, ids)
    assert {g.dtype for g in grads.values()} == {np.dtype(dtype)}
    assert {p.dtype for p in model.params.values()} == {np.dtype(dtype)}


def test_float32_agrees_with_float64():
    m64 = small("float64")
    m32 = tp.GPT(m64.config.replace(dtype="float32"))
    m32.load_state_dict(m64.state_dict())
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 9))
    assert relative_error(m32(ids), m64(ids)) <= 1e-5
    l32, g32 = m32.loss_and_grad(ids, ids)
    l64, g64 = m64.loss_and_grad(ids, ids)
    assert abs(l32 - l64) <= 1e-5 * abs(l64)
    for k in g64:
        assert relative_error(g32[k], g64[k]) <= 1e-3, k  # LayerNorm sums over B*T are the loosest


def test_state_dict_names_shapes_and_init():
    cfg = tp.GPTConfig(vocab_size=50, n_positions=16, n_embd=8, n_layer=3, n_head=2)
    model = tp.GPT(cfg, seed=0)
    sd = model.state_dict()
    assert list(sd)[:3] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"]
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)
    assert sd["transformer.h.2.mlp.c_proj.weight"].shape == (32, 8)
    assert "lm_head.weight" not in sd
    np.testing.assert_array_equal(sd["transformer.h.0.ln_1.weight"], 1.0)
    np.testing.assert_array_equal(sd["transformer.h.0.attn.c_attn.bias"], 0.0)
    big = tp.GPT(tp.GPTConfig(vocab_size=300, n_positions=64, n_embd=256, n_layer=8, n_head=4), seed=0).params
    assert abs(big["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 1e-3
    assert abs(big["transformer.h.0.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(16)) < 2e-4
    assert tp.GPT(cfg, seed=0).state_dict().keys() == sd.keys()
    np.testing.assert_array_equal(tp.GPT(cfg, seed=0).params["transformer.wte.weight"], sd["transformer.wte.weight"])


def test_save_and_load_round_trip(tmp_path):
    model = small("float32")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = tp.GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for k, v in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)


def test_gpt2_model_names_without_the_transformer_prefix_load():
    model = small()
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["wte.weight"]
    other = tp.GPT(model.config, seed=9)
    other.load_state_dict(sd)
    for k, v in model.params.items():
        np.testing.assert_array_equal(other.params[k], v)
