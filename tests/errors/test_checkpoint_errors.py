"""The error catalogue's training checkpoints: a resume from a run folder that is missing, damaged, or
written for another model, optimizer or training configuration. A refused resume changes nothing."""

from __future__ import annotations

import catalogue
import numpy as np
import pytest
from catalogue import (
    CFG,
    CHECKPOINT,
    DATA,
    RUN,
    Bad,
    assert_refused,
    cases_of,
    ids,
)

import tinypeft as tp
from tinypeft.errors import CheckpointError
from tinypeft.train import train

world = catalogue.world  # the fixture: the world the cases break, made once per module
CASES = cases_of("checkpoint")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_checkpoint_errors(world, case: Bad):
    assert_refused(world, case)


def test_failed_resume_changes_nothing(world):
    """Weights and optimizer state both valid on their own, the optimizer's for another optimizer:
    the weights must not have been restored when the optimizer state is refused."""
    run = world.variant(
        world.run_dir,
        {f"{CHECKPOINT}/optimizer.safetensors": lambda t: t | {"momentum/transformer.ln_f.bias": np.zeros(8)}},
    )
    model = tp.GPT(CFG, seed=0)  # the run's own base (another would be another run), not yet the trained weights
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(CheckpointError, match="slot 'momentum'"):
        train(model, DATA, RUN, run_dir=str(run), resume=True, progress=False)
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
