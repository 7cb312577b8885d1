"""Helpers shared by the prompt, prefix, IA3 and bottleneck-adapter tests: cases with room for virtual
tokens, the gradient-report assertion, a training run, and a backward broken on purpose."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import check_gradients
from tinypeft.optim import AdamW

AUTOGRAD_TOL = 1e-10
DIRECTIONAL_TOL = 1e-6


@st.composite
def virtual_token_cases(draw, max_len: int = 12, **case_kwargs):
    """(case, NV): a random case and a number of virtual tokens in 1..20; the model is redrawn with
    n_positions = NV + T when the drawn one has no room for both."""
    case = draw(cases(max_len=max_len, **case_kwargs))
    num_virtual_tokens = draw(st.integers(1, 20))
    cfg, T = case.model.config, case.ids.shape[1]
    if cfg.n_positions < num_virtual_tokens + T:
        case.model = perturbed_model(cfg.replace(n_positions=num_virtual_tokens + T), case.seed)
    return case, num_virtual_tokens


def assert_gradients_check(model: tp.PeftModel, ids, labels=None, mask=None, output_weights=None) -> dict:
    """Hand == autograd (<= 1e-10 relative) and == a directional central difference (<= 1e-6) for every
    trainable tensor of the adapter, and for nothing else."""
    report = check_gradients(model, ids, labels=labels, attention_mask=mask, output_weights=output_weights)
    assert set(report) - {"__all__"} == set(model.trainable_parameters())
    for name, errors in report.items():
        assert errors["autograd"] <= AUTOGRAD_TOL, (name, errors)
        assert errors["directional"] <= DIRECTIONAL_TOL, (name, errors)
    return report


def assert_checks_catch(monkeypatch, module, function_name: str, model: tp.PeftModel, ids, labels) -> None:
    """Scale every gradient `module.function_name` returns by 1.001 and assert both checks notice."""
    clean = check_gradients(model, ids, labels=labels)
    assert max(e["autograd"] for e in clean.values()) <= AUTOGRAD_TOL
    original = getattr(module, function_name)

    def scaled(value):
        if isinstance(value, dict):
            return {k: scaled(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(scaled(v) for v in value)
        return None if value is None else value * 1.001

    monkeypatch.setattr(module, function_name, lambda *a, **k: scaled(original(*a, **k)))
    broken = check_gradients(model, ids, labels=labels)
    assert max(e["autograd"] for e in broken.values()) > 1e-5
    assert max(e["directional"] for e in broken.values()) > 1e-5


def train_a_few_steps(model: tp.PeftModel, vocab_size: int, steps: int = 5, seq_len: int = 8) -> None:
    """AdamW on random batches; asserts every step's gradients are exactly the trainable tensors."""
    opt = AdamW(lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = rng.integers(0, vocab_size, size=(2, seq_len))
        _, grads = model.loss_and_grad(ids, ids)
        assert set(grads) == set(model.trainable_parameters())
        opt.step(model.trainable_parameters(), grads)


def assert_only_adapter_changes(model: tp.PeftModel, vocab_size: int) -> None:
    base_before = {k: v.copy() for k, v in model.base_model.params.items()}
    adapter_before = {k: v.copy() for k, v in model.trainable_parameters().items()}
    train_a_few_steps(model, vocab_size)
    for name, value in model.base_model.params.items():
        np.testing.assert_array_equal(value, base_before[name], err_msg=name)
    for name, value in model.trainable_parameters().items():
        assert not np.array_equal(value, adapter_before[name]), f"{name} did not train"


def greedy_by_full_forward(model, ids: np.ndarray, n_new: int) -> np.ndarray:
    """Greedy continuation with no KV cache: run the whole sequence each step and take the argmax."""
    for _ in range(n_new):
        next_ids = model(ids)[:, -1].argmax(-1)
        ids = np.concatenate([ids, next_ids[:, None]], axis=1)
    return ids
