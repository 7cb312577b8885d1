"""tinypeft's GPT against transformers' GPT2LMHeadModel with the same weights, in float64:
logits, loss and every parameter's gradient agree to <= 1e-10 relative (measured ~1e-15), with and
without a padding mask; checkpoints written by either load in the other with equal logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_utils import hf_causal_lm_loss, hf_twin
from hypothesis import given, settings
from strategies import cases, perturbed_model
from transformers import GPT2LMHeadModel

import tinypeft as tp
from tinypeft.gradcheck import relative_error

TOL = 1e-10  # both sides compute the same float64 formulas; measured differences are ~1e-15


def visible_rows(mask, shape):
    """Positions whose query sees at least one key: a left-padding query sees none, and what it
    computes there (uniform attention, in both libraries) is no one's business."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    return np.cumsum(mask, axis=1) > 0


@settings(max_examples=15)
@given(cases(min_len=2))
def test_logits_loss_and_gradients_match_transformers(case):
    model = case.model
    hf = hf_twin(model)
    ids = torch.tensor(case.ids)
    mask = None if case.mask is None else torch.tensor(case.mask)
    out = hf(input_ids=ids, attention_mask=mask)
    rows = visible_rows(case.mask, case.ids.shape)
    ours = model(case.ids, case.mask)
    assert relative_error(ours[rows], out.logits.detach().numpy()[rows]) <= TOL
    # fully hidden rows: both libraries give the query uniform weights
    assert relative_error(ours, out.logits.detach().numpy()) <= TOL

    # a query on left padding sees no key: the two libraries' gradients differ there by design
    # (test_a_query_that_sees_nothing below), so no target here is predicted from such a position
    labels_np = case.labels.copy()
    labels_np[:, 1:][~rows[:, :-1]] = -100
    if not (labels_np[:, 1:] != -100).any():
        return
    case.labels = labels_np
    labels = torch.tensor(labels_np)
    loss_ref = hf_causal_lm_loss(out.logits, labels)
    loss_ref.backward()
    loss, grads = model.loss_and_grad(case.ids, case.labels, case.mask)
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    hf_params = dict(hf.named_parameters())
    assert set(grads) == set(hf_params)  # the tied lm_head shares wte's parameter, so it is not listed
    # a tensor with a gradient under 1/1000 of the largest is compared on that scale: with one
    # feature, LayerNorm's dweight is exactly 0 here and 1e-15 in torch
    floor = 1e-3 * max(np.linalg.norm(g) for g in grads.values())
    for name, g in grads.items():
        assert relative_error(g, hf_params[name].grad.numpy(), floor) <= TOL, name


def test_sdpa_attention_agrees_too():
    model = perturbed_model(
        tp.GPTConfig(vocab_size=50, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 0
    )
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding only: every query sees something
    hf = hf_twin(model, attn_implementation="sdpa")
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert relative_error(model(ids, mask), ref) <= TOL


def test_transformers_checkpoint_loads_here(tmp_path):
    model = perturbed_model(
        tp.GPTConfig(vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2, dtype="float64"), 1
    )
    hf = hf_twin(model)
    hf.save_pretrained(tmp_path)
    loaded = tp.GPT.from_pretrained(tmp_path)
    assert loaded.config.dtype == "float64"
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 7))
    ref = hf(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert relative_error(loaded(ids), ref) <= TOL


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_our_checkpoint_loads_in_transformers(tmp_path, dtype):
    model = perturbed_model(tp.GPTConfig(vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2, dtype=dtype), 2)
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").double().eval()
    ids = np.random.default_rng(0).integers(0, 40, size=(2, 7))
    ref = hf(input_ids=torch.tensor(ids)).logits.detach().numpy()
    ours = tp.GPT.from_pretrained(tmp_path, dtype="float64")(ids)
    assert relative_error(ours, ref) <= TOL
    assert tp.GPT.from_pretrained(tmp_path).config.dtype == dtype


def test_a_query_that_sees_nothing():
    """Left padding: position 0 is a pad, so its query sees no key. Both libraries give it uniform
    attention (equal logits). If a loss reads that position, transformers' gradient through its
    scores is not the derivative of the forward (finite differences say so); tinypeft's is."""
    from tinypeft.gradcheck import check_gradients

    model = perturbed_model(
        tp.GPTConfig(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, dtype="float64"), 4
    )
    ids = np.array([[5, 3, 7, 1, 2]])
    mask = np.array([[0, 1, 1, 1, 1]])
    labels = ids.copy()  # position 0 (hidden) predicts token 1: the loss reads a hidden position
    hf = hf_twin(model)
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert relative_error(model(ids, mask), out.logits.detach().numpy()) <= TOL
    hf_causal_lm_loss(out.logits, torch.tensor(labels)).backward()
    _, grads = model.loss_and_grad(ids, labels, mask)
    report = check_gradients(model, ids, labels=labels, attention_mask=mask)
    assert max(e["directional"] for e in report.values()) <= 1e-6  # ours is the derivative
    hf_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    differ = {n for n, g in grads.items() if relative_error(g, hf_grads[n]) > TOL}
    # the extra gradient enters through q and k, so only c_attn and what lies below it can differ
    below_scores = {"attn.c_attn.weight", "attn.c_attn.bias", "ln_1.weight", "ln_1.bias", "wte.weight", "wpe.weight"}
    assert "transformer.h.0.attn.c_attn.weight" in differ
    assert {n.removeprefix("transformer.").removeprefix("h.0.") for n in differ} <= below_scores, differ
