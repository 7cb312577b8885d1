"""Several LoRA adapters active at once (`set_adapter([...])`, tinypeft/methods/lora_multi.py): their updates add.

- Gradients three ways over drawn models, paddings and sets of two or three adapters (ranks, scalings, rsLoRA,
  targets, dropout): hand-written == autograd of the shipped forward (<= 1e-10 relative) and == a fourth-order
  finite difference along random directions (<= 1e-6); and the checks fail when one rule of the backward is off
  by 0.1%.
- The updates add: the logits equal the base's with W + Σ_i s_i (B_i A_i)ᵀ, merged or not; unmerge restores.
- Against PEFT 0.21.2 with the same adapters active (`base_model.set_adapter([...])`), float64, the same dropout
  masks: logits, loss and every tensor's gradient under PEFT's in-memory names, and the merged weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_utils import hf_causal_lm_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_strategies import well_conditioned_cases
from multi_adapters import peft_twin, small_base, with_adapters

import tinypeft as tp
import tinypeft.methods.lora_multi as lora_multi
from tinypeft import engine
from tinypeft.errors import ConfigError
from tinypeft.gradcheck import check_gradients, model_loss_fn, relative_error
from tinypeft.methods.lora_combine import lora_delta
from tinypeft.optim import AdamW

AUTOGRAD_TOL = 1e-10
DIRECTIONAL_TOL = 1e-6
PEFT_TOL = 1e-10  # the same float64 formulas; measured ~1e-15
TARGETS = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "c_proj")


@st.composite
def several_configs(draw, n_embd: int, dropout: bool = True) -> dict[str, tp.LoraConfig]:
    """Two or three plain or rsLoRA configs, each with its own rank, scaling, targets and dropout; adapter names
    that are not substrings of PEFT's prefix "lora_" (PEFT warns about those)."""
    configs = {}
    for name in ["first", "second", "third"][: draw(st.integers(2, 3))]:
        r, rs = draw(st.integers(1, min(3, n_embd))), draw(st.booleans())
        scaling = draw(st.sampled_from([0.5, 1, 2]))
        configs[name] = tp.LoraConfig(
            r=r,
            lora_alpha=scaling * (np.sqrt(r) if rs else r),
            use_rslora=rs,
            lora_dropout=draw(st.sampled_from([0.0, 0.3])) if dropout else 0.0,
            target_modules=draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True)),
            init_lora_weights=False,
        )
    return configs


def several(case, configs, train: bool = True) -> tp.PeftModel:
    model = with_adapters(case.model, configs, seed=case.seed)
    model.set_adapter(list(configs))
    return model.train(train)


def max_error(report, column):
    return max(errors[column] for errors in report.values())


@given(case=well_conditioned_cases(min_len=2), data=st.data())
def test_gradients_three_ways(case, data):
    configs = data.draw(several_configs(case.model.config.n_embd))
    model = several(case, configs)
    report = check_gradients(model, case.ids, labels=case.labels, attention_mask=case.mask, seed=case.seed)
    expected = {lora_multi.in_memory_name(k, n) for n in configs for k in model.adapters[n].params}
    assert set(report) - {"__all__"} == expected == set(model.trainable_parameters())
    assert max_error(report, "autograd") <= AUTOGRAD_TOL, report
    assert max_error(report, "directional") <= DIRECTIONAL_TOL, report


@settings(max_examples=10)
@given(case=well_conditioned_cases(min_len=2), data=st.data())
def test_loss_and_grad_on_row_blocks_equals_the_reference(case, data):
    """The public loss_and_grad (validation, row blocks on threads, the engine) equals the reference forward and
    backward on the whole batch to 1e-12; and twice gives the same gradients."""
    model = several(case, data.draw(several_configs(case.model.config.n_embd, dropout=False)), train=False)
    loss, grads = model.loss_and_grad(case.ids, case.labels, case.mask)
    ref_loss, ref_grads = model_loss_fn(model.view(), case.ids, case.labels, case.mask)[1]()
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert relative_error(g, ref_grads[name]) <= 1e-12, name
    again = model.loss_and_grad(case.ids, case.labels, case.mask)[1]
    assert all(np.array_equal(again[k], g) for k, g in grads.items())


@pytest.mark.parametrize(("index", "part"), [(0, None), (1, 0), (1, 1)])
def test_checks_catch_a_small_error_in_the_sum_backward(monkeypatch, index, part):
    """dx, one adapter's dA or one adapter's dB off by 0.1% fails the autograd check."""
    base = small_base()
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 9))
    configs = {
        "first": tp.LoraConfig(r=2, init_lora_weights=False, target_modules=["c_attn", "mlp.c_fc"], lora_dropout=0.2),
        "second": tp.LoraConfig(r=1, lora_alpha=3, init_lora_weights=False, target_modules=["c_attn"]),
    }
    model = with_adapters(base, configs)
    model.set_adapter(["first", "second"])
    model.train()
    assert max_error(check_gradients(model, ids, labels=ids), "autograd") <= AUTOGRAD_TOL
    original = lora_multi.lora_sum_backward

    def broken(*args, **kwargs):
        dx, grads = original(*args, **kwargs)
        if index == 0:
            return dx * 1.001, grads
        first = tuple(g * 1.001 if i == part else g for i, g in enumerate(grads[0]))  # the first adapter's only
        return dx, [first, *grads[1:]]

    monkeypatch.setattr(lora_multi, "lora_sum_backward", broken)
    assert max_error(check_gradients(model, ids, labels=ids), "autograd") > 1e-5


# ------------------------------------------------------------------ the updates add
def three_adapters() -> tp.PeftModel:
    configs = {
        "first": tp.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["c_attn", "c_proj"]),
        "second": tp.LoraConfig(r=3, lora_alpha=2, use_rslora=True, init_lora_weights=False, target_modules=["c_attn"]),
        "third": tp.LoraConfig(r=1, init_lora_weights=False, target_modules=["mlp.c_fc"]),
    }
    return with_adapters(small_base(), configs)


IDS = np.random.default_rng(1).integers(0, 31, size=(3, 8))


def test_the_updates_add_merged_or_not():
    model = three_adapters()
    names = ["first", "second", "third"]
    params = dict(model.base_model.params)
    for name in names:
        adapter = model.adapters[name]
        for layer in adapter.layers:
            params[layer.weight] = params[layer.weight] + lora_delta(adapter, layer)
    by_hand = tp.GPT.with_params(model.base_model.config, np, params)(IDS)
    model.set_adapter(names)
    assert relative_error(model(IDS), by_hand) <= 1e-12
    assert relative_error(model.merge_and_unload()(IDS), by_hand) <= 1e-12
    before = dict(model.base_model.params)
    model.merge_adapter()
    assert relative_error(model(IDS), by_hand) <= 1e-12
    model.unmerge_adapter()
    assert all(model.base_model.params[k] is v for k, v in before.items())  # restored, not recomputed
    model.set_adapter("second")  # one again: its own update only
    assert relative_error(model(IDS), three_adapters_alone("second")) <= 1e-15


def three_adapters_alone(name: str):
    model = three_adapters()
    model.set_adapter(name)
    return model(IDS)


def test_training_several_updates_each_adapter_s_own_arrays():
    model = three_adapters()
    model.set_adapter(["first", "third"])
    model.train()
    params = model.trainable_parameters()
    assert (
        params["base_model.model.transformer.h.0.attn.c_attn.lora_A.first.weight"]
        is model.adapters["first"].params["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    )
    second = {k: v.copy() for k, v in model.adapters["second"].params.items()}
    optimizer = AdamW(lr=1e-2)
    for _ in range(3):
        _, grads = model.loss_and_grad(IDS, IDS)
        optimizer.step(params, grads)
    assert all(np.array_equal(v, second[k]) for k, v in model.adapters["second"].params.items())
    line = model.trainable_parameters_line()
    n = sum(v.size for v in params.values())
    assert line.startswith(f"trainable params: {n:,d} ||")


# ------------------------------------------------------------------ against PEFT
class FixedDropout(torch.nn.Module):
    def __init__(self, keep: np.ndarray) -> None:
        super().__init__()
        self.keep = torch.tensor(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


@settings(max_examples=10)
@given(case=well_conditioned_cases(min_len=2, padding=False), data=st.data())
def test_logits_loss_gradients_and_merge_match_peft(case, data):
    configs = data.draw(several_configs(case.model.config.n_embd))
    model = several(case, configs)
    twin = peft_twin(model)
    twin.base_model.set_adapter(list(configs))
    twin.train()  # GPT-2's own dropouts are 0 in the twin: only the LoRA branches drop, with our masks
    view = model.view()
    site = next(iter(view.sites.linear.values()))
    for name in configs:
        for layer in model.adapters[name].layers:
            keep = site.keep_mask(name, layer.module, (*case.ids.shape, layer.in_features))
            module = twin.base_model.model.get_submodule(layer.module)
            module.lora_dropout[name] = FixedDropout(np.ones(1) if keep is None else keep)
    out = twin(input_ids=torch.tensor(case.ids))
    assert relative_error(engine.logits(view, case.ids), out.logits.detach().numpy()) <= PEFT_TOL
    loss_ref = hf_causal_lm_loss(out.logits, torch.tensor(case.labels))
    loss_ref.backward()
    loss, grads = engine.loss_and_grad(view, case.ids, case.labels)
    assert abs(loss - loss_ref.item()) <= PEFT_TOL * abs(loss_ref.item())
    peft_grads = {n: p.grad.numpy() for n, p in twin.named_parameters() if p.requires_grad}
    assert set(grads) == set(peft_grads)
    for name, g in grads.items():
        assert relative_error(g, peft_grads[name]) <= PEFT_TOL, name
    ours = model.merge_and_unload().params
    theirs = twin.eval().merge_and_unload().state_dict()
    for name, value in ours.items():
        assert relative_error(value, theirs[name].numpy()) <= 1e-12, name


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("config", "says"),
    [
        (tp.LoraConfig(r=2, use_dora=True), "DoRA"),
        (tp.LoraConfig(r=2, init_lora_weights="pissa"), "PiSSA"),
        (tp.LoraConfig(r=2, bias="lora_only"), "trains biases"),
        (tp.IA3Config(), "it is IA3"),
    ],
)
def test_adapters_whose_updates_do_not_add_are_refused(config, says):
    model = three_adapters()
    model.add_adapter("other", config)
    with pytest.raises(ConfigError, match=says):
        model.set_adapter(["first", "other"])
    assert model.active_adapters == ["first"]


def test_active_names_one_adapter_only():
    model = three_adapters()
    model.set_adapter(["first", "second"])
    assert model.active_adapter == "first"
    with pytest.raises(ConfigError, match="several adapters are active"):
        _ = model.active
    with pytest.raises(ConfigError, match="distinct names"):
        model.set_adapter(["first", "first"])
    model.delete_adapter("first")
    assert model.active_adapters == ["second"]
