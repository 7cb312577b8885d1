"""The shared fine-tuning flow (tinypeft/experiment.py) on a tiny model: what "before" means, the
grid runner's rows (diverged runs included), peak memory, and the small helpers the scripts use."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tinypeft as tp
from tinypeft.cli import method_defaults
from tinypeft.data import load_corpus
from tinypeft.experiment import finetune, validation_losses
from tinypeft.lab import (
    QUICK,
    Lab,
    forgetting_at_gain,
    pareto_front,
    peak_training_memory,
    plateau,
    rank_for_variance,
    weight_updates,
)
from tinypeft.train import TrainConfig, TrainResult

CFG = tp.GPTConfig(vocab_size=256, n_positions=64, n_embd=16, n_layer=1, n_head=2)
SMALL = TrainConfig(steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, eval_every=0, eval_windows=2)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(200)))
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tp.GPT(CFG, seed=0).save_pretrained(folder)
    return folder


def test_before_is_the_base_model_even_when_the_adapter_does_not_start_as_the_identity(corpus_file):
    corpus = load_corpus(str(corpus_file))
    base = tp.GPT(CFG, seed=0)
    base_losses = validation_losses(base, {"task": corpus.val, "prose": corpus.val}, SMALL)
    prompt = finetune(
        base, tp.PromptTuningConfig(num_virtual_tokens=4), corpus, corpus, SMALL, method="prompt", quiet=True
    )
    before = {k: v["loss"] for k, v in prompt.summary["before"].items()}
    assert before == base_losses
    # step 0 of the run is the base with a random soft prompt: another model
    assert prompt.summary["evals"][0]["task"] != pytest.approx(base_losses["task"], abs=1e-6)
    lora = finetune(base, tp.LoraConfig(r=2), corpus, corpus, SMALL, method="lora", quiet=True)
    assert lora.summary["evals"][0]["task"] == pytest.approx(base_losses["task"], rel=1e-6)  # B = 0: identity
    assert lora.summary["task_gain"] == pytest.approx(base_losses["task"] - lora.summary["after"]["task"]["loss"])


def test_lab_rows_and_a_diverged_run(base_dir, corpus_file, capsys):
    lab = Lab(str(base_dir), QUICK, task=str(corpus_file), prose=str(corpus_file), progress=False)
    config, lr = method_defaults("bitfit")
    ok = lab.run("BitFit", config, lr, measure_memory=True, swept=1)
    assert ok["status"] == "ok" and ok["swept"] == 1 and ok["lr"] == lr
    assert ok["task_before"] == lab.base_losses["task"] and ok["peak_memory_bytes"] > 0
    assert [row["step"] for row in ok["evals"]] == [0, 2, 3]
    with np.errstate(all="ignore"):
        blown = lab.run("full at 1e30", None, 1e30)
    assert blown["status"].startswith("diverged: the loss became non-finite")
    assert blown["task_after"] is None and blown["task_gain"] is None
    assert "diverged" in capsys.readouterr().out
    # full fine-tuning trained a freshly loaded base: the next run's base is untouched
    again = lab.run("BitFit again", config, lr)
    assert again["task_after"] == ok["task_after"]
    # inspect sees the trained model of a run that finished: full fine-tuning moved every block matrix
    before = lab.fresh_base().state_dict()
    full = lab.run("full", None, 3e-4, inspect=lambda model: {"updated": sorted(weight_updates(model, before))})
    assert full["updated"] == [
        f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]


def test_full_fine_tuning_needs_more_memory_than_lora(corpus_file):
    data = load_corpus(str(corpus_file)).train
    full = peak_training_memory(lambda: tp.GPT(CFG, seed=0), data, SMALL)
    lora = peak_training_memory(lambda: tp.get_peft_model(tp.GPT(CFG, seed=0), tp.LoraConfig(r=2)), data, SMALL)
    weights = sum(v.nbytes for v in tp.GPT(CFG, seed=0).params.values())
    assert lora > weights  # the base's weights are built inside the measurement
    assert full > lora + 2 * weights  # a gradient and two AdamW moments per weight


def test_method_defaults_are_what_the_command_line_trains():
    config, lr = method_defaults("lora", "--rank", "4")
    assert (config.r, config.lora_alpha, config.target_modules, lr) == (4, 8, ["c_attn"], 1e-2)
    assert method_defaults("full") == (None, 3e-4)
    with pytest.raises(tp.ConfigError, match="unknown method 'dora'"):
        method_defaults("dora")


def test_plateau_is_the_smallest_setting_near_the_best():
    assert plateau([1, 2, 4, 8], [2.0, 1.5, 1.405, 1.4], 0.01) == 4
    assert plateau([1, 2, 4], [None, 1.5, float("nan")], 0.01) == 2
    assert plateau([1, 2], [None, None], 0.01) is None


def test_median_step_seconds():
    result = TrainResult(2, 1.0, 1.0, train_losses=[{"step": s, "seconds": t} for s, t in ((1, 5.0), (2, 1), (3, 2))])
    assert result.median_step_seconds() == 2
    assert math.isnan(TrainResult(1, 1.0, 1.0, train_losses=[{"step": 1, "loss": 2.0}]).median_step_seconds())


def test_pareto_front_keeps_the_points_nothing_beats_on_both_losses():
    points = [(2.0, 1.0), (1.8, 1.2), (1.9, 1.3), (1.7, 1.25), (1.8, 1.1), (1.6, 1.5), (1.6, 1.6), (1.9, float("nan"))]
    # (1.8, 1.2) loses to (1.8, 1.1); (1.9, 1.3) to (1.8, 1.1); (1.6, 1.6) to (1.6, 1.5)
    assert pareto_front(points) == [(1.6, 1.5), (1.7, 1.25), (1.8, 1.1), (2.0, 1.0)]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [(1.0, 1.0)]
    assert pareto_front([]) == []


def test_forgetting_at_gain_interpolates_along_the_trajectory():
    gains = [0.0, 0.1, 0.3, 0.25, 0.4]
    forgettings = [0.0, 0.05, 0.15, 0.2, 0.3]
    assert math.isclose(forgetting_at_gain(gains, forgettings, 0.2), 0.10)  # halfway from 0.1 to 0.3
    assert math.isclose(forgetting_at_gain(gains, forgettings, 0.1), 0.05)
    # the first crossing counts, not a later one after the gain dipped
    assert math.isclose(forgetting_at_gain(gains, forgettings, 0.28), 0.14)
    assert forgetting_at_gain(gains, forgettings, 0.5) is None
    assert forgetting_at_gain([0.2, 0.4], [0.3, 0.5], 0.1) == 0.3  # already there at the first evaluation
    assert forgetting_at_gain([0.0, float("nan"), 0.5], [0.0, 0.1, 0.2], 0.4) is None
    with pytest.raises(ValueError, match="2 gains against 1"):
        forgetting_at_gain([0.0, 0.1], [0.0], 0.1)


def test_rank_for_variance_counts_the_leading_directions():
    assert rank_for_variance([3.0, 1.0, 0.0], 0.9) == 1  # 9 of 10
    assert rank_for_variance([3.0, 1.0, 0.0], 0.91) == 2
    assert rank_for_variance([1.0, 3.0], 0.95) == 2  # sorted first
    assert rank_for_variance([1.0, 1.0, 1.0, 1.0], 1.0) == 4
    assert rank_for_variance([0.0, 0.0], 0.9) == 0
    with pytest.raises(ValueError, match="fraction"):
        rank_for_variance([1.0], 0.0)


def test_weight_updates_of_full_fine_tuning_and_of_merged_lora():
    base = tp.GPT(CFG, seed=0)
    before = base.state_dict()
    lora = tp.get_peft_model(tp.GPT(CFG, seed=0), tp.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    rng = np.random.default_rng(0)
    for value in lora.trainable_parameters().values():  # B starts at zero: give the update something to show
        value[...] = rng.normal(size=value.shape)
    updates = weight_updates(lora, before)
    assert list(updates) == ["transformer.h.0.attn.c_attn.weight"]
    delta = updates["transformer.h.0.attn.c_attn.weight"]
    singular_values = np.linalg.svd(delta, compute_uv=False)
    # rank 2, up to the float32 rounding of merging B A into W and subtracting W again
    assert delta.shape == (16, 48) and singular_values[1] > 1e3 * singular_values[2]
    assert rank_for_variance(singular_values, 0.999999) == 2
    name = "transformer.h.0.mlp.c_fc.weight"
    base.params[name] = base.params[name] + 1.0
    assert list(weight_updates(base, before)) == [name]
    np.testing.assert_allclose(weight_updates(base, before)[name], 1.0, rtol=1e-6)
