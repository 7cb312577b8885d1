"""Training-trajectory vectors: ten optimizer steps from a golden case, as llm.c checks its first training
steps. A trajectory starts from a case's weights and batch and takes STEPS steps on that same batch with
tinypeft's optimizer (AdamW or SGD with momentum, weight decay on matrices, the gradient clipped by its global
norm, the learning rate warmed up then decayed on a cosine): the loss before each step and the trainable
tensors after the last are what a port must reproduce. A port opts in with `run_trajectory(input)` beside its
`run_case`; VECTORS.md describes the files and the formulas.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..errors import CheckpointError, ConfigError
from ..gradcheck import model_loss_fn
from ..io import load_safetensors, save_json, save_safetensors
from ..optim import SGD, AdamW, Optimizer, clip_grad_norm, cosine_schedule
from .checker import CaseReport, TensorCheck, _raised, build, check_array
from .format import FORMAT, VERSION, Array, Case, _short, load_listed, read_document

TRAJECTORY_NAME = "trajectory.json"
FINAL_NAME = "final.safetensors"
STEPS = 10
# the loss of each step and the tensors after the last: float64 leaves room for another order of summation;
# float32's rounding of one step is carried, and amplified by Adam's normalisation, through the others
TOLERANCES = {"float64": {"losses": 1e-10, "params": 1e-10}, "float32": {"losses": 1e-5, "params": 1e-4}}
RunTrajectory = Callable[[dict[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class TrajectorySpec:
    """Ten steps from the golden case `case` (a GoldenCase name): the optimizer's settings (`name` AdamW or
    SGD, and its keyword arguments), the schedule's and the clipping's."""

    variant: str
    case: str
    optimizer: Mapping[str, Any]
    lr: float
    warmup_steps: int = 3
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.case}-{self.variant}"


# cases whose every gradient is informative (no entry that is zero in exact arithmetic, which Adam would turn
# into a rounding-noise step: the key part of c_attn.bias), clipping that binds on some steps and not others
SPECS: tuple[TrajectorySpec, ...] = (
    TrajectorySpec("adamw", "lora-odd", {"name": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1},
                   lr=2e-2, grad_clip=1.0, description="AdamW, warm-up and cosine, weight decay on A and B, clipped"),
    TrajectorySpec("sgd", "full-odd", {"name": "SGD", "momentum": 0.9, "weight_decay": 0.01}, lr=0.05,
                   grad_clip=1.0, description="SGD with momentum on every parameter, decay on the matrices, clipped"),
    TrajectorySpec("adamw", "dora-odd", {"name": "AdamW", "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01},
                   lr=1e-2, warmup_steps=2, min_lr_ratio=0.0, grad_clip=0.5,
                   description="AdamW on DoRA (the magnitude vector not decayed), other betas and eps"),
    TrajectorySpec("sgd", "prefix_tuning-projection", {"name": "SGD", "momentum": 0.0, "weight_decay": 0.1},
                   lr=0.1, warmup_steps=0, description="plain SGD through the prefix projection, no clipping"),
    TrajectorySpec("adamw", "ia3-padded", {"name": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1},
                   lr=2e-2, grad_clip=0.4, description="AdamW on IA3's vectors (none decayed); padded batch"),
)  # fmt: skip


@dataclass
class Trajectory:
    """A trajectory of a loaded case: its settings, the expected losses and final tensors, the tolerances."""

    name: str
    case: Case
    spec: dict[str, Any]
    losses: list[float]
    lrs: list[float]
    params: dict[str, Array]
    tolerances: dict[str, Any] = field(default_factory=dict)

    def port_input(self) -> dict[str, Any]:
        """What `run_trajectory` gets: the case's input, and the optimizer, schedule and clipping."""
        return {**self.case.port_input(), "name": self.name, "case": self.case.name, **_settings(self.spec)}


def _settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("optimizer", "lr", "steps", "warmup_steps", "min_lr_ratio", "grad_clip")
    return {k: dict(spec[k]) if isinstance(spec[k], Mapping) else spec[k] for k in keys}


def spec_settings(spec: TrajectorySpec) -> dict[str, Any]:
    return {
        "optimizer": dict(spec.optimizer),
        "lr": spec.lr,
        "steps": STEPS,
        "warmup_steps": spec.warmup_steps,
        "min_lr_ratio": spec.min_lr_ratio,
        "grad_clip": spec.grad_clip,
    }


def make_optimizer(settings: Mapping[str, Any]) -> Optimizer:
    opt = dict(settings["optimizer"])
    kind = opt.pop("name")
    if kind == "AdamW":
        return AdamW(settings["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"])
    if kind == "SGD":
        return SGD(settings["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    raise ConfigError(f"trajectory optimizer {kind!r}; the vectors use AdamW and SGD")


def train(
    case: Mapping[str, Any], settings: Mapping[str, Any], device: str | None = None
) -> tuple[list[float], list[float], dict[str, Array]]:
    """tinypeft's training loop on the case's batch, in the case's dtype: the loss before each step, each
    step's learning rate, and the trainable tensors after the last step (host arrays)."""
    view, _ = build(case, device)
    params = {n: view.params[n] for n in case["trainable"]}
    optimizer = make_optimizer(settings)
    ids, labels, mask = case["input_ids"], case["labels"], case["attention_mask"]
    losses, lrs = [], []
    # the reference forward and backward (gradcheck's hand path), as the cases' expected values are computed
    _, loss_and_grad = model_loss_fn(view, ids, labels, mask)
    for step in range(settings["steps"]):
        loss, grads = loss_and_grad()  # at the parameters as the optimizer left them: it updates in place
        grads, _ = clip_grad_norm(grads, settings["grad_clip"])
        steps, warmup, floor = settings["steps"], settings["warmup_steps"], settings["min_lr_ratio"]
        lr = cosine_schedule(step, steps, settings["lr"], warmup, floor)
        optimizer.step(params, grads, lr)
        losses.append(float(loss))
        lrs.append(lr)
    return losses, lrs, {n: to_numpy(p).copy() for n, p in params.items()}


def run_trajectory(trajectory: Mapping[str, Any]) -> dict[str, Any]:
    """tinypeft itself behind the interface a port implements, in the case's dtype."""
    losses, _, params = train(trajectory, trajectory)
    return {"losses": losses, "params": params}


# ------------------------------------------------------------------ writing and reading
def compute_trajectory(spec: TrajectorySpec, case: Case) -> Trajectory:
    """The expected values: the steps in float64, from exactly the case's (dtype-rounded) weights."""
    settings = spec_settings(spec)
    exact = {**case.port_input(), "dtype": "float64"}
    exact["weights"] = {k: v.astype(np.float64) for k, v in exact["weights"].items()}
    losses, lrs, params = train(exact, settings, device="cpu")  # the expected values: NumPy float64
    name = f"{spec.name}-{case.dtype}"
    tolerance = TOLERANCES[case.dtype]
    return Trajectory(
        name=name,
        case=case,
        spec={**settings, "description": spec.description},
        losses=losses,
        lrs=lrs,
        params=params,
        tolerances={"losses": tolerance["losses"], "params": dict.fromkeys(params, tolerance["params"])},
    )


def write_trajectory(folder: str | os.PathLike, t: Trajectory) -> None:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, FINAL_NAME), t.params)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "trajectory",
        "name": t.name,
        "case": t.case.name,
        **t.spec,
        "expected": {"losses": t.losses, "lrs": t.lrs, "params": sorted(t.params)},
        "tolerance": t.tolerances,
    }
    save_json(os.path.join(folder, TRAJECTORY_NAME), doc)


def export_trajectories(folder: str | os.PathLike, cases: Sequence[Case]) -> list[str]:
    """Every trajectory whose case is among `cases`, written next to them; returns their folder names."""
    by_name = {c.name: c for c in cases}
    names = []
    for spec in SPECS:
        for dtype in ("float64", "float32"):
            case = by_name.get(f"{spec.case}-{dtype}")
            if case is not None:
                t = compute_trajectory(spec, case)
                write_trajectory(os.path.join(os.fspath(folder), t.name), t)
                names.append(t.name)
    return names


def load_trajectories(
    folder: str | os.PathLike, cases: Sequence[Case], patterns: Sequence[str] = ("*",)
) -> list[Trajectory]:
    """The trajectories index.json lists (none if it lists none) whose name matches a glob and whose case is
    among `cases`, validated against their case."""
    return load_listed(folder, "trajectories", cases, patterns, load_trajectory)


def load_trajectory(folder: str, cases: Mapping[str, Case]) -> Trajectory | None:
    path = os.path.join(folder, TRAJECTORY_NAME)
    doc = read_document(path, "trajectory")
    case = cases.get(doc.get("case"))
    if case is None:
        return None  # its case was not selected
    expected = doc.get("expected")
    steps = doc.get("steps")
    if not isinstance(expected, dict) or not isinstance(steps, int) or not 0 < steps <= 1000:
        raise CheckpointError(f"{path}: 'expected' and 'steps' must be an object and a count of steps")
    losses = expected.get("losses")
    if not isinstance(losses, list) or len(losses) != steps or not all(_finite(x) for x in losses):
        raise CheckpointError(f"{path}: expected 'losses' must be {steps} finite numbers")
    params = load_safetensors(os.path.join(folder, FINAL_NAME))
    if sorted(params) != sorted(case.trainable) or expected.get("params") != sorted(case.trainable):
        raise CheckpointError(f"{folder}: the final tensors must be exactly the case's trainable tensors")
    for name, value in params.items():
        if value.dtype != np.float64 or value.shape != case.weights[name].shape or not np.isfinite(value).all():
            raise CheckpointError(f"{folder}: final tensor {name!r} must be float64, finite, of its weight's shape")
    spec = {k: doc.get(k) for k in ("optimizer", "lr", "steps", "warmup_steps", "min_lr_ratio", "grad_clip")}
    try:
        make_optimizer(spec)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: an optimizer tinypeft cannot run: {e}") from None
    tolerance = doc.get("tolerance")
    params_tolerance = tolerance.get("params") if isinstance(tolerance, dict) else None
    if not _finite(tolerance.get("losses") if isinstance(tolerance, dict) else None) or not (
        isinstance(params_tolerance, dict)
        and set(params_tolerance) == set(params)
        and all(_finite(v) and v > 0 for v in params_tolerance.values())
    ):
        raise CheckpointError(f"{path}: 'tolerance' must hold losses and params")
    return Trajectory(doc["name"], case, spec, [float(x) for x in losses], expected.get("lrs", []), params, tolerance)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------ checking
def compare_trajectory(t: Trajectory, result: Any) -> CaseReport:
    report = CaseReport(t.name, t.case.method, t.case.dtype)
    if not isinstance(result, Mapping) or not {"losses", "params"} <= set(result):
        report.failure = f"run_trajectory must return a dict with losses and params; got {_short(result)}"
        return report
    losses = result["losses"]
    if isinstance(losses, (list, tuple)) and losses and all(type(x) is float for x in losses):
        losses = np.asarray(losses, dtype=t.case.dtype)  # Python floats: the port's own float(loss), any dtype
    report.checks.append(check_array("losses", losses, np.asarray(t.losses), t.tolerances["losses"], t.case.dtype))
    params = result["params"]
    if not isinstance(params, Mapping):
        report.failure = f"params must be a dict of tensor name -> array; got {type(params).__name__}"
        return report
    for name, want in t.params.items():
        tolerance = t.tolerances["params"][name]
        if name in params:
            report.checks.append(check_array(name, params[name], want, tolerance, t.case.dtype))
        else:
            report.checks.append(TensorCheck(name, math.inf, tolerance, False, "final tensor missing"))
    for name in sorted(set(params) - set(t.params), key=repr):
        report.checks.append(TensorCheck(str(name), math.inf, 0.0, False, "a tensor that does not train"))
    return report


def check_trajectories(trajectories: Sequence[Trajectory], run: RunTrajectory) -> list[CaseReport]:
    """Run an implementation on every trajectory and compare; what it raises fails that trajectory only."""
    reports = []
    for t in trajectories:
        try:
            with np.errstate(all="ignore"):
                report = compare_trajectory(t, run(t.port_input()))
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            report = CaseReport(t.name, t.case.method, t.case.dtype, failure=f"run_trajectory {_raised(e)}")
        reports.append(report)
    return reports
