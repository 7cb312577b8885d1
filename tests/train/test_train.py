"""The training loop: it learns, it trains only what is trainable, it resumes bit-exactly, and it
stops cleanly on a non-finite loss keeping the last good checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import tinypeft as tp
from tinypeft.errors import CheckpointError, TrainingError
from tinypeft.train import TrainConfig, evaluate, train

DATA = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 400).encode(), dtype=np.uint8)
CFG = tp.GPTConfig(vocab_size=256, n_positions=32, n_embd=16, n_layer=2, n_head=2)


def quick(**kw):
    return TrainConfig(
        **(
            {
                "steps": 30,
                "batch_size": 4,
                "seq_len": 24,
                "lr": 1e-2,
                "warmup_steps": 3,
                "eval_every": 10,
                "eval_windows": 4,
            }
            | kw
        )
    )


def test_training_lowers_the_loss():
    model = tp.GPT(CFG, seed=0)
    before = evaluate(model, DATA, 24, 4)
    result = train(model, DATA, quick(), eval_sets={"val": DATA}, progress=False)
    assert result.evals[-1]["val"] < before - 1.0
    assert [row["step"] for row in result.evals] == [0, 10, 20, 30]


def test_peft_training_changes_only_adapter_tensors():
    base = tp.GPT(CFG, seed=0)
    snapshot = {k: v.copy() for k, v in base.params.items()}
    model = tp.get_peft_model(base, tp.BitFitConfig())
    adapter_before = {k: v.copy() for k, v in model.trainable_parameters().items()}
    train(model, DATA, quick(steps=5), progress=False)
    for k, v in base.params.items():
        np.testing.assert_array_equal(v, snapshot[k])
    assert all(not np.array_equal(v, adapter_before[k]) for k, v in model.trainable_parameters().items())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    config = quick(optimizer=optimizer, checkpoint_every=7)
    straight = tp.GPT(CFG, seed=0)
    full = train(straight, DATA, config, eval_sets={"val": DATA}, progress=False)

    interrupted = tp.GPT(CFG, seed=0)
    train(interrupted, DATA, config, eval_sets={"val": DATA}, run_dir=str(tmp_path), progress=False, stop_after=17)
    resumed = tp.GPT(CFG, seed=0)  # a fresh process would start from scratch like this
    result = train(resumed, DATA, config, eval_sets={"val": DATA}, run_dir=str(tmp_path), resume=True, progress=False)
    for k, v in straight.params.items():
        np.testing.assert_array_equal(resumed.params[k], v, err_msg=k)
    assert [r["loss"] for r in result.train_losses] == [r["loss"] for r in full.train_losses]
    assert result.evals == full.evals


def test_resume_refuses_other_settings(tmp_path):
    model = tp.GPT(CFG, seed=0)
    train(model, DATA, quick(steps=4), run_dir=str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match="differs"):
        train(model, DATA, quick(steps=4, lr=0.5), run_dir=str(tmp_path), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(model, DATA, quick(), run_dir=str(tmp_path / "empty"), resume=True, progress=False)


class FailsAtCall:
    """A model whose loss turns NaN at the n-th call of loss_and_grad (as a diverging run would)."""

    def __init__(self, model, n):
        self.model, self.n, self.calls = model, n, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def loss_and_grad(self, ids, labels, mask=None):
        self.calls += 1
        loss, grads = self.model.loss_and_grad(ids, labels, mask)
        return (float("nan") if self.calls == self.n else loss), grads


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    config = quick(steps=20, checkpoint_every=5)
    model = FailsAtCall(tp.GPT(CFG, seed=0), n=8)
    with pytest.raises(TrainingError, match=r"non-finite at step 8.*step-000005"):
        train(model, DATA, config, run_dir=str(tmp_path), progress=False)
    reference = tp.GPT(CFG, seed=0)  # the same run, stopped after the checkpointed step 5
    train(reference, DATA, config, progress=False, stop_after=5)
    resumed = tp.GPT(CFG, seed=0)
    train(resumed, DATA, config, run_dir=str(tmp_path), resume=True, progress=False, stop_after=5)
    for k, v in reference.params.items():
        np.testing.assert_array_equal(resumed.params[k], v)


PEFT_METHODS = {
    "bitfit": tp.BitFitConfig,
    "lntuning": tp.LNTuningConfig,
    "prompt": lambda: tp.PromptTuningConfig(num_virtual_tokens=4),
    "ptuning": lambda: tp.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=6),
    "prefix": lambda: tp.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True),
    "ia3": tp.IA3Config,
    "adapter": lambda: tp.AdapterConfig(bottleneck_size=4),
    "lora": lambda: tp.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.1),
    "dora": lambda: tp.LoraConfig(r=4, use_dora=True, use_rslora=True),
    "vera": lambda: tp.VeraConfig(r=16, target_modules=["c_attn", "c_fc"], vera_dropout=0.1, projection_prng_key=5),
    # the allocator's statistics and rank pattern resume too: it prunes from step 3 on, every 2 steps, final at 25
    "adalora": lambda: tp.AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=3,
        tfinal=5,
        deltaT=2,
        total_step=30,
        lora_dropout=0.1,
        target_modules=["c_attn", "c_fc"],
    ),
}


@pytest.mark.parametrize("method", PEFT_METHODS.values(), ids=PEFT_METHODS.keys())
def test_peft_resume_is_bit_exact(tmp_path, method):
    """A PeftModel resumed from a checkpoint into a fresh base and adapter continues exactly; the base
    is never touched."""
    config = quick(checkpoint_every=7)
    straight = tp.get_peft_model(tp.GPT(CFG, seed=0), method())
    full = train(straight, DATA, config, eval_sets={"val": DATA}, progress=False)

    interrupted = tp.get_peft_model(tp.GPT(CFG, seed=0), method())
    train(interrupted, DATA, config, eval_sets={"val": DATA}, run_dir=str(tmp_path), progress=False, stop_after=17)
    base = tp.GPT(CFG, seed=0)
    resumed = tp.get_peft_model(base, method())
    result = train(resumed, DATA, config, eval_sets={"val": DATA}, run_dir=str(tmp_path), resume=True, progress=False)
    for k, v in straight.adapter_state_dict().items():
        np.testing.assert_array_equal(resumed.adapter_state_dict()[k], v, err_msg=k)
    assert [r["loss"] for r in result.train_losses] == [r["loss"] for r in full.train_losses]
    assert result.evals == full.evals
    for k, v in tp.GPT(CFG, seed=0).params.items():
        np.testing.assert_array_equal(base.params[k], v)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    config = quick(steps=6, eval_every=3)
    model = tp.GPT(CFG, seed=0)
    first = train(model, DATA, config, eval_sets={"val": DATA}, run_dir=str(tmp_path), progress=False)
    again = tp.GPT(CFG, seed=0)
    second = train(again, DATA, config, eval_sets={"val": DATA}, run_dir=str(tmp_path), resume=True, progress=False)
    for k, v in model.params.items():
        np.testing.assert_array_equal(again.params[k], v)
    assert second.evals == first.evals and second.train_losses == first.train_losses


class OverflowsAtCall(FailsAtCall):
    """A model whose weights become inf during the n-th call (as an overflowing update leaves them)
    while the loss it reports stays finite: only the checkpoint guard can notice."""

    def loss_and_grad(self, ids, labels, mask=None):
        self.calls += 1
        result = self.model.loss_and_grad(ids, labels, mask)
        if self.calls == self.n:
            self.model.params["transformer.ln_f.bias"][...] = np.inf
        return result


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    config = quick(steps=20, checkpoint_every=5)
    model = OverflowsAtCall(tp.GPT(CFG, seed=0), n=10)  # during step 10, the one a checkpoint follows
    with pytest.raises(TrainingError, match=r"after step 10 the weights hold non-finite.*step-000005"):
        train(model, DATA, config, run_dir=str(tmp_path), progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step-000005"]
    reference = tp.GPT(CFG, seed=0)
    train(reference, DATA, config, progress=False, stop_after=5)
    resumed = tp.GPT(CFG, seed=0)
    train(resumed, DATA, config, run_dir=str(tmp_path), resume=True, progress=False, stop_after=5)
    for k, v in reference.params.items():
        np.testing.assert_array_equal(resumed.params[k], v)


@pytest.mark.parametrize(
    "model_rng, message",
    [(True, "must be an object of random-generator states; got bool"), ({"lora": {}}, "draws no random masks")],
)
def test_random_states_a_model_cannot_hold_are_refused_on_resume(tmp_path, model_rng, message):
    """(Found by the fuzzer: a full fine-tuning checkpoint whose state.json says model_rng: true got an
    AttributeError from deep inside resume.)"""
    import json

    config = quick(steps=4, checkpoint_every=2)
    train(tp.GPT(CFG, seed=0), DATA, config, run_dir=str(tmp_path), progress=False)
    for state_path in tmp_path.glob("checkpoints/step-*/state.json"):  # whichever the run resumes from
        state = json.loads(state_path.read_text())
        state_path.write_text(json.dumps(state | {"model_rng": model_rng}))
    model = tp.GPT(CFG, seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(CheckpointError, match=message):
        train(model, DATA, config, run_dir=str(tmp_path), resume=True, progress=False)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


def test_resume_keeps_the_time_already_spent(tmp_path, monkeypatch):
    """A resumed run's `seconds` is the whole run's: the interrupted part's time plus its own (issue 15,
    item 11c). A fake clock that ticks one second a reading makes the figures exact."""
    import importlib
    import itertools

    train_module = importlib.import_module("tinypeft.train")  # tinypeft.train is also the function tp.train

    ticks = itertools.count()
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(ticks)))
    config = quick(steps=10, eval_every=0, checkpoint_every=0)
    first = train(tp.GPT(CFG, seed=0), DATA, config, run_dir=str(tmp_path), progress=False, stop_after=4)
    rest = train(tp.GPT(CFG, seed=0), DATA, config, run_dir=str(tmp_path), resume=True, progress=False)
    assert first.seconds > 0
    own = train(tp.GPT(CFG, seed=0), DATA, config, run_dir=str(tmp_path / "b"), progress=False, stop_after=6)
    assert rest.seconds > first.seconds
    assert rest.seconds == first.seconds + own.seconds  # the resumed part ran 6 steps, as `own` did


# ------------------------------------------------------------- a run's identity and folder (issue 15, items 1, 2)
def lora(**kw):
    return tp.get_peft_model(tp.GPT(CFG, seed=0), tp.LoraConfig(**{"r": 2, "lora_alpha": 4} | kw))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("lora_alpha", "method.lora_alpha: now 8, saved 4"),
        ("use_rslora", "method.use_rslora: now True, saved False"),
        ("corpus", "train_data_sha256"),
        ("base", "base_weights_sha256"),
        ("threads", "threads: now 3, saved 2"),
    ],
)
def test_resume_refuses_another_run_and_names_the_difference(tmp_path, monkeypatch, change, named):
    monkeypatch.setenv("TINYPEFT_THREADS", "2")
    config = quick(steps=4, eval_every=0)
    train(lora(), DATA, config, run_dir=str(tmp_path), progress=False)
    model, data = lora(), DATA
    if change == "lora_alpha":
        model = lora(lora_alpha=8)
    elif change == "use_rslora":
        model = lora(use_rslora=True)
    elif change == "corpus":
        data = DATA[::-1].copy()
    elif change == "base":
        model = tp.get_peft_model(tp.GPT(CFG, seed=1), tp.LoraConfig(r=2, lora_alpha=4))
    else:
        monkeypatch.setenv("TINYPEFT_THREADS", "3")
    with pytest.raises(CheckpointError, match="this is another run") as caught:
        train(model, data, config, run_dir=str(tmp_path), resume=True, progress=False)
    assert named in str(caught.value)


def test_extending_a_finished_run_says_what_it_does_to_the_schedule(tmp_path):
    lines = []
    train(tp.GPT(CFG, seed=0), DATA, quick(steps=6, eval_every=0), run_dir=str(tmp_path), progress=False)
    longer = quick(steps=10, eval_every=0)
    result = train(tp.GPT(CFG, seed=0), DATA, longer, run_dir=str(tmp_path), resume=True, log=lines.append)
    assert result.steps == 10 and [r["step"] for r in result.train_losses] == list(range(1, 11))
    said = " ".join(lines)
    assert "extending the run from 6 to 10 steps" in said
    assert f"step 7 trains at learning rate {longer.lr_at(6):.3g}" in said and "it had ended" in said


def test_a_new_run_refuses_a_folder_holding_another_run_unless_told_to_overwrite(tmp_path):
    train(tp.GPT(CFG, seed=0), DATA, quick(steps=3, eval_every=0), run_dir=str(tmp_path), progress=False)
    before = sorted((tmp_path / "checkpoints").iterdir())
    with pytest.raises(tp.ConfigError, match="holds another run's checkpoints"):
        train(tp.GPT(CFG, seed=0), DATA, quick(steps=2, eval_every=0), run_dir=str(tmp_path), progress=False)
    assert sorted((tmp_path / "checkpoints").iterdir()) == before  # nothing deleted
    lines = []
    result = train(
        tp.GPT(CFG, seed=0), DATA, quick(steps=2, eval_every=0), run_dir=str(tmp_path), log=lines.append, overwrite=True
    )
    assert result.steps == 2 and any("overwriting the run" in line for line in lines)


def test_a_run_folder_in_use_is_refused(tmp_path):
    """Another process holds the folder's lock (flock: a second open file in this process conflicts as
    another process's would)."""
    import fcntl
    import os

    train(tp.GPT(CFG, seed=0), DATA, quick(steps=2, eval_every=0), run_dir=str(tmp_path), progress=False)
    fd = os.open(tmp_path / ".tinypeft.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242", 0)
        with pytest.raises(tp.ConfigError, match=r"in use by another tinypeft run \(process 4242\)"):
            train(tp.GPT(CFG, seed=0), DATA, quick(steps=2), run_dir=str(tmp_path), resume=True, progress=False)
    finally:
        os.close(fd)
    train(tp.GPT(CFG, seed=0), DATA, quick(steps=2, eval_every=0), run_dir=str(tmp_path), resume=True, progress=False)
