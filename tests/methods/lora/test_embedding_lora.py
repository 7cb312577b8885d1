"""LoRA on the token embedding (target_modules with "wte") and LoRA's trainable_token_indices.

Gradients three ways over random models, ranks, scalings and batches that repeat ids; against Hugging Face
PEFT 0.21.2 in float64 (logits, loss, every trainable gradient <= 1e-10 relative; merged weights <= 1e-12);
files both ways; what merge does with the tied head: the unmerged head reads the base W, the merged model
reads W + s (B A)ᵀ in its lookup and its head, exactly as PEFT's merged model; the errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import peft
import pytest
import torch
from additive_utils import assert_checks_catch, assert_gradients_check, greedy_by_full_forward
from hf_utils import hf_causal_lm_loss, hf_twin
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import perturbed_model
from token_strategies import token_cases

import tinypeft as tp
from tinypeft import engine
from tinypeft.errors import ConfigError
from tinypeft.gradcheck import relative_error
from tinypeft.methods import embedding_lora
from tinypeft.methods.embedding_lora import EMBEDDING_A, EMBEDDING_B, TOKEN_DELTA, EmbeddingLoraSite

TOL = 1e-10
MERGE_TOL = 1e-12
WTE = "transformer.wte.weight"


@st.composite
def wte_configs(draw, vocab_size: int, n_embd: int, tokens: list[int]):
    """A LoraConfig on wte (alone or with linear layers), or one with trainable_token_indices; random factors."""
    r = draw(st.integers(1, min(4, vocab_size, n_embd)))
    alpha = draw(st.sampled_from([1, 2, 5]))
    rslora = draw(st.booleans())
    others = draw(st.sampled_from([[], ["c_attn"], ["c_proj", "c_fc"]]))
    if draw(st.booleans()):
        return tp.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["wte", *others],
                             init_lora_weights=False)  # fmt: skip
    as_dict = draw(st.booleans())
    indices = {"wte": tokens} if as_dict else tokens
    return tp.LoraConfig(r=r, lora_alpha=alpha, target_modules=others or ["c_attn"], init_lora_weights=False,
                         trainable_token_indices=indices)  # fmt: skip


def perturb_tokens(model: tp.PeftModel, seed: int) -> None:
    """Move Δ off its init (a copy of W[idx]), so the adapter is not the identity."""
    params = model.active.params
    if TOKEN_DELTA in params:
        rng = np.random.default_rng(seed)
        params[TOKEN_DELTA] = params[TOKEN_DELTA] + 0.5 * rng.standard_normal(params[TOKEN_DELTA].shape)


@settings(max_examples=20)
@given(token_cases(), st.data())
def test_gradients(case_indices, data):
    case, indices = case_indices
    cfg = case.model.config
    config = data.draw(wte_configs(cfg.vocab_size, cfg.n_embd, indices))
    model = tp.get_peft_model(case.model, config, seed=case.seed)
    perturb_tokens(model, case.seed)
    assert_gradients_check(model, case.ids, mask=case.mask, output_weights=case.output_weights)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


def small(vocab_size=23, **kw):
    cfg = dict(vocab_size=vocab_size, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64") | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


def test_checks_catch_a_wrong_backward(monkeypatch):
    model = tp.get_peft_model(small(), tp.LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False))
    ids = np.array([[3, 3, 5, 0, 7], [1, 2, 3, 5, 5]])
    assert_checks_catch(monkeypatch, embedding_lora, "embedding_lora_backward", model, ids, ids)


def test_init_is_the_identity_with_peft_s_shapes():
    base = small()
    for init in (True, "gaussian"):
        model = tp.get_peft_model(base, tp.LoraConfig(r=3, target_modules=["wte"], init_lora_weights=init))
        A, B = model.active.params[EMBEDDING_A], model.active.params[EMBEDDING_B]
        assert A.shape == (3, 23) and B.shape == (12, 3)
        assert not A.any() and B.std() > 0.5  # A = 0, B ~ N(0, 1): the reverse of a linear layer's
        ids = np.array([[1, 2, 3]])
        np.testing.assert_array_equal(model(ids), base(ids))
    model = tp.get_peft_model(base, tp.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[4, 1]))
    np.testing.assert_array_equal(model.active.params[TOKEN_DELTA], base.params[WTE][[4, 1]])


def test_the_unmerged_head_reads_the_base_table():
    """Only the lookup sees the update: ids that change nothing downstream of the lookup... a batch's logits
    are those of the base model fed the adapted embeddings, with the head's W untouched."""
    base = small()
    model = tp.get_peft_model(base, tp.LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False))
    view = model.view()
    assert isinstance(view.sites.tokens, EmbeddingLoraSite)
    _, head_weight, _ = view.sites.tokens.forward(view.params, np.array([[0]]))
    assert head_weight is base.params[WTE]


class MergedHead:
    """The adapter's lookup with the head reading W + s (B A)ᵀ: what a merged model must compute."""

    def __init__(self, site: EmbeddingLoraSite, merged: np.ndarray) -> None:
        self.site, self.merged, self.param_names = site, merged, site.param_names

    def forward(self, params, ids):
        embeds, _, cache = self.site.forward(params, ids)
        return embeds, self.merged, cache


def test_merge_moves_the_tied_head_and_nothing_else():
    base = small()
    config = tp.LoraConfig(r=2, lora_alpha=3, target_modules=["wte", "c_fc"], init_lora_weights=False)
    model = tp.get_peft_model(base, config)
    ids = np.random.default_rng(0).integers(0, 23, size=(2, 7))
    merged_model = model.merge_and_unload()
    p = model.active.params
    merged_wte = base.params[WTE] + config.scaling * (p[EMBEDDING_B] @ p[EMBEDDING_A]).T
    np.testing.assert_array_equal(merged_model.params[WTE], merged_wte)
    view = model.view()
    expected = dataclasses.replace(
        view, sites=dataclasses.replace(view.sites, tokens=MergedHead(view.sites.tokens, merged_wte))
    )
    assert relative_error(merged_model(ids), engine.logits(expected, ids)) <= MERGE_TOL
    assert relative_error(merged_model(ids), model(ids)) > 1e-3  # the caveat: not the unmerged logits
    assert model.active.merge_caveat()
    model.merge_adapter()
    model.unmerge_adapter()
    assert model.base_model.params[WTE] is base.params[WTE]


def test_generation_with_the_cache_equals_the_full_forward():
    for config in (
        tp.LoraConfig(r=2, target_modules=["wte", "c_attn"], init_lora_weights=False),
        tp.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False, trainable_token_indices=[7, 1]),
    ):
        model = tp.get_peft_model(small(), config)
        perturb_tokens(model, 0)
        prompt = np.array([[7, 1, 11]])
        np.testing.assert_array_equal(model.generate(prompt, 6), greedy_by_full_forward(model, prompt, 6))


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"target_modules": ["wte"], "trainable_token_indices": [1]}, "targets wte and trains rows of it"),
        ({"target_modules": ["wte"], "use_dora": True}, "use_dora=True applies to the linear layers only"),
        ({"target_modules": ["wte"], "init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"target_modules": ["wte"], "r": 13}, r"min\(V, C\) = min\(23, 12\)"),
        ({"trainable_token_indices": [23]}, r"token id 23, outside the vocabulary: ids are 0\.\.22"),
        ({"trainable_token_indices": [1, 2, 1]}, "token 1 more than once"),
        ({"trainable_token_indices": {"wte": [1], "lm_head": [2]}}, "GPT-2 has one, wte"),
        ({"trainable_token_indices": {"wpe": [1]}}, "'wpe' matches no module"),
        ({"trainable_token_indices": "1"}, "non-empty list of token ids"),
        ({"target_modules": ["wpe"]}, "'wpe' matches no module"),
    ],
)
def test_errors(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        tp.get_peft_model(small(), tp.LoraConfig(**{"r": 2, **kwargs}))


# ------------------------------------------------------------------ against PEFT
def peft_twin(model: tp.PeftModel) -> peft.PeftModel:
    d = model.active.config.to_dict()
    config = peft.LoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "base_model_name_or_path")})
    twin = peft.get_peft_model(hf_twin(model.base_model), config)
    state = {k: torch.tensor(np.asarray(v)) for k, v in model.adapter_state_dict().items()}
    result = peft.set_peft_model_state_dict(twin, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return twin.eval()


def visible_rows(mask, shape):
    return np.ones(shape, dtype=bool) if mask is None else np.cumsum(mask, axis=1) > 0


@settings(max_examples=20)
@given(token_cases(), st.data())
def test_logits_loss_gradients_and_merge_match_peft(case_indices, data):
    case, indices = case_indices
    cfg = case.model.config
    config = data.draw(wte_configs(cfg.vocab_size, cfg.n_embd, indices))
    model = tp.get_peft_model(case.model, config, seed=case.seed)
    perturb_tokens(model, case.seed)
    twin = peft_twin(model)
    rows = visible_rows(case.mask, case.ids.shape)
    labels = case.labels.copy()
    labels[:, 1:][~rows[:, :-1]] = -100
    if not (labels[:, 1:] != -100).any():
        return
    view = model.view()
    mask = None if case.mask is None else torch.tensor(case.mask)
    out = twin(input_ids=torch.tensor(case.ids), attention_mask=mask)
    assert relative_error(engine.logits(view, case.ids, case.mask)[rows], out.logits.detach().numpy()[rows]) <= TOL
    loss_ref = hf_causal_lm_loss(out.logits, torch.tensor(labels))
    loss_ref.backward()
    loss, grads = engine.loss_and_grad(view, case.ids, labels, case.mask)
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    peft_grads = {n.replace(".default", ""): p.grad.numpy() for n, p in twin.named_parameters() if p.requires_grad}
    assert set(peft_grads) == set(grads)
    for name, g in grads.items():
        assert relative_error(g, peft_grads[name]) <= TOL, name
    ours = model.merge_and_unload()
    theirs = twin.merge_and_unload()
    theirs_state = theirs.state_dict()
    for name, value in ours.params.items():
        assert relative_error(value, theirs_state[name].numpy()) <= MERGE_TOL, name
    # PEFT's merged model is tied too: its logits are ours, the head moved with wte
    merged_ref = theirs(input_ids=torch.tensor(case.ids), attention_mask=mask).logits.detach().numpy()
    assert relative_error(ours(case.ids, case.mask)[rows], merged_ref[rows]) <= TOL


LOADABLE = [
    {"target_modules": ["wte"]},
    {"target_modules": ["wte", "c_attn"], "use_rslora": True},
    {"target_modules": ["c_fc"], "trainable_token_indices": [17, 4, 30]},
    {"target_modules": ["c_attn"], "trainable_token_indices": {"wte": [0, 30]}},
]


def interchange_model() -> tp.GPT:
    cfg = tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64")
    return perturbed_model(cfg, 3)


IDS = np.random.default_rng(0).integers(0, 31, size=(2, 9))
IDS[0, :4] = [30, 4, 30, 17]


@pytest.mark.parametrize("config", LOADABLE)
def test_our_adapter_loads_in_peft(tmp_path, config):
    base = interchange_model()
    model = tp.get_peft_model(base, tp.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, **config))
    perturb_tokens(model, 1)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf_twin(base), tmp_path).eval()
    ref = loaded(input_ids=torch.tensor(IDS)).logits.detach().numpy()
    assert relative_error(model(IDS), ref) <= TOL
    assert relative_error(model(IDS), base(IDS)) > 1e-3


@pytest.mark.parametrize("config", LOADABLE)
def test_a_peft_adapter_loads_here(tmp_path, config):
    base = interchange_model()
    torch.manual_seed(0)
    trained = peft.get_peft_model(hf_twin(base), peft.LoraConfig(r=3, lora_alpha=5, **config))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trained.save_pretrained(tmp_path)
    model = tp.PeftModel.from_pretrained(base, tmp_path)
    ref = trained.eval()(input_ids=torch.tensor(IDS)).logits.detach().numpy()
    assert relative_error(model(IDS), ref) <= TOL
    assert relative_error(model(IDS), base(IDS)) > 1e-3


def test_peft_s_file_names_are_ours():
    base = interchange_model()
    for config, names in (
        ({"target_modules": ["wte"]}, {EMBEDDING_A, EMBEDDING_B}),
        ({"target_modules": ["c_attn"], "trainable_token_indices": [2]}, {TOKEN_DELTA}),
    ):
        twin = peft.get_peft_model(hf_twin(base), peft.LoraConfig(r=2, **config))
        theirs = {k for k in peft.get_peft_model_state_dict(twin) if ".h." not in k}
        ours = {k for k in tp.get_peft_model(base, tp.LoraConfig(r=2, **config)).adapter_state_dict() if ".h." not in k}
        assert theirs == ours == names
