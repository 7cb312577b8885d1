"""Prompt tuning, prefix tuning (both modes), IA3 and bottleneck adapters in a PeftModel and through the
training loop: disable_adapter gives the base model; adapters of different methods live side by side and
switch; the loss goes down, and a run interrupted and resumed from its checkpoint computes exactly what
the straight run computes (the adapters' tensors are updated in place and checkpointed under their own
names)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

import tinypeft as tp
from tinypeft.train import TrainConfig, evaluate, train

DATA = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 400).encode(), dtype=np.uint8)
TASK = np.frombuffer(("lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 400).encode(), dtype=np.uint8)
CFG = tp.GPTConfig(vocab_size=256, n_positions=32, n_embd=16, n_layer=2, n_head=2)
METHODS = {  # config, learning rate (prompt tuning is known to want a large one)
    "prompt": (
        lambda: tp.PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text="the "),
        0.3,
    ),
    "prefix": (lambda: tp.PrefixTuningConfig(num_virtual_tokens=4), 3e-2),
    "prefix_projection": (lambda: tp.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True), 3e-2),
    "ia3": (lambda: tp.IA3Config(), 3e-2),
    "adapter": (lambda: tp.AdapterConfig(bottleneck_size=4), 3e-2),
}
CONFIG = TrainConfig(steps=40, batch_size=4, seq_len=24, warmup_steps=2, eval_every=10, eval_windows=4)


@functools.cache
def pretrained_weights() -> dict[str, np.ndarray]:
    base = tp.GPT(CFG, seed=0)
    train(base, DATA, TrainConfig(steps=40, batch_size=4, seq_len=24, lr=1e-2, warmup_steps=2), progress=False)
    return base.state_dict()


def pretrained_base() -> tp.GPT:
    """A base that has learned DATA, to adapt to TASK (a fresh copy each time)."""
    base = tp.GPT(CFG, seed=0)
    base.load_state_dict(pretrained_weights())
    return base


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_lowers_the_loss_and_resumes_bit_exactly(tmp_path, method):
    base = pretrained_base()
    make_config, lr = METHODS[method]
    straight = tp.get_peft_model(base, make_config())
    before = evaluate(straight, TASK, 24, 4)
    config = dataclasses.replace(CONFIG, lr=lr)
    full = train(straight, TASK, config, eval_sets={"val": TASK}, progress=False)
    assert full.evals[-1]["val"] < before - 0.05, (before, full.evals)

    config = dataclasses.replace(config, checkpoint_every=5)
    interrupted = tp.get_peft_model(pretrained_base(), make_config())
    train(interrupted, TASK, config, eval_sets={"val": TASK}, run_dir=str(tmp_path), progress=False, stop_after=13)
    resumed = tp.get_peft_model(pretrained_base(), make_config())  # as a fresh process would
    result = train(resumed, TASK, config, eval_sets={"val": TASK}, run_dir=str(tmp_path), resume=True, progress=False)
    for name, value in straight.trainable_parameters().items():
        np.testing.assert_array_equal(resumed.trainable_parameters()[name], value, err_msg=name)
    assert result.evals == full.evals


def randomised(model: tp.PeftModel, seed: int) -> tp.PeftModel:
    rng = np.random.default_rng(seed)
    for value in model.trainable_parameters().values():
        value += 0.3 * rng.standard_normal(value.shape).astype(value.dtype)
    return model


def test_disable_adapter_gives_the_base_and_adapters_switch():
    base = pretrained_base()
    ids = np.frombuffer(b"lorem ipsum dolor", dtype=np.uint8)[None].astype(np.int64)
    singles = {
        name: randomised(tp.get_peft_model(base, make()), i) for i, (name, (make, _)) in enumerate(METHODS.items())
    }
    together = tp.get_peft_model(base, METHODS["prompt"][0]())
    together.load_adapter_state_dict(singles["prompt"].adapter_state_dict())
    for name, single in singles.items():
        if name != "prompt":
            together.add_adapter(name, single.peft_config["default"])
            together.adapters[name].load_state_dict(single.active.state_dict())
    for name, single in singles.items():
        together.set_adapter("default" if name == "prompt" else name)
        np.testing.assert_array_equal(together(ids), single(ids))
        with single.disable_adapter():
            np.testing.assert_array_equal(single(ids), base(ids))
