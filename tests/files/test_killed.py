"""No lost work: a process killed (SIGKILL) in the middle of a save leaves the previous checkpoint,
model or adapter loadable and intact, and a killed command-line run resumed with --resume ends with
exactly the weights of an uninterrupted run.

The kill lands mid-write every time: the child (tests/killable_save.py) writes half of the chosen
file's bytes to its temporary file, fsyncs them, signals, and waits to be killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from killable_save import DATA, TRAIN, adapter, model
from safetensors.numpy import load_file

import tinypeft as tp
from tinypeft.cli import main
from tinypeft.train import TrainConfig, TrainResult, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).resolve().parents[1] / "killable_save.py"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def kill_mid_write(tmp_path: Path, target: str, occurrence: int, *mode: str) -> None:
    """Run the helper until it is in the middle of writing `target` (its occurrence-th write), then SIGKILL it."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, str(HELPER), target, str(occurrence), str(ready), *mode],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended before it reached the write: {child.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the child did not reach the write in 120 s")
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def half_written(folder: Path, name: str) -> list[Path]:
    """The temporary files the killed write left (atomic_write_bytes names them .NAME.*.tmp)."""
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.stat().st_size > 0]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------ training checkpoints
@pytest.fixture(scope="module")
def uninterrupted():
    straight = model(0)
    result = train(straight, DATA, TRAIN, progress=False)
    return straight.params, result


@pytest.mark.parametrize("target", ["trainable.safetensors", "optimizer.safetensors", "state.json", "latest.json"])
def test_checkpoint_survives_a_kill_mid_save(tmp_path, uninterrupted, target):
    """Killed while writing the step-4 checkpoint: latest.json still names step 2, which loads, and
    resuming from it ends exactly where the uninterrupted run does."""
    run = tmp_path / "run"
    kill_mid_write(tmp_path, target, 2, "train", str(run))
    checkpoints = run / "checkpoints"
    folder = checkpoints if target == "latest.json" else checkpoints / "step-000004"
    assert half_written(folder, target), "the kill did not land inside the write"
    assert json.loads((checkpoints / "latest.json").read_text()) == {"step": 2, "path": "step-000002"}

    restored = model(0)
    optimizer = TRAIN.make_optimizer()
    step = load_checkpoint(str(run), restored, optimizer, np.random.default_rng(), TrainResult(0, 0, 0), TRAIN)
    assert step == 2 and optimizer.t == 2
    assert all(np.isfinite(v).all() for v in restored.params.values())

    resumed = model(0)
    result = train(resumed, DATA, TRAIN, run_dir=str(run), resume=True, progress=False)
    straight_params, straight_result = uninterrupted
    assert_same_params(resumed.params, straight_params)
    assert [r["loss"] for r in result.train_losses] == [r["loss"] for r in straight_result.train_losses]
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 6


# ------------------------------------------------------------------ saved models and adapters
@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_model_survives_a_kill_mid_save(tmp_path, target):
    """Saving model(1) over model(0), killed mid-write: the folder loads, and holds one complete
    model: the previous one if the weights were being written, the new weights if the config was
    (written second, and the same config)."""
    folder = tmp_path / "model"
    model(0).save_pretrained(folder)
    kill_mid_write(tmp_path, target, 1, "model", str(folder), "1")
    assert half_written(folder, target), "the kill did not land inside the write"
    loaded = tp.GPT.from_pretrained(folder)
    expected = model(0) if target == "model.safetensors" else model(1)
    assert_same_params(loaded.params, expected.params)


@pytest.mark.parametrize("target", ["adapter_model.safetensors", "adapter_config.json"])
def test_adapter_survives_a_kill_mid_save(tmp_path, target):
    folder = tmp_path / "adapter"
    adapter(0).save_pretrained(folder)
    kill_mid_write(tmp_path, target, 1, "adapter", str(folder), "1")
    assert half_written(folder, target), "the kill did not land inside the write"
    loaded = tp.PeftModel.from_pretrained(model(0), folder)
    expected = adapter(0) if target == "adapter_model.safetensors" else adapter(1)
    assert_same_params(loaded.adapter_state_dict(), expected.adapter_state_dict())


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """A write that fails (here fsync reports a full disk) raises, keeps the previous model, and
    removes its temporary file."""
    folder = tmp_path / "model"
    model(0).save_pretrained(folder)
    before = sorted(p.name for p in folder.iterdir())

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model(1).save_pretrained(folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == before
    assert_same_params(tp.GPT.from_pretrained(folder).params, model(0).params)


# ------------------------------------------------------------------ the command line, killed and resumed
TINY = ["--batch_size", "2", "--seq_len", "32", "--eval_every", "4", "--eval_windows", "2", "--checkpoint_every", "2",
        "--warmup_steps", "2", "--no_progress"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus file: both commands read it quickly."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300)))
    return path


def pretrain_args(out: Path, corpus: Path) -> list[str]:
    return ["pretrain", "--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--n_positions", "64", "--steps", "8",
            "--corpus", str(corpus), "--out", str(out), *TINY]  # fmt: skip


def finetune_args(out: Path, base: Path, corpus: Path) -> list[str]:
    # LoRA with dropout: the resumed run must also draw the same dropout masks
    return ["finetune", "--base", str(base), "--method", "lora", "--rank", "2", "--lora_dropout", "0.1",
            "--steps", "8", "--corpus", str(corpus),
            "--prose_corpus", str(corpus), "--sample_bytes", "4", "--out", str(out), *TINY]  # fmt: skip


def cli_resume(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tinypeft.cli", *args, "--resume"], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("pretrain-straight")
    assert main(pretrain_args(out, corpus)) == 0
    return out


@pytest.mark.slow
def test_cli_pretrain_killed_then_resumed_equals_uninterrupted(tmp_path, corpus, pretrained):
    out = tmp_path / "run"
    kill_mid_write(tmp_path, "trainable.safetensors", 2, "cli", *pretrain_args(out, corpus))
    assert not (out / "model").exists()
    cli_resume(pretrain_args(out, corpus))
    weights = "model/model.safetensors"
    assert_same_params(load_file(out / weights), load_file(pretrained / weights))
    summary, straight = (json.loads((p / "summary.json").read_text()) for p in (out, pretrained))
    assert summary["evals"] == straight["evals"]


@pytest.mark.slow
def test_cli_finetune_killed_then_resumed_equals_uninterrupted(tmp_path, corpus, pretrained):
    base = pretrained / "model"
    straight = tmp_path / "straight"
    assert main(finetune_args(straight, base, corpus)) == 0
    out = tmp_path / "run"
    kill_mid_write(tmp_path, "optimizer.safetensors", 3, "cli", *finetune_args(out, base, corpus))
    cli_resume(finetune_args(out, base, corpus))
    saved = "adapter/adapter_model.safetensors"
    assert_same_params(load_file(out / saved), load_file(straight / saved))
    summary, reference = (json.loads((p / "summary.json").read_text()) for p in (out, straight))
    assert summary["after"] == reference["after"] and summary["evals"] == reference["evals"]


def test_cli_non_finite_loss_exits_2_and_keeps_the_last_good_checkpoint(tmp_path, corpus, capsys):
    """A learning rate of 1e30 blows the float32 weights up after the first update; the command stops
    at the first non-finite loss with one line naming the checkpoint that is left, and that
    checkpoint loads with finite weights."""
    out = tmp_path / "run"
    args = [*pretrain_args(out, corpus), "--learning_rate", "1e30", "--warmup_steps", "0", "--checkpoint_every", "1"]
    with np.errstate(all="ignore"):
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinypeft pretrain: error: the loss became non-finite at step 2") and "\n" not in err
    kept = out / "checkpoints" / "step-000001"
    assert f"Last good checkpoint: {kept}" in err
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    restored = tp.GPT(tp.GPTConfig(vocab_size=256, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    saved = TrainConfig(**json.loads((kept / "state.json").read_text())["train_config"])
    rng, result = np.random.default_rng(), TrainResult(0, 0, 0)
    step = load_checkpoint(str(out), restored, saved.make_optimizer(), rng, result, saved)
    assert step == 1 and all(np.isfinite(v).all() for v in restored.params.values())
