"""The error catalogue's configurations: models, optimizers, training runs and PeftModels configured
wrongly, and every configuration a method refuses (declared in the method's file, read from the
registry). A config whose fields hold NumPy scalars is accepted, and saved as plain numbers."""

from __future__ import annotations

import dataclasses
import json

import catalogue
import numpy as np
import pytest
from catalogue import (
    CFG,
    DATA,
    RUN,
    Bad,
    assert_refused,
    cases_of,
    ids,
)

import tinypeft as tp
from tinypeft.train import train

world = catalogue.world  # the fixture: the world the cases break, made once per module
CASES = cases_of("config")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_configuration_errors(world, case: Bad):
    assert_refused(world, case)


def test_numpy_scalars_in_configs_are_saved_as_numbers(tmp_path):
    """Sizes and seeds given as NumPy integers are accepted, so they must also reach the JSON files."""
    cfg = tp.GPTConfig(
        vocab_size=np.int64(32), n_positions=np.int32(16), n_embd=8, n_layer=1, n_head=2, n_inner=np.int64(12)
    )
    tp.GPT(cfg).save_pretrained(tmp_path / "model")
    assert tp.GPT.from_pretrained(tmp_path / "model").config == cfg
    run = dataclasses.replace(RUN, steps=2, seed=np.int64(3))
    train(tp.GPT(CFG), DATA, run, run_dir=str(tmp_path / "run"), progress=False)
    assert json.loads((tmp_path / "run/checkpoints/step-000002/state.json").read_text())["train_config"]["seed"] == 3
