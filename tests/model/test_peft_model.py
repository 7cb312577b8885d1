"""PeftModel mechanics with the selective methods: the base stays untouched, disable/merge/unload,
several named adapters, save/load, and the trainable-parameter line in PEFT's format."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from strategies import perturbed_model

import tinypeft as tp
from tinypeft.errors import CheckpointError, ConfigError, MergeError
from tinypeft.gradcheck import relative_error

CFG = tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=8, n_layer=2, n_head=2, dtype="float64")
IDS = np.random.default_rng(0).integers(0, 31, size=(2, 10))


def trained(config, steps=3):
    base = perturbed_model(CFG, 0)
    model = tp.get_peft_model(base, config)
    rng = np.random.default_rng(1)
    for p in model.trainable_parameters().values():
        p += 0.1 * rng.standard_normal(p.shape)
    return base, model


def test_trainable_line_is_peft_format(capsys):
    base = tp.GPT(tp.GPTConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    base.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == "trainable params: 8,128 || all params: 8,128 || trainable%: 100.0000"
    tp.get_peft_model(base, tp.BitFitConfig()).print_trainable_parameters()
    biases = 2 * (3 * 16 + 16 + 16 + 16 + 4 * 16 + 16) + 16
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {biases:,d} || all params: 8,128 || trainable%: {100 * biases / 8128:.4f}"
    )


@pytest.mark.parametrize("config", [tp.BitFitConfig(), tp.LNTuningConfig(), tp.LastBlocksConfig(num_blocks=1)])
def test_disable_merge_unload(config):
    base, model = trained(config)
    base_logits = base(IDS)
    adapted = model(IDS)
    assert relative_error(adapted, base_logits) > 1e-3
    with model.disable_adapter():
        np.testing.assert_array_equal(model(IDS), base_logits)
    merged = model.merge_and_unload()
    assert isinstance(merged, tp.GPT)
    np.testing.assert_array_equal(merged(IDS), adapted)  # a copy: merging exactly, no arithmetic
    np.testing.assert_array_equal(base(IDS), base_logits)  # the PeftModel's base is untouched
    model.merge_adapter()
    np.testing.assert_array_equal(model(IDS), adapted)
    with pytest.raises(MergeError, match="unmerge"):
        model.loss_and_grad(IDS, IDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert "already merged" in str(caught[0].message)
    model.unmerge_adapter()
    np.testing.assert_array_equal(base(IDS), base_logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.unmerge_adapter()
    assert "not merged" in str(caught[0].message)
    assert isinstance(model.unload(), tp.GPT)
    np.testing.assert_array_equal(model.unload()(IDS), base_logits)


def test_safe_merge_refuses_non_finite():
    base, model = trained(tp.BitFitConfig())
    name = next(iter(model.trainable_parameters()))
    model.trainable_parameters()[name][0] = np.nan
    with pytest.raises(MergeError, match="non-finite"):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(MergeError):
        model.merge_adapter(safe_merge=True)
    assert all(np.isfinite(v).all() for v in base.params.values())


def test_named_adapters():
    base, model = trained(tp.BitFitConfig())
    model.add_adapter("ln", tp.LNTuningConfig())
    assert model.active_adapter == "default"
    bitfit = model(IDS)
    model.set_adapter("ln")
    np.testing.assert_array_equal(model(IDS), base(IDS))  # fresh LN copies: still the base
    _, grads = model.loss_and_grad(IDS, IDS)
    assert all(".ln_" in k for k in grads)
    model.set_adapter("default")
    np.testing.assert_array_equal(model(IDS), bitfit)
    with pytest.raises(ConfigError, match="exists"):
        model.add_adapter("ln", tp.BitFitConfig())
    with pytest.raises(ConfigError, match="no adapter"):
        model.set_adapter("missing")
    model.delete_adapter("default")
    assert model.active_adapter == "ln"
    with pytest.raises(ConfigError, match="only adapter"):
        model.delete_adapter("ln")


def test_save_and_load(tmp_path):
    base, model = trained(tp.LNTuningConfig(target_modules=["ln_1", "ln_f"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and config["target_modules"] == ["ln_1", "ln_f"]
    loaded = tp.PeftModel.from_pretrained(base, tmp_path)
    np.testing.assert_array_equal(loaded(IDS), model(IDS))
    state = model.adapter_state_dict()
    assert all(k.startswith("base_model.model.transformer.") and ".ln_tuning_layers." in k for k in state)
    other = tp.get_peft_model(base, tp.BitFitConfig())
    with pytest.raises(CheckpointError, match="missing"):
        other.load_adapter_state_dict(state)


def test_selection_errors_name_what_exists():
    base = tp.GPT(CFG)
    with pytest.raises(ConfigError, match="matches no parameter"):
        tp.get_peft_model(base, tp.SelectiveConfig(patterns=["*.nothing"]))
    with pytest.raises(ConfigError, match="ln_1"):
        tp.get_peft_model(base, tp.LNTuningConfig(target_modules=["ln_3"]))
    with pytest.raises(ConfigError, match="num_blocks"):
        tp.get_peft_model(base, tp.LastBlocksConfig(num_blocks=3))
    with pytest.raises(ConfigError, match="regular expression"):
        tp.unfreeze(base, regex="(")


def test_ln_tuning_adapters_interchange_with_peft(tmp_path):
    import peft
    import torch
    from hf_utils import hf_twin

    base, model = trained(tp.LNTuningConfig())
    model.save_pretrained(tmp_path / "ours")
    hf = hf_twin(base)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").double().eval()
    logits = theirs(input_ids=torch.tensor(IDS)).logits.detach().numpy()
    assert relative_error(model(IDS), logits) <= 1e-12
    theirs.save_pretrained(tmp_path / "theirs")
    back = tp.PeftModel.from_pretrained(base, tmp_path / "theirs")
    assert relative_error(back(IDS), logits) <= 1e-12


MERGEABLE = ["bitfit", "lntuning", "last_blocks", "selective", "lora", "ia3"]


@pytest.mark.parametrize("method", MERGEABLE)
def test_training_after_a_merge_leaves_the_merged_model_alone(method):
    """merge_and_unload returns new arrays for what it changes: an optimizer that goes on updating the
    adapter in place must not move the merged model (issue 15, item 11b)."""
    from tinypeft.methods.registry import METHODS
    from tinypeft.optim import AdamW

    cfg = tp.GPTConfig(vocab_size=17, n_positions=12, n_embd=8, n_layer=2, n_head=2, dtype="float64")
    model = tp.get_peft_model(perturbed_model(cfg, 0), METHODS[method].example(cfg), seed=1)
    assert model.active.can_merge()
    ids = np.random.default_rng(0).integers(0, 17, size=(2, 9))
    merged = model.merge_and_unload()
    before = merged(ids).copy()
    optimizer = AdamW(lr=0.1)
    for _ in range(2):
        _, grads = model.loss_and_grad(ids, ids)
        optimizer.step(model.trainable_parameters(), grads)
    np.testing.assert_array_equal(merged(ids), before)
    assert not np.array_equal(model(ids), before)  # the adapter did move
