"""The error catalogue's model and adapter files: missing, truncated, corrupt, pickled, of the wrong
names, shapes or dtypes, or written for another model or method. Besides the catalogue: a failed load
changes nothing, no pickle is ever unpickled, and the command line reports a bad file or an unusable
output folder in one line."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import catalogue
import numpy as np
import pytest
import torch
from catalogue import (
    CFG,
    CHECKPOINT,
    Bad,
    Raw,
    assert_refused,
    cases_of,
    first_tensor,
    ids,
    load_adapter,
    load_model,
    resume,
)
from limits import time_bound

import tinypeft as tp
from tinypeft.errors import CheckpointError

world = catalogue.world  # the fixture: the world the cases break, made once per module
CASES = cases_of("file")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_file_errors(world, case: Bad):
    assert_refused(world, case)


# ------------------------------------------------------------------ a failed load changes nothing
def test_failed_model_load_changes_nothing(world):
    model = tp.GPT(CFG, seed=1)
    before = {k: v.copy() for k, v in model.params.items()}
    state = world.base.state_dict()
    state["transformer.ln_f.bias"] = np.zeros(3, np.float32)  # the last tensor: everything before it was fine
    with pytest.raises(CheckpointError):
        model.load_state_dict(state)
    assert model.params.keys() == before.keys()
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_failed_adapter_load_changes_nothing(world):
    model = world.peft()
    before = {k: v.copy() for k, v in model.trainable_parameters().items()}
    state = model.adapter_state_dict()
    state[sorted(state)[-1]] = np.zeros(1)
    with pytest.raises(CheckpointError):
        model.load_adapter_state_dict(state)
    for k, v in model.trainable_parameters().items():
        np.testing.assert_array_equal(v, before[k])
    broken = world.variant(world.adapter_dir, {"adapter_model.safetensors": first_tensor(lambda a: a[:1])})
    with pytest.raises(CheckpointError):
        model.load_adapter(broken, "second")
    assert list(model.adapters) == ["default"]


# ------------------------------------------------------------------ pickles are never loaded
class Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that create `marker` when unpickled: plain pickles of old and new protocols, and a
    torch.save archive (a zip holding a pickle)."""
    buffer = io.BytesIO()
    torch.save({"weight": Payload(str(marker))}, buffer)
    return {
        "pickle protocol 0": pickle.dumps(Payload(str(marker)), protocol=0),
        "pickle protocol 2": pickle.dumps(Payload(str(marker)), protocol=2),
        "pickle protocol 5": pickle.dumps(Payload(str(marker)), protocol=5),
        "torch.save": buffer.getvalue(),
    }


def test_pickles_are_refused_and_never_loaded(world, tmp_path):
    marker = tmp_path / "unpickled"
    for kind, payload in payloads(marker).items():
        unpickled = (
            torch.load(io.BytesIO(payload), weights_only=False) if kind == "torch.save" else pickle.loads(payload)
        )
        assert marker.exists(), f"{kind}: the payload does not work, so this test would prove nothing"
        (unpickled["weight"] if kind == "torch.save" else unpickled).close()
        marker.unlink()
        loads = {
            "model.safetensors": load_model({"model.safetensors": payload}),
            "pytorch_model.bin": load_model({"model.safetensors": None, "pytorch_model.bin": payload}),
            "adapter_model.safetensors": load_adapter({"adapter_model.safetensors": payload}),
            "adapter_model.bin": load_adapter({"adapter_model.safetensors": None, "adapter_model.bin": payload}),
            "trainable.safetensors": resume({f"{CHECKPOINT}/trainable.safetensors": payload}),
            "optimizer.safetensors": resume({f"{CHECKPOINT}/optimizer.safetensors": payload}),
        }
        for where, load in loads.items():
            with pytest.raises(CheckpointError):
                load(world)
            assert not marker.exists(), f"{kind} as {where} was unpickled"


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("command", ["eval", "generate", "merge"])
def test_cli_reports_a_corrupt_file_in_one_line(world, command, capsys):
    from tinypeft.cli import main

    model = world.variant(world.model_dir, {"config.json": Raw(lambda b: b[:10])})
    extra = {
        "eval": ["--corpus", "prose"],
        "generate": [],
        "merge": ["--adapter", str(world.adapter_dir), "--out", str(world.root / "merged")],
    }[command]
    assert main([command, "--model", str(model), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tinypeft {command}: error: ") and "config.json is not valid JSON" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_reports_an_unwritable_out_folder_before_training(tmp_path, capsys):
    from tinypeft.cli import main

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with time_bound(20):  # refused at once, not after the first steps of a long run
        assert main(["pretrain", "--out", str(blocked / "run"), "--steps", "100000", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tinypeft pretrain: error: [Errno 20] Not a directory") and err.count("\n") == 1
