"""The engine's blocked attention (`attention_blocks.py`) equals the reference pair in ops.py.

float64, <= 1e-12 relative: the same sums of the same products, grouped differently (the score scale is
applied to q before the product rather than to the product, each block's products are smaller matmuls,
and the backward forms Σ_j p_j dp_j as Σ_d dy_d y_d). Drawn: batch, heads, head size, length, a past
(prefix tuning's keys and values), left and right padding (so queries that see no key at all), and the
block size, from one query per block to all of them.
"""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import cases
from test_engine import wrapped

from tinypeft import attention_blocks, engine, gpt, ops
from tinypeft.gradcheck import relative_error
from tinypeft.ops import causal_lm_loss_backward, causal_lm_loss_forward

TOLERANCE = 1e-12
# a gradient that is exactly zero (a key only padded queries could see, a query with one visible key)
# comes out as 0 from one kernel and 1e-16 from the other. The inputs are standard normal, so gradients
# are of order one: a difference is measured against at least that
FLOOR = 1.0


@contextlib.contextmanager
def block_bytes(n: int, min_queries: int = 1):
    """Blocks of at most n bytes of scores and min_queries queries for the length of a block (hypothesis
    draws many inputs per test, so a function-scoped monkeypatch would not do)."""
    saved = attention_blocks.BLOCK_BYTES, attention_blocks.MIN_QUERIES
    attention_blocks.BLOCK_BYTES, attention_blocks.MIN_QUERIES = n, min_queries
    try:
        yield
    finally:
        attention_blocks.BLOCK_BYTES, attention_blocks.MIN_QUERIES = saved


def attention_case(rng, B, T, NH, hs, P, left_pad, right_pad, dtype=np.float64):
    qkv = rng.standard_normal((B, T, 3 * NH * hs)).astype(dtype)
    past = (None, None)
    if P:
        past = tuple(rng.standard_normal((B, NH, P, hs)).astype(dtype) for _ in range(2))
    mask = None
    if left_pad or right_pad:
        mask = np.ones((B, P + T), dtype=bool)
        mask[0, : P + left_pad] = False  # row 0: its first queries see nothing (the past is padding too)
        mask[-1, P + T - right_pad :] = False
    visible = ops.attention_visibility(np, T, P, mask)
    dy = rng.standard_normal((B, T, NH * hs)).astype(dtype)
    return qkv, visible, past, dy


def compare(qkv, n_head, visible, past, dy):
    y_ref, cache_ref = ops.attention_forward(qkv, n_head, visible, *past)
    y, cache = attention_blocks.blocked_attention_forward(qkv, n_head, visible, *past)
    errors = {"y": relative_error(y, y_ref, FLOOR)}
    names = ("dqkv", "dpast_key", "dpast_value")
    blocked, reference = attention_blocks.blocked_attention_backward(dy, cache), ops.attention_backward(dy, cache_ref)
    for name, g, g_ref in zip(names, blocked, reference, strict=True):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            errors[name] = relative_error(g, g_ref, FLOOR)
    return errors, cache


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 40),
    NH=st.integers(1, 4),
    hs=st.integers(1, 6),
    P=st.sampled_from([0, 0, 1, 5]),
    pad=st.tuples(st.integers(0, 8), st.integers(0, 8)),
    n_bytes=st.sampled_from([1, 64, 1000, 10_000, 1 << 20]),
    min_queries=st.sampled_from([1, 4, 64]),
    seed=st.integers(0, 2**16),
)
def test_blocked_attention_equals_the_reference(B, T, NH, hs, P, pad, n_bytes, min_queries, seed):
    qkv, visible, past, dy = attention_case(
        np.random.default_rng(seed), B, T, NH, hs, P, min(pad[0], T), min(pad[1], T)
    )
    with block_bytes(n_bytes, min_queries):
        errors, _ = compare(qkv, NH, visible, past, dy)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("P", [0, 3])
def test_the_hard_cases_are_drawn_and_equal(P):
    """Blocks of some batch rows, some heads (the last group smaller) and some queries (the last block
    shorter), a past, queries that see no key: each has its own lines in the kernel; this case has all."""
    qkv, visible, past, dy = attention_case(np.random.default_rng(1), 2, 23, 3, 4, P, left_pad=6, right_pad=4)
    with block_bytes(2 * 3 * (P + 23) * 8, min_queries=3):  # two heads of three queries
        errors, cache = compare(qkv, 3, visible, past, dy)
    assert cache.block == (1, 2, 3) and cache.dead is not None and cache.dead.sum() == 6
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("step", ["uniform_weights_where_dead", "add_dead_rows_share"])
def test_the_comparison_sees_a_kernel_that_forgets_the_queries_that_see_nothing(step, monkeypatch):
    """The dead-row lines matter: without either, a left-padded row gets other numbers."""
    qkv, visible, past, dy = attention_case(np.random.default_rng(1), 2, 12, 2, 3, 0, left_pad=4, right_pad=0)
    monkeypatch.setattr(attention_blocks, "BLOCK_BYTES", 200)
    monkeypatch.setattr(attention_blocks, "MIN_QUERIES", 2)
    errors, _ = compare(qkv, 2, visible, past, dy)
    assert max(errors.values()) <= TOLERANCE
    monkeypatch.setattr(attention_blocks, step, lambda *args: None)
    errors, _ = compare(qkv, 2, visible, past, dy)
    assert max(errors.values()) > 1e-6


@settings(max_examples=12, deadline=None)
@given(case=cases(min_len=2, max_len=10), method=st.sampled_from(["full", "lora", "prefix", "prompt", "ia3"]))
def test_the_engine_step_equals_the_reference_step(case, method):
    """engine.loss_and_grad (blocked attention, a few queries a block) = the reference forward and
    backward, loss and every gradient, for methods that reach the attention in each way (none, a
    linear site, a prefix, positions in front)."""
    model = wrapped(case.model, method)
    view = model.view()
    with block_bytes(100):
        loss, grads = engine.loss_and_grad(view, case.ids, case.labels, case.mask)
    ids, mask = view.check_inputs(case.ids, case.mask)
    leading = 0 if view.sites.embedding is None else view.sites.embedding.positions(view.params)
    labels = engine.pad_labels(case.labels, leading)
    logits, cache = gpt.forward(view.params, view.config, ids, mask, view.sites)
    ref_loss, loss_cache = causal_lm_loss_forward(logits, labels)
    reference = gpt.backward(causal_lm_loss_backward(1.0, loss_cache), cache, view.trainable)
    assert abs(loss - float(ref_loss)) <= TOLERANCE * abs(float(ref_loss))
    assert set(grads) == set(reference)
    for name, g in reference.items():
        assert relative_error(grads[name], g, FLOOR) <= TOLERANCE, name


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_score_array_of_the_whole_sequence_is_ever_held():
    """At T 512 the reference holds (B, NH, T, T) weights and makes two more arrays of that size in the
    backward; the blocked kernel's peak is a few (B, T, C) arrays and one block's scores."""
    B, T, NH, hs = 2, 512, 4, 8
    qkv, visible, _, dy = attention_case(np.random.default_rng(0), B, T, NH, hs, 0, 0, 0, np.float32)
    scores = B * NH * T * T * 4

    def run(forward, backward):
        backward(dy, forward(qkv, NH, visible)[1])

    reference = peak_bytes(lambda: run(ops.attention_forward, ops.attention_backward))
    blocked = peak_bytes(
        lambda: run(attention_blocks.blocked_attention_forward, attention_blocks.blocked_attention_backward)
    )
    assert reference >= 2 * scores
    assert blocked <= scores / 2 + 2 * attention_blocks.BLOCK_BYTES
