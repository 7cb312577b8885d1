"""LoHa and LoKr against peft 0.21.2 + transformers in float64.

PEFT's LoHa and LoKr take nn.Linear (and convolutions) only: on GPT-2's Conv1D `get_peft_model` raises
TypeError. So the twin here is `hf_utils.linear_twin`: the transformers GPT-2 of the same weights with
every Conv1D replaced by the nn.Linear computing the same thing (weight transposed, same module names).
On it, PEFT's model holds our tensors as they are (PEFT's shapes are those of that Linear), and logits,
the loss (the float64 shifted cross-entropy, computed here) and every factor's gradient agree to <= 1e-10
relative (measured ~1e-15), in eval mode and in training mode with rank and module dropout (PEFT's
torch.rand handed our draws); merged weights equal PEFT's merge_and_unload, transposed, to <= 1e-12.
Adapters saved by either library load in the other with equal logits.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import peft
import pytest
import torch
from hf_utils import hf_causal_lm_loss, hf_twin, linear_twin, torch_float64
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lycoris_strategies import FixedRand, loha_configs, lokr_configs, peft_draws, perturb_adapter
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft import engine
from tinypeft.gradcheck import relative_error
from tinypeft.methods.lokr import factorization

TOL = 1e-10  # the same float64 formulas on both sides; measured differences are ~1e-15
MERGE_TOL = 1e-12
PEFT_CONFIGS = {"LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig}
LAYER_MODULES = {"LOHA": peft.tuners.loha.layer, "LOKR": peft.tuners.lokr.layer}


@contextlib.contextmanager
def peft_rand(peft_type: str, draws):
    """PEFT's LoHa/LoKr layer file draws its dropouts with torch.rand: hand it `draws` instead."""
    module = LAYER_MODULES[peft_type]
    module.torch = FixedRand(draws)
    try:
        yield module.torch
    finally:
        module.torch = torch


def peft_config(config: tp.PeftConfig):
    """PEFT's config of the same type from our adapter_config.json dict."""
    d = config.to_dict()
    return PEFT_CONFIGS[d["peft_type"]](
        **{k: v for k, v in d.items() if k not in ("peft_type", "base_model_name_or_path")}
    )


def peft_twin(model: tp.PeftModel) -> peft.PeftModel:
    """PEFT's model on the Linear twin of `model`'s base, holding exactly our adapter tensors, float64."""
    with torch_float64():
        twin = peft.get_peft_model(linear_twin(model.base_model), peft_config(model.active.config))
    state = {k: torch.tensor(np.asarray(v)) for k, v in model.adapter_state_dict().items()}
    result = peft.set_peft_model_state_dict(twin, state)
    assert not result.unexpected_keys, result.unexpected_keys
    theirs = {n.replace(".default", "") for n, p in twin.named_parameters() if p.requires_grad}
    assert theirs == set(state)  # the same trainable tensors, one to one, under the same names
    return twin.eval()


def visible_labels(labels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Drop targets predicted from a query that sees no key (left padding, nothing in front): the two
    libraries' gradients differ there by design (see test_hf_gpt2.test_a_query_that_sees_nothing)."""
    if mask is None:
        return labels
    labels = labels.copy()
    labels[:, 1:][~(np.cumsum(mask, axis=1) > 0)[:, :-1]] = -100
    return labels


def peft_rounds_rescaled_rows(config) -> bool:
    """PEFT's LoKr makes its rank-dropout mask with `.float()`, so the kept rows' 1/fraction is float32 even in
    a float64 model (LoHa's mask takes the weight's dtype)."""
    return config.peft_type == "LOKR" and config.rank_dropout > 0 and config.rank_dropout_scale


def rounded_to_float32(draw):
    """A site's `draw` whose rank-dropout multiplier is rounded to float32 as PEFT's LoKr computes it."""

    def rounded(module):
        applied, keep = draw(module)
        return applied, None if keep is None else keep.astype(np.float32).astype(keep.dtype)

    return rounded


def compare(model: tp.PeftModel, twin, ids, labels, mask) -> dict[str, float]:
    """Relative differences of logits (rows that see something), loss and every factor's gradient, with
    the model in whichever mode it is: in training mode PEFT draws what our one view drew."""
    view = model.view()
    site = next(iter(view.sites.linear.values()))  # one site object serves every targeted layer
    draws = peft_draws(site) if model.training else iter(())
    if model.training and peft_rounds_rescaled_rows(model.active.config):
        site.draw = rounded_to_float32(site.draw)
    twin.train(model.training)
    with torch_float64(), peft_rand(model.active.config.peft_type, draws) as rand:
        out = twin(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    assert not rand.draws, "PEFT drew fewer numbers than tinypeft"
    rows = np.ones(ids.shape, dtype=bool) if mask is None else np.cumsum(mask, axis=1) > 0
    diffs = {"logits": relative_error(engine.logits(view, ids, mask)[rows], out.logits.detach().numpy()[rows])}
    loss_ref = hf_causal_lm_loss(out.logits, torch.tensor(labels))
    if loss_ref.requires_grad:  # not when module dropout skipped every layer
        loss_ref.backward()
    loss, grads = engine.loss_and_grad(view, ids, labels, mask)
    grads = view.public(grads)
    diffs["loss"] = abs(loss - loss_ref.item()) / abs(loss_ref.item())
    reference = {n.replace(".default", ""): p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert set(grads) == set(reference)
    floor = 1e-3 * max(np.linalg.norm(g) for g in grads.values())  # as test_additive_peft
    for name, g in grads.items():
        theirs = np.zeros_like(g) if reference[name] is None else reference[name].numpy()
        diffs[name] = relative_error(g, theirs, floor)
    return diffs


def assert_close(diffs: dict[str, float], tol: float = TOL) -> None:
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    assert not bad, bad


def small_base(seed: int = 3, **kw) -> tp.GPT:
    cfg = dict(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64") | kw
    return perturbed_model(tp.GPTConfig(**cfg), seed)


IDS = np.array([[3, 1, 4, 1, 5, 9, 2], [2, 6, 5, 3, 5, 8, 9]])


# ------------------------------------------------------------------ the twin
def test_the_linear_twin_computes_what_the_conv1d_twin_does():
    base = small_base(n_embd=9, n_inner=13)
    linear, conv = linear_twin(base), hf_twin(base)
    assert isinstance(linear.transformer.h[0].attn.c_attn, torch.nn.Linear)
    w = linear.transformer.h[1].mlp.c_fc.weight.detach().numpy()
    np.testing.assert_array_equal(w, base.params["transformer.h.1.mlp.c_fc.weight"].T)  # (out, in) = (in, out)ᵀ
    ids = torch.tensor(IDS)
    ref = conv(input_ids=ids).logits.detach().numpy()
    assert relative_error(linear(input_ids=ids).logits.detach().numpy(), ref) <= 1e-14
    assert relative_error(base(IDS), ref) <= 1e-13


@pytest.mark.parametrize("peft_type", sorted(PEFT_CONFIGS))
def test_peft_refuses_gpt2_s_conv1d(peft_type):
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(hf_twin(small_base()), PEFT_CONFIGS[peft_type](target_modules=["c_attn"]))


# ------------------------------------------------------------------ logits, loss, gradients, merge
def matches_peft(case, config, training):
    labels = visible_labels(case.labels, case.mask)
    assume((labels[:, 1:] != -100).any())
    model = tp.get_peft_model(case.model, config, seed=case.seed).train(training)
    perturb_adapter(model, case.seed)
    assert_close(compare(model, peft_twin(model), case.ids, labels, case.mask))


@settings(max_examples=20)
@given(cases(min_len=2, min_embd=3), loha_configs(dropout=True), st.booleans())
def test_loha_matches_peft(case, config, training):
    matches_peft(case, config, training)


@settings(max_examples=20)
@given(cases(min_len=2, min_embd=3), lokr_configs(dropout=True), st.booleans())
def test_lokr_matches_peft(case, config, training):
    matches_peft(case, config, training)


@settings(max_examples=10)
@given(cases(min_len=2, min_embd=3), st.one_of(loha_configs(), lokr_configs()))
def test_merge_matches_peft(case, config):
    model = tp.get_peft_model(case.model, config, seed=case.seed)
    perturb_adapter(model, case.seed)
    twin = peft_twin(model)
    ours = model.merge_and_unload().params
    with torch_float64():
        theirs = twin.merge_and_unload().state_dict()
    for name, value in ours.items():
        reference = theirs[name].numpy()
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):  # a Linear's (out, in)
            reference = reference.T
        assert relative_error(value, reference) <= MERGE_TOL, name


@pytest.mark.parametrize("init_weights", [True, False])
def test_loha_init_matches_peft_s_rule(init_weights):
    """The same tensors, shapes and zeros as PEFT's init, and values inside the same kaiming bounds (the
    draws themselves come from another generator)."""
    base = small_base()
    config = tp.LoHaConfig(r=4, target_modules=["c_attn", "mlp.c_proj"], init_weights=init_weights)
    ours = tp.get_peft_model(base, config).adapter_state_dict()
    torch.manual_seed(0)
    with torch_float64():
        theirs = peft.get_peft_model_state_dict(peft.get_peft_model(linear_twin(base), peft_config(config)))
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for name, value in ours.items():
        reference = theirs[name].numpy()
        assert (not value.any()) == (not reference.any()), name
        bound = 1 / math.sqrt(value.shape[1])
        assert np.abs(value).max() <= bound and np.abs(reference).max() <= bound, name
    if init_weights:  # both start as the base model
        np.testing.assert_array_equal(tp.get_peft_model(base, config)(IDS), base(IDS))


def test_peft_s_loha_rounds_its_scale_to_torch_s_default_dtype():
    """PEFT's LoHa multiplies by torch.tensor(alpha / r), made in torch's default dtype: float32 unless told,
    even in a float64 model, so s = 5/3 is rounded (relative 2e-8). tinypeft keeps s in the model's dtype;
    the comparisons here run PEFT with float64 as torch's default, where the two agree to rounding."""
    model = tp.get_peft_model(small_base(), tp.LoHaConfig(r=3, alpha=5, init_weights=False))
    twin = peft_twin(model)
    with torch.no_grad():
        as_float32 = twin(input_ids=torch.tensor(IDS)).logits.numpy()
    assert 1e-9 < relative_error(model(IDS), as_float32) < 1e-6
    assert relative_error(model(IDS), peft_logits(twin, IDS)) <= 1e-14


def test_peft_s_lokr_rescales_dropped_rows_in_float32():
    """PEFT's LoKr divides its rank-dropout mask by the fraction kept in float32 (the mask is `.float()`), even
    in a float64 model: its delta is then off by float32's rounding (~1e-8). tinypeft divides in the model's
    dtype; with its multiplier rounded the same way, the two agree to 1e-15 (test_lokr_matches_peft)."""
    config = tp.LoKrConfig(r=2, rank_dropout=0.3, rank_dropout_scale=True, init_weights=False, target_modules=["c_fc"])
    model = tp.get_peft_model(small_base(), config).train()
    perturb_adapter(model, 0)
    twin = peft_twin(model)
    view = model.view()
    site = next(iter(view.sites.linear.values()))
    keeps = [site.draw(layer.module)[1] for layer in model.active.layers]
    assert any(k.max() != np.float32(k.max()) for k in keeps)  # a multiplier float32 cannot hold
    twin.train()
    with torch_float64(), peft_rand("LOKR", peft_draws(site)), torch.no_grad():
        theirs = twin(input_ids=torch.tensor(IDS)).logits.numpy()
    assert 1e-12 < relative_error(engine.logits(view, IDS, None), theirs) < 1e-6


@pytest.mark.parametrize("init_weights", [True, "lycoris", False])
@pytest.mark.parametrize("shape", [{"r": 1, "decompose_both": True}, {"r": 8}, {"r": 2, "decompose_factor": 4}])
def test_lokr_init_matches_peft_s_rule(init_weights, shape):
    """The same tensors (which factors are low-rank), shapes and zeros as PEFT's init, values inside the same
    kaiming bounds."""
    base = small_base()
    config = tp.LoKrConfig(target_modules=["c_attn", "c_fc"], init_weights=init_weights, **shape)
    ours = tp.get_peft_model(base, config).adapter_state_dict()
    torch.manual_seed(0)
    with torch_float64():
        theirs = peft.get_peft_model_state_dict(peft.get_peft_model(linear_twin(base), peft_config(config)))
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for name, value in ours.items():
        reference = theirs[name].numpy()
        assert (not value.any()) == (not reference.any()), name
        bound = 1 / math.sqrt(value.shape[1])
        assert np.abs(value).max() <= bound and np.abs(reference).max() <= bound, name


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for factor in (-1, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 64, 1000):
        for dimension in range(1, 1025):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


# ------------------------------------------------------------------ files, both ways
def file_cases() -> dict[str, tp.PeftConfig]:
    return {
        "lokr": tp.LoKrConfig(r=2, alpha=3, init_weights=False),
        "lokr_both_factor": tp.LoKrConfig(
            r=1, decompose_both=True, decompose_factor=2, target_modules=["c_proj", "c_fc"]
        ),
        "lokr_full_lycoris": tp.LoKrConfig(
            r=6, alpha=2, init_weights="lycoris", rank_dropout=0.2, rank_dropout_scale=True
        ),
        "loha": tp.LoHaConfig(r=3, alpha=5, init_weights=False),
        "loha_all_linear": tp.LoHaConfig(r=2, alpha=1, target_modules=["c_attn", "c_proj", "c_fc"], rank_dropout=0.1),
        "loha_regex": tp.LoHaConfig(r=5, target_modules=r"transformer\.h\.1\.mlp\.c_\w+", module_dropout=0.2),
    }


def peft_logits(twin, ids) -> np.ndarray:
    with torch.no_grad(), torch_float64():
        return twin.eval()(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", sorted(file_cases()))
def test_our_adapter_loads_in_peft(tmp_path, name):
    config = file_cases()[name]
    model = tp.get_peft_model(small_base(), config)
    perturb_adapter(model, 0)
    model.save_pretrained(tmp_path)
    with torch_float64():
        loaded = peft.PeftModel.from_pretrained(linear_twin(small_base()), tmp_path)
    assert loaded.peft_config["default"].peft_type == config.peft_type
    assert relative_error(model(IDS), peft_logits(loaded, IDS)) <= TOL


@pytest.mark.parametrize("name", sorted(file_cases()))
def test_a_peft_adapter_loads_here(tmp_path, name):
    config = file_cases()[name]
    torch.manual_seed(0)
    with torch_float64():
        trained = peft.get_peft_model(linear_twin(small_base()), peft_config(config))
    with torch.no_grad():  # move every tensor off its init, as training would
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trained.save_pretrained(tmp_path)
    ours = tp.PeftModel.from_pretrained(small_base(), tmp_path)
    assert relative_error(ours(IDS), peft_logits(trained, IDS)) <= TOL
    again = tp.get_peft_model(small_base(), ours.peft_config["default"])
    again.load_adapter_state_dict(peft.get_peft_model_state_dict(trained))  # the in-memory state dict, as it is
    assert relative_error(again(IDS), peft_logits(trained, IDS)) <= TOL


@pytest.mark.parametrize("name", sorted(file_cases()))
def test_trainable_parameter_count_matches_peft(name, capsys):
    config = file_cases()[name]
    base = small_base()
    with torch_float64():
        peft.get_peft_model(linear_twin(base), peft_config(config)).print_trainable_parameters()
    tp.get_peft_model(base, config).print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs
