"""Training trajectories (issue 17): ten optimizer steps from a golden case. tinypeft passes its own (float64
exactly, float32 ten times under the tolerances), the torch port passes them through check-vectors, a port
without run_trajectory is told they were not run, a broken training step fails the trajectories it serves, and
the loader refuses a damaged trajectory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from port_mutations import PORT, TRAJECTORY_MUTATIONS, broken_port

from tinypeft.cli import main
from tinypeft.errors import CheckpointError
from tinypeft.vectors import (
    TRAJECTORY_SPECS,
    check_trajectories,
    compare_trajectory,
    load_port,
    load_trajectories,
    run_trajectory,
)


@pytest.fixture(scope="module")
def trajectories(vectors, cases):
    return load_trajectories(vectors, cases)


def test_every_trajectory_in_both_dtypes_and_the_optimizers_they_cover(trajectories):
    assert len(trajectories) == 2 * len(TRAJECTORY_SPECS)
    settings = [t.spec for t in trajectories]
    assert {s["optimizer"]["name"] for s in settings} == {"AdamW", "SGD"}
    assert any(s["optimizer"]["name"] == "SGD" and s["optimizer"]["momentum"] > 0 for s in settings)
    assert any(s["grad_clip"] == 0 for s in settings) and any(s["warmup_steps"] == 0 for s in settings)
    for t in trajectories:
        assert len(t.losses) == t.spec["steps"] == 10
        assert t.losses[-1] < t.losses[0], t.name  # it trains
        for name, final in t.params.items():  # every tensor moves off its start
            start = t.case.weights[name]
            assert np.linalg.norm(final - start) > 1e-3 * np.linalg.norm(start), (t.name, name)


def test_clipping_binds_on_some_steps_and_not_on_others(trajectories):
    """A clipped trajectory whose gradient norm is above the limit on some steps and below it on others
    checks both branches; the lr schedule warms up and decays."""
    t = next(t for t in trajectories if t.name == "lora-odd-adamw-float64")
    assert t.lrs[0] < t.lrs[2] == max(t.lrs) and t.lrs[-1] < t.lrs[3]


def test_tinypeft_passes_its_own_trajectories(trajectories):
    for t in trajectories:
        report = compare_trajectory(t, run_trajectory(t.port_input()))
        assert report.passed, (t.name, report.failure, [c for c in report.checks if not c.passed])
        for check in report.checks:
            assert check.error <= (1e-14 if t.case.dtype == "float64" else check.tolerance / 10), (t.name, check)


def test_the_port_passes_every_trajectory_through_check_vectors(vectors, capsys):
    assert main(["check-vectors", str(vectors), "--impl", str(PORT), "--cases", "lora-odd-*", "ia3-padded-*"]) == 0
    out = capsys.readouterr().out
    assert "lora-odd-adamw-float32" in out and "ia3-padded-adamw-float64" in out


def test_a_port_without_run_trajectory_is_told_and_passes(vectors, tmp_path, capsys):
    impl = tmp_path / "cases_only.py"
    impl.write_text("from tinypeft.vectors import run_case\n")
    assert main(["check-vectors", str(vectors), "--impl", str(impl), "--cases", "lora-odd-*"]) == 0
    out = capsys.readouterr().out
    assert f"2 training trajectories not run: {impl} has no run_trajectory (VECTORS.md)" in out
    assert "2 cases: 2 passed, 0 failed" in out


def test_float64_tensors_back_from_a_float32_trajectory_fail(trajectories):
    t = next(t for t in trajectories if t.name == "dora-odd-adamw-float32")
    result = run_trajectory(t.port_input())
    name = sorted(result["params"])[0]
    result["params"][name] = result["params"][name].astype(np.float64)
    report = compare_trajectory(t, result)
    assert [c.note for c in report.checks if not c.passed] == [
        f"{name} is float64; a float32 case needs float32 arrays back"
    ]


@pytest.mark.parametrize("name", TRAJECTORY_MUTATIONS)
def test_breaking_a_training_step_fails_the_trajectories_it_serves(name, trajectories, tmp_path):
    mutation = TRAJECTORY_MUTATIONS[name]
    broken = tmp_path / "broken_port.py"
    broken.write_text(broken_port(name))
    mine = [t for t in trajectories if mutation.breaks(t) and t.case.dtype == "float64"]
    assert mine, "the mutation must break some trajectory"
    survivors = [r.name for r in check_trajectories(mine, load_port(str(broken))[1]) if r.passed]
    assert not survivors, f"{name}: these trajectories still pass: {survivors}"


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda d: d["expected"]["losses"].pop(), "expected 'losses' must be 10 finite numbers"),
        (lambda d: d["optimizer"].update(name="Lion"), "an optimizer tinypeft cannot run"),
        (lambda d: d["tolerance"]["params"].popitem(), "'tolerance' must hold losses and params"),
        (lambda d: d["expected"].update(params=["x"]), "exactly the case's trainable tensors"),
    ],
)  # fmt: skip
def test_the_loader_refuses_a_damaged_trajectory(vectors, cases, tmp_path, damage, fragment):
    name = "lora-odd-adamw-float64"
    copy = tmp_path / "v"
    copy.mkdir()
    shutil.copytree(Path(vectors) / name, copy / name)
    (copy / "index.json").write_text(json.dumps({"trajectories": [name]}))
    doc = json.loads((copy / name / "trajectory.json").read_text())
    damage(doc)
    (copy / name / "trajectory.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_trajectories(copy, cases)


def test_run_trajectory_with_cuda_as_the_default_device_passes(trajectories, monkeypatch):
    """On a CUDA default device (the CuPy stand-in) tinypeft trains there and returns host arrays; the expected
    values were computed on the CPU whatever the default."""
    import fake_cupy

    from tinypeft import runtime

    t = next(t for t in trajectories if t.name == "lora-odd-adamw-float32")
    monkeypatch.setenv(runtime.BACKEND_ENV, "cuda")
    with fake_cupy.installed():
        report = compare_trajectory(t, run_trajectory(t.port_input()))
    assert report.passed, report
