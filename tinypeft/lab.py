"""Experiments: a grid of fine-tuning runs measured one way, for the scripts in examples/.

`Lab` loads a base and the two corpora once and runs `finetune` (experiment.py) over a grid of methods,
ranks or learning rates, each from a freshly loaded base, returning one JSON-ready row per run (a run
whose loss turns non-finite is a row too, marked diverged). `experiment_parser` gives the example
scripts their shared flags, `--quick` among them; `peak_training_memory` and `interleaved_step_times`
measure what the experiments report beside the losses.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .backend import to_numpy
from .data import load_corpus, random_batch
from .errors import TrainingError
from .experiment import BLAS_THREAD_VARIABLES, SHIPPED_BASE, base_dir, build_model, finetune, validation_losses
from .io import load_json, save_json
from .methods import PeftConfig
from .model import GPT
from .train import Trainable, TrainConfig


def peak_training_memory(make_model: Callable[[], Trainable], train_data: np.ndarray, config: TrainConfig) -> int:
    """Peak bytes Python allocates (tracemalloc) to build a model with `make_model` and run two
    optimizer steps on it: weights, adapter, gradients, optimizer state and activations, as
    benchmarks/run.py measures it. Two steps, because the optimizer's state exists from the first."""
    rng = np.random.default_rng(config.seed)
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start, _ = tracemalloc.get_traced_memory()
    try:
        model = make_model()
        model.train()
        params = model.trainable_parameters()
        optimizer = config.make_optimizer()
        for step in range(2):
            batch = random_batch(train_data, config.batch_size, config.seq_len, rng)
            _, grads = model.loss_and_grad(batch, batch)
            optimizer.step(params, grads, config.lr_at(step))
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return int(peak)


def interleaved_step_times(
    makers: Mapping[str, Callable[[], Trainable]],
    train_data: np.ndarray,
    config: TrainConfig,
    rounds: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """Median seconds of one optimizer step (forward, backward, AdamW) of each model `makers` builds,
    timed round-robin, one step of each in turn, so that another job's load, which comes and goes,
    slows every model alike (as benchmarks/run.py times its contenders). The first `warmup` rounds
    are not timed."""
    rng = np.random.default_rng(config.seed)
    models = {name: make() for name, make in makers.items()}
    states = {}
    for name, model in models.items():
        model.train()
        states[name] = (model.trainable_parameters(), config.make_optimizer())
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + rounds):
        batch = random_batch(train_data, config.batch_size, config.seq_len, rng)
        for name, model in models.items():
            params, optimizer = states[name]
            t0 = time.perf_counter()
            _, grads = model.loss_and_grad(batch, batch)
            optimizer.step(params, grads, config.lr)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


# ---------------------------------------------------------------- experiments
@dataclass(frozen=True)
class Settings:
    """What every run of an experiment shares (only the method, its config and the rate vary)."""

    steps: int = 150
    batch_size: int = 16
    seq_len: int = 128
    warmup_steps: int = 15
    eval_every: int = 50
    eval_windows: int = 64
    sample_bytes: int = 60
    seed: int = 0

    def train_config(self, lr: float) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=lr,
            warmup_steps=self.warmup_steps,
            eval_every=self.eval_every,
            eval_windows=self.eval_windows,
            seed=self.seed,
        )


# CI-sized: seconds for a whole experiment, enough to run every line of it
QUICK = Settings(steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_every=2, eval_windows=2, sample_bytes=4)


class Lab:
    """A base model folder and the task and prose corpora, loaded once, and runs of `finetune` on them."""

    def __init__(
        self,
        base: str | None = None,
        settings: Settings | None = None,
        task: str = "code",
        prose: str = "prose",
        progress: bool = True,
    ) -> None:
        self.base_dir = base_dir(base)
        self.settings = settings or Settings()
        self.task, self.prose = load_corpus(task), load_corpus(prose)
        self.progress = progress
        base = self.fresh_base()
        self.base_config = base.config
        self.base_parameters = base.num_parameters()
        # every run starts from this base and is evaluated on these windows: measure it once
        self.base_losses = validation_losses(
            base, {"task": self.task.val, "prose": self.prose.val}, self.settings.train_config(lr=0.0)
        )

    def fresh_base(self) -> GPT:
        """A newly loaded base (full fine-tuning changes the one it trains)."""
        return GPT.from_pretrained(self.base_dir)

    def run(
        self,
        label: str,
        method_config: PeftConfig | None,
        lr: float,
        measure_memory: bool = False,
        seed: int | None = None,
        inspect: Callable[[Trainable], dict[str, Any]] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """One run; its row: label, lr, seed (of the adapter's init and the batches; default: the
        settings'), the fields given (the swept value, say), trainable parameters, before/after losses in
        nats, gain and forgetting, median step seconds, peak memory if measured, evaluations, samples, and
        status "ok" or "diverged ..." (then the after-values are None). `inspect`, if given, is called
        with the trained model of a run that finished and what it returns joins the row (the weights
        themselves are not kept: a grid of full fine-tunes would hold a model per run)."""
        config = self.settings.train_config(lr)
        if seed is not None:
            config = replace(config, seed=seed)
        row: dict[str, Any] = {"label": label, "lr": lr, "seed": config.seed, **fields}
        if measure_memory:
            row["peak_memory_bytes"] = peak_training_memory(
                lambda: build_model(self.fresh_base(), method_config, config.seed), self.task.train, config
            )
        t0 = time.perf_counter()
        try:
            run = finetune(
                self.fresh_base(),
                method_config,
                self.task,
                self.prose,
                config,
                method=label,
                progress=self.progress,
                quiet=True,
                sample_bytes=self.settings.sample_bytes,
                base_losses=self.base_losses,
            )
        except TrainingError as e:
            row |= {"status": f"diverged: {e}".split(". Last good")[0], "seconds": round(time.perf_counter() - t0, 2)}
            row |= {"task_after": None, "prose_after": None, "task_gain": None, "prose_forgetting": None}
            print(f"{label:>28s}  lr {lr:<8g} diverged ({row['seconds']:.0f} s)", flush=True)
            return row
        s = run.summary
        row |= {
            "status": "ok",
            "method_config": s["method_config"],
            "trainable_parameters": s["trainable_parameters"],
            "task_before": s["before"]["task"]["loss"],
            "prose_before": s["before"]["prose"]["loss"],
            "task_after": s["after"]["task"]["loss"],
            "prose_after": s["after"]["prose"]["loss"],
            "task_gain": s["task_gain"],
            "prose_forgetting": s["prose_forgetting"],
            "median_step_seconds": s["median_step_seconds"],
            "seconds": s["seconds"],
            "evals": s["evals"],
            # every 5th step's training loss: enough to draw the curve, small enough to commit
            "train_losses": [
                {"step": r["step"], "loss": r["loss"]} for r in run.result.train_losses if r["step"] % 5 == 0
            ],
            "sample_after": s["sample_after"],
        }
        if inspect is not None:
            row |= inspect(run.model)
        print(
            f"{label:>28s}  lr {lr:<8g} task {row['task_before']:.3f} -> {row['task_after']:.3f}  "
            f"prose {row['prose_before']:.3f} -> {row['prose_after']:.3f}  "
            f"{row['trainable_parameters']:>9,d} trainable  {1e3 * row['median_step_seconds']:.0f} ms/step  "
            f"({row['seconds']:.0f} s)",
            flush=True,
        )
        return row

    def step_times(self, configs: Mapping[str, PeftConfig | None], rounds: int = 10) -> dict[str, float]:
        """Median step seconds of each method config on a fresh base, timed round-robin (see
        interleaved_step_times), with the experiment's batch shape."""
        makers = {
            label: functools.partial(build_model, self.fresh_base(), config, self.settings.seed)
            for label, config in configs.items()
        }
        return interleaved_step_times(makers, self.task.train, self.settings.train_config(lr=1e-4), rounds)

    def header(self, name: str, command: str) -> dict[str, Any]:
        """What every experiment's JSON starts with: the command, base, corpora, settings and machine load."""
        return {
            "experiment": name,
            "command": command,
            "base": os.path.relpath(self.base_dir) if self.base_dir != SHIPPED_BASE else "tinypeft/assets/base",
            "base_config": self.base_config.to_hf_dict(),
            "base_parameters": self.base_parameters,
            "task_corpus": self.task.describe(),
            "prose_corpus": self.prose.describe(),
            "settings": asdict(self.settings),
            "base_losses": self.base_losses,
            "load_average_at_start": _load_average(),
            "blas_threads": {var: os.environ.get(var) for var in BLAS_THREAD_VARIABLES},
            "cpu_count": os.cpu_count(),
        }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def experiment_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The flags every experiment script shares: --quick, --out, --base, --steps, --replot, --no_progress."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized smoke run: 3 steps of 2 windows of 32 bytes (seconds)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"folder for {name}.json and {name}.png (default: runs/experiments, or runs/quick with --quick; "
        "the committed results were made with --out docs/experiments)",
    )
    parser.add_argument("--base", default=None, help="base model folder (default: the shipped base)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the experiment's)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON of an earlier run")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def settings_from(args: argparse.Namespace, **defaults: Any) -> Settings:
    """The experiment's settings: QUICK under --quick, else the defaults (with the script's own
    overrides), with --steps applied last."""
    settings = QUICK if args.quick else replace(Settings(), **defaults)
    return replace(settings, steps=args.steps) if args.steps is not None else settings


def output_paths(args: argparse.Namespace, name: str) -> tuple[str, str]:
    """(json path, png path) of an experiment."""
    # never docs/experiments by default: a run must not overwrite the committed results it may disagree with
    folder = args.out or os.path.join("runs", "quick" if args.quick else "experiments")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.png")


def experiment_main(
    name: str,
    doc: str,
    argv: Sequence[str] | None,
    measure: Callable[[Lab], dict[str, Any]],
    plot: Callable[[dict[str, Any], str], str],
    **settings: Any,
) -> int:
    """What an example script's main does: parse the shared flags, run `measure` on a Lab with the
    experiment's settings (keyword overrides of Settings; QUICK under --quick), save the header and
    what measure returns as NAME.json, and draw NAME.png with `plot` (from the saved JSON alone under
    --replot)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = experiment_parser(doc.split("\n\n")[0], name).parse_args(argv)
    json_path, png_path = output_paths(args, name)
    if args.replot:
        results = load_json(json_path)
    else:
        t0 = time.perf_counter()
        lab = Lab(args.base, settings_from(args, **settings), progress=not args.no_progress)
        results = lab.header(name, command_line(name, argv)) | measure(lab)
        results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
        save_json(json_path, results)
        print(f"{name}: {results['minutes']:.1f} minutes")
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


def command_line(name: str, argv: Sequence[str]) -> str:
    """How to rerun an experiment: `python examples/NAME.py ARGS`, from the repository root."""
    return " ".join(["python", f"examples/{name}.py", *argv])


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers and finite (a diverged run's None and NaN dropped)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def plateau(xs: Sequence[float], losses: Sequence[float | None], tolerance: float) -> float | None:
    """The smallest x whose loss is within `tolerance` nats of the best loss (None if none finished)."""
    done = [(x, loss) for x, loss in zip(xs, losses, strict=True) if loss is not None and math.isfinite(loss)]
    if not done:
        return None
    best = min(loss for _, loss in done)
    return min(x for x, loss in done if loss <= best + tolerance)


# ---------------------------------------------------------------- learning against forgetting
def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (task loss, prose loss) that no other point beats on both (lower is better on each),
    in order of rising task loss (so falling prose loss); non-finite points are dropped, and of equal
    points one is kept."""
    done = sorted({(t, p) for t, p in points if math.isfinite(t) and math.isfinite(p)})
    front: list[tuple[float, float]] = []
    for task, prose in done:  # by task loss, then prose loss: a point joins if it forgets less than all before
        if not front or prose < front[-1][1]:
            front.append((task, prose))
    return front


def forgetting_at_gain(gains: Sequence[float], forgettings: Sequence[float], gain: float) -> float | None:
    """The forgetting of a run when its task gain first reaches `gain`, interpolated linearly between
    the two evaluations around that point of its trajectory (gains[i], forgettings[i] are the task-loss
    fall and prose-loss rise at the i-th evaluation, in training order); None if it never gets there
    (or a value on the way is not finite)."""
    if len(gains) != len(forgettings):
        raise ValueError(f"forgetting_at_gain: {len(gains)} gains against {len(forgettings)} forgettings")
    previous: tuple[float, float] | None = None
    for g, f in zip(gains, forgettings, strict=True):
        if not (math.isfinite(g) and math.isfinite(f)):
            return None
        if g >= gain:
            if previous is None:
                return f
            g0, f0 = previous
            return f0 + (f - f0) * (gain - g0) / (g - g0)
        previous = (g, f)
    return None


def weight_updates(model: Trainable, base_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ΔW of every block matrix (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj: the 2-D weights of
    transformer.h.*) that training changed: the trained weight, with a PEFT model's adapter merged in,
    minus the base's, in float64."""
    from .peft_model import PeftModel

    trained = model.merge_and_unload().params if isinstance(model, PeftModel) else model.params
    updates = {}
    for name, before in base_params.items():
        if not name.startswith("transformer.h.") or np.ndim(before) != 2:
            continue
        delta = np.asarray(to_numpy(trained[name]), dtype=np.float64) - np.asarray(to_numpy(before), np.float64)
        if np.any(delta):
            updates[name] = delta
    return updates


def rank_for_variance(singular_values: Sequence[float], fraction: float = 0.9) -> int:
    """The fewest leading singular directions whose squared singular values hold `fraction` of the
    total (the rank of the best approximation, in Frobenius norm, that keeps that share of ΔW's
    energy); 0 for a zero matrix."""
    if not 0 < fraction <= 1:
        raise ValueError(f"rank_for_variance: fraction must be in (0, 1], got {fraction}")
    energy = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)[::-1]
    total = energy.sum()
    if total == 0:
        return 0
    # a relative tolerance so that fraction 1 is reached despite rounding in the running sum
    return int(np.searchsorted(np.cumsum(energy), fraction * total * (1 - 1e-12)) + 1)
