"""Mixed-batch inference (`model(ids, adapter_names=[...])`, `model.generate(..., adapter_names=[...])`,
tinypeft/mixed_batch.py): each row computes what its adapter alone computes for it, over drawn models, padding,
adapters (LoRA, rsLoRA, DoRA, PiSSA, IA3, bottleneck adapters) and row assignments, to <= 1e-12 in float64
(measured: 0, bitwise); LoRA and rsLoRA rows equal PEFT 0.21.2's mixed batch, logits and greedy generation
(PEFT's `generate(..., adapter_names=...)` and the argmax of its mixed forward, token by token).

PEFT's generate is given an explicit attention mask: with `pad_token_id` set and no mask, transformers infers the
mask from the ids and drops every input token equal to the pad id (`test_generate_without_a_mask_drops_pad_ids`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from multi_adapters import peft_twin, perturb, small_base, with_adapters
from strategies import cases

import tinypeft as tp
from tinypeft.errors import ConfigError, InputError, MergeError
from tinypeft.gradcheck import relative_error

ROW_TOL = 1e-12  # each row against its adapter alone; measured 0
PEFT_TOL = 1e-12  # against PEFT's mixed batch; measured <= 1e-15


def configs_for(cfg: tp.GPTConfig) -> dict[str, tp.PeftConfig]:
    r = min(2, cfg.n_embd)
    return {
        "lora": tp.LoraConfig(r=r, lora_alpha=3, init_lora_weights=False, target_modules=["c_attn", "c_proj"]),
        "rs": tp.LoraConfig(r=r, lora_alpha=2, use_rslora=True, init_lora_weights=False, target_modules=["mlp.c_fc"]),
        "dora": tp.LoraConfig(r=r, use_dora=True, init_lora_weights=False, target_modules=["c_attn"], bias="lora_only"),
        "pissa": tp.LoraConfig(r=r, init_lora_weights="pissa", target_modules=["mlp.c_proj"]),
        "ia3": tp.IA3Config(target_modules=["c_attn", "mlp.c_proj"], init_ia3_weights=False),
        "bottleneck": tp.AdapterConfig(bottleneck_size=3, init_weights=False),
    }


def alone(model: tp.PeftModel, name: str, ids, mask=None):
    if name == "__base__":
        return model.base_model(ids, mask)
    model.set_adapter(name)
    return model(ids, mask)


@settings(max_examples=15)
@given(case=cases(min_len=1, max_batch=4, min_embd=3), data=st.data())
def test_each_row_equals_its_adapter_alone(case, data):
    model = with_adapters(case.model, configs_for(case.model.config), seed=case.seed)
    choices = ["__base__", *model.adapters]
    names = data.draw(st.lists(st.sampled_from(choices), min_size=len(case.ids), max_size=len(case.ids)))
    logits = model(case.ids, case.mask, adapter_names=names)
    for b, name in enumerate(names):
        row_mask = None if case.mask is None else case.mask[b : b + 1]
        assert relative_error(logits[b], alone(model, name, case.ids[b : b + 1], row_mask)[0]) <= ROW_TOL, name


def lora_pair() -> tp.PeftModel:
    configs = {
        "x": tp.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["c_attn", "c_proj"]),
        "y": tp.LoraConfig(r=3, lora_alpha=2, use_rslora=True, init_lora_weights=False, target_modules=["mlp.c_fc"]),
    }
    return with_adapters(small_base(), configs)


NAMES = ["y", "__base__", "x", "y", "x"]
IDS = np.random.default_rng(0).integers(0, 31, size=(len(NAMES), 7))


@pytest.mark.parametrize("padded", [False, True])
def test_a_mixed_batch_matches_peft_s(padded):
    model = lora_pair()
    twin = peft_twin(model)
    mask = None
    if padded:
        mask = np.ones(IDS.shape, dtype=np.int64)
        mask[1, :2] = mask[3, 5:] = 0  # left padding (the first query then sees its own key only) and right
    ours = model(IDS, mask, adapter_names=NAMES)
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    theirs = twin(input_ids=torch.tensor(IDS), adapter_names=NAMES, **kwargs).logits.detach().numpy()
    rows = np.ones(IDS.shape, bool) if mask is None else np.cumsum(mask, axis=1) > 0  # positions that see a key
    assert relative_error(ours[rows], theirs[rows]) <= PEFT_TOL


def peft_greedy(twin, ids: np.ndarray, n_new: int, adapter_names) -> np.ndarray:
    ids = torch.tensor(ids)
    for _ in range(n_new):
        with torch.no_grad():
            next_ids = twin(input_ids=ids, adapter_names=adapter_names).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
    return ids.numpy()


def peft_generate(twin, ids: np.ndarray, n_new: int, adapter_names, pad_token_id: int = 0, mask: bool = True):
    twin.generation_config.eos_token_id = twin.generation_config.bos_token_id = None
    twin.generation_config.pad_token_id = pad_token_id
    kwargs = {"attention_mask": torch.ones(ids.shape, dtype=torch.long)} if mask else {}
    with torch.no_grad():
        out = twin.generate(input_ids=torch.tensor(ids), max_new_tokens=n_new, do_sample=False,
                            adapter_names=adapter_names, **kwargs)  # fmt: skip
    return out.numpy()


def test_mixed_generation_continues_each_row_with_its_adapter():
    """KV-cached greedy generation: each row equals its adapter's generation alone, PEFT's mixed-batch generate,
    and the argmax of PEFT's mixed-batch forward step by step."""
    model = lora_pair()
    out = model.generate(IDS, 6, adapter_names=NAMES)
    for b, name in enumerate(NAMES):
        expected = model.base_model.generate(IDS[b : b + 1], 6) if name == "__base__" else None
        if expected is None:
            model.set_adapter(name)
            expected = model.generate(IDS[b : b + 1], 6)
        np.testing.assert_array_equal(out[b : b + 1], expected)
    twin = peft_twin(model)
    np.testing.assert_array_equal(out, peft_greedy(twin, IDS, 6, NAMES))
    np.testing.assert_array_equal(out, peft_generate(twin, IDS, 6, NAMES))
    sampled = model.generate(IDS, 4, temperature=0.8, seed=3, adapter_names=NAMES)  # sampling runs too
    assert sampled.shape == (len(NAMES), IDS.shape[1] + 4)


def test_generate_without_a_mask_drops_pad_ids():
    """Why PEFT's generate gets a mask above: without one, transformers takes every input token equal to
    pad_token_id for padding. With pad_token_id 0 and no mask, rows holding token 0 continue otherwise (the other
    rows agree); with a pad id the input does not hold, every row agrees again."""
    absent = next(i for i in range(31) if not (IDS == i).any())
    model = lora_pair()
    twin = peft_twin(model)
    ours = model.generate(IDS, 6, adapter_names=NAMES)
    unmasked = peft_generate(twin, IDS, 6, NAMES, pad_token_id=0, mask=False)
    holds_zero = (IDS == 0).any(axis=1)
    np.testing.assert_array_equal(unmasked[~holds_zero], ours[~holds_zero])
    assert (unmasked[holds_zero] != ours[holds_zero]).any()
    np.testing.assert_array_equal(peft_generate(twin, IDS, 6, NAMES, pad_token_id=absent, mask=False), ours)


def test_a_mixed_batch_leaves_the_model_as_it_was():
    model = lora_pair()
    before = model(IDS)
    model(IDS, adapter_names=NAMES)
    assert model.active_adapter == "x"
    np.testing.assert_array_equal(model(IDS), before)


@pytest.mark.parametrize(
    ("setup", "names", "error", "says"),
    [
        (None, ["x"], InputError, ("1 name(s) for a batch of 5 row(s)", "'__base__'")),
        (None, ["x", "z", "w", "x", "x"], InputError, ("['w', 'z']", "['x', 'y']", "'__base__'")),
        (None, "x", InputError, ("one per row", "'x'")),
        ("train", NAMES, ConfigError, ("for inference", "model.eval()")),
        ("merge", NAMES, MergeError, ("mixed batch", "unmerge_adapter()")),
        ("prompt", [*NAMES[:4], "p"], ConfigError, ("'p'", "PROMPT_TUNING", "linear layers only")),
        ("bias_all", [*NAMES[:4], "b"], ConfigError, ("'b'", "retrains transformer.h.0.ln_1.bias")),
    ],
)
def test_refusals(setup, names, error, says):
    model = lora_pair()
    if setup == "train":
        model.train()
    elif setup == "merge":
        model.merge_adapter()
    elif setup == "prompt":
        model.add_adapter("p", tp.PromptTuningConfig(num_virtual_tokens=2))
    elif setup == "bias_all":
        model.add_adapter("b", tp.LoraConfig(r=2, bias="all"))
        perturb(model, "b", 0)
    with pytest.raises(error) as info:
        model(IDS, adapter_names=names)
    for fragment in says:
        assert fragment in str(info.value)
    with pytest.raises(error):
        model.generate(IDS, 2, adapter_names=names)
