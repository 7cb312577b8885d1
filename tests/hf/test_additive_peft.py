"""Prompt tuning, prefix tuning (both projection modes) and IA3 against peft + transformers in float64.

PEFT's model wraps the transformers twin of the same base (tests/hf_utils.py) and holds the same
adapter tensors; logits, the loss (the float64 shifted cross-entropy, computed here: transformers'
own loss goes through float32) and the gradient of every trainable tensor agree to <= 1e-10 relative
(measured ~1e-15). Adapters saved by either library load in the other with equal logits, and
`load_adapter_state_dict` takes `peft.get_peft_model_state_dict` as it is. Deterministic
initialisations (TEXT prompts, zero prefixes, IA3 ones) are compared too, and greedy generation.
"""

from __future__ import annotations

import warnings

import numpy as np
import peft
import pytest
import torch
import transformers
from additive_utils import virtual_token_cases
from hf_utils import hf_causal_lm_loss, hf_twin, torch_float64
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft.data import encode
from tinypeft.gradcheck import relative_error

TOL = 1e-10  # both sides compute the same float64 formulas; measured differences are ~1e-15


def ours_name(peft_name: str, ours: tp.PeftModel) -> str:
    """tinypeft's name for a trainable tensor of PEFT's in-memory model: drop the adapter name
    (`...ia3_l.default` -> `...ia3_l`); a prefix/prompt table without projection is `prompt_embeddings`."""
    name = peft_name.replace(".default.", ".").removesuffix(".default")
    return (
        name if name in ours.trainable_parameters() else {"prompt_encoder.embedding.weight": "prompt_embeddings"}[name]
    )


def peft_trainable(pm) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in pm.named_parameters() if p.requires_grad}


def peft_twin(ours: tp.PeftModel, peft_config) -> peft.PeftModel:
    """PEFT's model on the transformers twin of ours' base, in float64, holding ours' adapter tensors."""
    with torch_float64():
        pm = peft.get_peft_model(hf_twin(ours.base_model), peft_config).double().eval()
    params = ours.trainable_parameters()
    copied = set()
    for name, p in peft_trainable(pm).items():
        mine = ours_name(name, ours)
        with torch.no_grad():
            p.copy_(torch.tensor(params[mine]).reshape(p.shape))
        copied.add(mine)
    assert copied == set(params)  # the same trainable tensors, one to one
    return pm


def compare(ours: tp.PeftModel, pm, ids, labels, mask, num_virtual_tokens: int = 0) -> dict[str, float]:
    """Relative differences of logits, loss and each trainable tensor's gradient (by tinypeft's name).
    num_virtual_tokens: labels PEFT pads in front (prompt tuning) for the loss computed here."""
    torch_mask = None if mask is None else torch.tensor(mask)
    out = pm(input_ids=torch.tensor(ids), attention_mask=torch_mask)
    diffs = {"logits": relative_error(ours(ids, mask), out.logits.detach().numpy())}
    B = ids.shape[0]
    padded = np.concatenate([np.full((B, num_virtual_tokens), -100), labels], axis=1)
    loss_ref = hf_causal_lm_loss(out.logits, torch.tensor(padded))
    loss_ref.backward()
    loss, grads = ours.loss_and_grad(ids, labels, mask)
    diffs["loss"] = abs(loss - loss_ref.item()) / abs(loss_ref.item())
    reference = {ours_name(n, ours): p.grad.numpy() for n, p in peft_trainable(pm).items()}
    assert set(grads) == set(reference)
    # a tensor with a gradient under 1/1000 of the largest is compared on that scale (as in test_hf_gpt2)
    floor = 1e-3 * max(np.linalg.norm(g) for g in grads.values())
    for name, g in grads.items():
        diffs[name] = relative_error(g, reference[name].reshape(g.shape), floor)
    return diffs


def assert_close(diffs: dict[str, float]) -> None:
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, bad


def assume_not_degenerate(case) -> None:
    """LayerNorm over one or two features is (nearly) constant: with one, its output is its bias, so the
    adapter's gradient is 0 here and rounding noise (~1e-17) in torch; with two, it is +-1 up to terms of
    size eps, so every gradient through it is a difference of near-equal numbers (norm ~1e-7) whose
    relative error is set by rounding (~1e-10), not by the formula. Compare on models with three or more."""
    assume(case.model.config.n_embd > 2)


class ByteTokenizer:
    """What PEFT's TEXT init calls (`tokenizer(text)["input_ids"]`), giving tinypeft's UTF-8 byte ids."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": encode(text).tolist()}


@pytest.fixture
def byte_tokenizer(monkeypatch):
    """No tokenizer download: transformers.AutoTokenizer, which PEFT imports when it inits from text,
    hands out the byte tokenizer."""
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: ByteTokenizer())


# ------------------------------------------------------------------ prompt tuning
@settings(max_examples=15)
@given(virtual_token_cases())
def test_prompt_tuning_matches_peft(case_nv):
    case, NV = case_nv
    assume_not_degenerate(case)
    ours = tp.get_peft_model(case.model, tp.PromptTuningConfig(num_virtual_tokens=NV), seed=case.seed)
    pm = peft_twin(ours, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NV))
    assert_close(compare(ours, pm, case.ids, case.labels, case.mask, num_virtual_tokens=NV))


@pytest.mark.parametrize(("text", "NV"), [("def main():", 4), ("héllo", 14), ("x", 20)])
def test_prompt_tuning_text_init_matches_peft(byte_tokenizer, text, NV):
    """The same rows of wte: the text's byte ids, repeated then truncated to NV. PEFT casts the copy to
    float32; tinypeft keeps the model's dtype, so PEFT's table is ours rounded to float32."""
    base = perturbed_model(
        tp.GPTConfig(vocab_size=256, n_positions=32, n_embd=8, n_layer=2, n_head=2, dtype="float64"), 0
    )
    config = dict(num_virtual_tokens=NV, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    ours = tp.get_peft_model(base, tp.PromptTuningConfig(**config))
    with torch_float64():
        pm = peft.get_peft_model(
            hf_twin(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", tokenizer_name_or_path="bytes", **config)
        )
    theirs = pm.prompt_encoder.default.embedding.weight.detach()
    assert theirs.dtype == torch.float32
    table = ours.trainable_parameters()["prompt_embeddings"]
    np.testing.assert_array_equal(theirs.numpy(), table.astype(np.float32))
    # from the same (float64) table, everything agrees
    ids = np.array([[104, 105, 33, 10], [200, 3, 3, 7]])
    assert_close(compare(ours, peft_twin(ours, pm.peft_config["default"]), ids, ids, None, num_virtual_tokens=NV))


# ------------------------------------------------------------------ prefix tuning
@settings(max_examples=15)
@given(virtual_token_cases(min_len=2), st.booleans(), st.integers(1, 8))
def test_prefix_tuning_matches_peft(case_nv, projection, hidden):
    case, NV = case_nv
    assume_not_degenerate(case)
    kwargs = dict(num_virtual_tokens=NV, prefix_projection=projection, encoder_hidden_size=hidden)
    ours = tp.get_peft_model(case.model, tp.PrefixTuningConfig(**kwargs), seed=case.seed)
    pm = peft_twin(ours, peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs))
    assert_close(compare(ours, pm, case.ids, case.labels, case.mask))


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_zero_init_matches_peft(projection):
    base = perturbed_model(
        tp.GPTConfig(vocab_size=30, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 1
    )
    kwargs = dict(num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=7, init_weights="zero")
    ours = tp.get_peft_model(base, tp.PrefixTuningConfig(**kwargs))
    with torch_float64():
        pm = peft.get_peft_model(hf_twin(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    theirs = peft.get_peft_model_state_dict(pm)["prompt_embeddings"].numpy()
    np.testing.assert_array_equal(theirs, 0.0)
    np.testing.assert_array_equal(ours.adapter_state_dict()["prompt_embeddings"], theirs)
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    ref = pm(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert relative_error(ours(ids), ref) <= TOL


# ------------------------------------------------------------------ IA3
IA3_TARGETS = [
    dict(),
    dict(target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], feedforward_modules=["c_fc", "mlp.c_proj"]),
    dict(target_modules=r".*\.h\.0\..*c_\w+", feedforward_modules=["proj"]),
    dict(target_modules=r".*c_(attn|fc)", feedforward_modules=r".*\.mlp\.c_fc"),
]


def without_unseen_predictions(labels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Drop targets predicted from a query that sees no key (left padding, nothing in front): the two
    libraries' gradients differ there by design (see test_hf_gpt2.test_a_query_that_sees_nothing)."""
    if mask is None:
        return labels
    sees_something = np.cumsum(mask, axis=1) > 0
    labels = labels.copy()
    labels[:, 1:][~sees_something[:, :-1]] = -100
    return labels


@settings(max_examples=15)
@given(cases(min_len=2), st.sampled_from(range(len(IA3_TARGETS))))
def test_ia3_matches_peft(case, targets):
    assume_not_degenerate(case)
    kwargs = IA3_TARGETS[targets]
    ours = tp.get_peft_model(case.model, tp.IA3Config(init_ia3_weights=False, **kwargs), seed=case.seed)
    pm = peft_twin(ours, peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False, **kwargs))
    labels = without_unseen_predictions(case.labels, case.mask)
    if not (labels[:, 1:] != -100).any():
        return
    assert_close(compare(ours, pm, case.ids, labels, case.mask))


def test_ia3_ones_init_and_merge_match_peft():
    base = perturbed_model(
        tp.GPTConfig(vocab_size=30, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 2
    )
    ours = tp.get_peft_model(base, tp.IA3Config(**IA3_TARGETS[1]))
    with torch_float64():
        pm = peft.get_peft_model(hf_twin(base), peft.IA3Config(task_type="CAUSAL_LM", **IA3_TARGETS[1])).eval()
    theirs = peft.get_peft_model_state_dict(pm)
    state = ours.adapter_state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k, v in state.items():
        np.testing.assert_array_equal(v, theirs[k].numpy())
    ours.load_adapter_state_dict({k: np.random.default_rng(0).uniform(0.5, 1.5, v.shape) for k, v in state.items()})
    pm = peft_twin(ours, pm.peft_config["default"])
    ids = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    merged = ours.merge_and_unload()
    pm.merge_adapter()
    theirs_merged = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    for name, value in merged.params.items():
        key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        reference = theirs_merged.get(key, theirs_merged.get(name))
        assert relative_error(value, reference.numpy()) <= 1e-15, name
    assert relative_error(merged(ids), pm(input_ids=torch.tensor(ids)).logits.detach().numpy()) <= TOL


# ------------------------------------------------------------------ files, both ways
def adapter_cases():
    """(tinypeft config, PEFT config) pairs, one per method and mode PEFT has."""
    return {
        "prompt": (tp.PromptTuningConfig(num_virtual_tokens=5), peft.PromptTuningConfig(num_virtual_tokens=5)),
        "prompt_text": (
            tp.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="abc"),
            peft.PromptTuningConfig(
                num_virtual_tokens=5,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="abc",
                tokenizer_name_or_path="bytes",
            ),
        ),
        "prefix": (tp.PrefixTuningConfig(num_virtual_tokens=4), peft.PrefixTuningConfig(num_virtual_tokens=4)),
        "prefix_projection": (
            tp.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=6),
            peft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=6),
        ),
        "ia3": (tp.IA3Config(init_ia3_weights=False), peft.IA3Config(init_ia3_weights=False)),
    }


def small_base(seed=3):
    return perturbed_model(
        tp.GPTConfig(vocab_size=256, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype="float64"), seed
    )


def peft_logits(pm, ids) -> np.ndarray:
    with torch.no_grad():
        return pm(input_ids=torch.tensor(ids)).logits.numpy()


IDS = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])


@pytest.mark.parametrize("method", sorted(adapter_cases()))
def test_our_adapter_loads_in_peft(tmp_path, byte_tokenizer, method):
    ours_config, _ = adapter_cases()[method]
    ours = tp.get_peft_model(small_base(), ours_config, seed=4)
    ours.save_pretrained(tmp_path)
    with torch_float64():
        pm = peft.PeftModel.from_pretrained(hf_twin(small_base()), tmp_path).eval()
    assert pm.peft_config["default"].peft_type == ours_config.peft_type
    assert relative_error(ours(IDS), peft_logits(pm, IDS)) <= TOL


@pytest.mark.parametrize("method", sorted(adapter_cases()))
def test_peft_adapter_loads_here(tmp_path, byte_tokenizer, method):
    _, peft_config = adapter_cases()[method]
    peft_config.task_type = "CAUSAL_LM"
    torch.manual_seed(5)
    with torch_float64():
        pm = peft.get_peft_model(hf_twin(small_base()), peft_config).eval()
    if method.startswith("prompt"):  # make the table differ from any init
        with torch.no_grad():
            pm.prompt_encoder.default.embedding.weight.add_(
                0.1 * torch.randn_like(pm.prompt_encoder.default.embedding.weight)
            )
    pm.save_pretrained(tmp_path)
    ours = tp.PeftModel.from_pretrained(small_base(), tmp_path)
    assert relative_error(ours(IDS), peft_logits(pm, IDS)) <= TOL
    # and the in-memory state dict, as it is
    again = tp.get_peft_model(small_base(), ours.peft_config["default"])
    again.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    assert relative_error(again(IDS), peft_logits(pm, IDS)) <= TOL


@pytest.mark.parametrize("projection", [False, True])
def test_a_text_initialised_prefix_loads_in_peft_without_a_warning(tmp_path, projection):
    """PEFT has no prefix_init: adapter_config.json leaves tinypeft's init fields out (PEFT warns of a field it
    lacks, as if the file came from a newer PEFT), and the table PEFT loads gives our logits."""
    hidden = 6 if projection else None
    config = tp.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=hidden,
                                   prefix_init="TEXT", prefix_init_text="Hi!")  # fmt: skip
    ours = tp.get_peft_model(small_base(), config, seed=4)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught, torch_float64():
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf_twin(small_base()), tmp_path).eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    assert relative_error(ours(IDS), peft_logits(pm, IDS)) <= TOL


def peft_greedy_by_full_forward(pm, ids: np.ndarray, n_new: int) -> np.ndarray:
    ids = torch.tensor(ids)
    for _ in range(n_new):
        with torch.no_grad():
            next_ids = pm(input_ids=ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
    return ids.numpy()


def twins_for_generation(method):
    ours_config, peft_config = adapter_cases()[method]
    peft_config.task_type = "CAUSAL_LM"
    ours = tp.get_peft_model(small_base(6), ours_config, seed=7)
    pm = peft_twin(ours, peft_config)
    pm.generation_config.eos_token_id = pm.generation_config.bos_token_id = None
    pm.generation_config.pad_token_id = 0
    return ours, pm


@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_projection"])
def test_greedy_generation_matches_peft_s_forward(method):
    """tinypeft's KV-cached greedy generation equals the argmax, step by step, of PEFT's full forward."""
    ours, pm = twins_for_generation(method)
    np.testing.assert_array_equal(ours.generate(IDS, 6), peft_greedy_by_full_forward(pm, IDS, 6))


@pytest.mark.xfail(
    reason="peft 0.21.2 with transformers 5.x: PeftModelForCausalLM.prepare_inputs_for_generation looks for the "
    "KV cache under 'past_key_values', which transformers 5 renamed 'cache', so every step re-feeds the whole "
    "input (and, for prompt tuning, the prompt) on top of the cache: PEFT's generate disagrees with PEFT's forward"
)
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_peft_s_own_generate_agrees_with_its_forward(method):
    _, pm = twins_for_generation(method)
    with torch.no_grad():
        generated = pm.generate(input_ids=torch.tensor(IDS), max_new_tokens=6, do_sample=False).numpy()
    np.testing.assert_array_equal(generated, peft_greedy_by_full_forward(pm, IDS, 6))
