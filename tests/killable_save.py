"""A process to kill in the middle of a save (run by test_killed.py).

    python tests/killable_save.py FILE N READY MODE ARGS...

runs MODE with tinypeft's atomic writes instrumented: the N-th write of a file named FILE writes
half of its bytes to the temporary file, flushes and fsyncs them, creates READY, and waits to be
killed. So the parent's SIGKILL lands in the middle of that write every time, not by luck of timing.
Nothing in tinypeft is changed: the hook wraps the tempfile.mkstemp and os.fdopen it calls.

MODE is one of
    train RUN_DIR         the training run TRAIN below (checkpoints every 2 steps)
    model FOLDER SEED     save `model(SEED)` to FOLDER
    adapter FOLDER SEED   save `adapter(SEED)` to FOLDER
    cli ARGS...           the tinypeft command line
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

import tinypeft as tp
from tinypeft.train import TrainConfig, train

CFG = tp.GPTConfig(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2)
DATA = np.random.default_rng(0).integers(0, 32, size=400).astype(np.uint8)
TRAIN = TrainConfig(steps=6, batch_size=2, seq_len=8, warmup_steps=1, eval_every=0, eval_windows=1, checkpoint_every=2)


def model(seed: int) -> tp.GPT:
    return tp.GPT(CFG, seed=seed)


def adapter(seed: int) -> tp.PeftModel:
    """A BitFit adapter of model(0) whose tensors depend on seed (fresh BitFit copies are all zeros)."""
    peft = tp.get_peft_model(model(0), tp.BitFitConfig())
    rng = np.random.default_rng(seed)
    for p in peft.trainable_parameters().values():
        p += rng.standard_normal(p.shape).astype(p.dtype)
    return peft


def instrument(target: str, occurrence: int, ready: str) -> None:
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
    last_temp = [""]
    seen = [0]

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        last_temp[0] = path
        return fd, path

    class HalfThenWait:
        def __init__(self, file):
            self.file = file

        def write(self, data: bytes) -> None:
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            os.fsync(self.file.fileno())
            open(ready, "w").close()
            while True:
                time.sleep(60)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        # atomic_write_bytes names its temporary file ".<target name>.<random>.tmp"
        if os.path.basename(last_temp[0]).startswith(f".{target}."):
            seen[0] += 1
            if seen[0] == occurrence:
                return HalfThenWait(file)
        return file

    tempfile.mkstemp = mkstemp
    os.fdopen = fdopen


def main(argv: list[str]) -> None:
    target, occurrence, ready, mode, *args = argv
    instrument(target, int(occurrence), ready)
    if mode == "train":
        train(model(0), DATA, TRAIN, run_dir=args[0], progress=False)
    elif mode == "model":
        model(int(args[1])).save_pretrained(args[0])
    elif mode == "adapter":
        adapter(int(args[1])).save_pretrained(args[0])
    elif mode == "cli":
        from tinypeft.cli import main as cli

        cli(args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    raise SystemExit(f"finished without reaching write {occurrence} of {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
