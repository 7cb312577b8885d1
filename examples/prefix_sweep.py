"""Prefix tuning's defaults, measured: initialisation x projection x learning rate on the shipped base.

    python examples/prefix_sweep.py            # writes runs/experiments/prefix_sweep.{json,png}
    python examples/prefix_sweep.py --out docs/experiments   # rewrites the committed results
    python examples/prefix_sweep.py --quick    # a few seconds: 3 steps per run, into runs/quick

Each run trains what `tinypeft finetune --method prefix --prefix_init INIT [--prefix_projection]
--lr LR` trains (20 virtual tokens) for `finetune`'s 200 steps and 20 warm-up steps, on the same
batches of the code corpus. Two initialisations: N(0, 1) keys and values (RANDOM, PEFT's), and the
base model's own keys and values of a line of real words (TEXT, Li & Liang's initialisation from real
words' activations), each with the table as the parameter and through PEFT's tanh MLP
(prefix_projection, hidden size n_embd). Then, at seed 1 (another initialisation and other batches),
the best setting and the defaults it replaces again; the best TEXT setting with a line that describes
the task instead; and prompt tuning with PEFT's RANDOM init at three learning rates (its command-line
rate was chosen for the vocabulary-row init).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from tinypeft.cli import method_defaults
from tinypeft.lab import Lab, experiment_main, finite

NAME = "prefix_sweep"
STEPS, WARMUP = 200, 20  # tinypeft finetune's defaults
GROUPS = {  # label: (flags, learning rates)
    "RANDOM, table": (("--prefix_init", "RANDOM"), (3e-3, 1e-2, 3e-2)),
    "RANDOM, projection": (("--prefix_init", "RANDOM", "--prefix_projection"), (1e-3, 3e-3, 1e-2, 3e-2)),
    "TEXT, table": (("--prefix_init", "TEXT"), (3e-3, 1e-2, 3e-2, 1e-1)),
    "TEXT, projection": (("--prefix_init", "TEXT", "--prefix_projection"), (1e-3, 3e-3, 1e-2, 3e-2)),
}
COLORS = {"RANDOM, table": "tab:orange", "RANDOM, projection": "tab:red", "TEXT, table": "tab:blue",
          "TEXT, projection": "tab:cyan"}  # fmt: skip
OLD_DEFAULT = ("RANDOM, table", 1e-2)  # what `finetune --method prefix` trained before this sweep
TASK_TEXT = "Python source code:\n"  # 20 bytes that describe the task, against the default's unrelated words
PROMPT_RATES = (1e-2, 3e-2, 1e-1)


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main(NAME, __doc__, argv, measure, plot, steps=STEPS, warmup_steps=WARMUP, eval_every=0)


def prefix_run(lab: Lab, group: str, lr: float, seed: int | None = None, *more: str, **fields) -> dict:
    config, _ = method_defaults("prefix", *GROUPS[group][0], *more)
    return lab.run(f"prefix {group}", config, lr, seed=seed, method="prefix", group=group, **fields)


def measure(lab: Lab) -> dict:
    runs = [prefix_run(lab, group, lr) for group, (_, rates) in GROUPS.items() for lr in rates]
    best = {group: best_run([run for run in runs if run["group"] == group]) for group in GROUPS}
    best_lr = {group: None if run is None else run["lr"] for group, run in best.items()}
    overall = best_run(list(best.values()))
    print(f"best rate per setting: {best_lr}; best of all: {None if overall is None else overall['group']}")
    again = {(OLD_DEFAULT[0], OLD_DEFAULT[1])}
    if overall is not None:
        again.add((overall["group"], overall["lr"]))
    seed = lab.settings.seed + 1
    runs += [prefix_run(lab, group, lr, seed) for group, lr in sorted(again)]
    text = best["TEXT, table"]
    if text is not None:
        runs.append(prefix_run(lab, "TEXT, table", text["lr"], None, "--prefix_init_text", TASK_TEXT, text=TASK_TEXT))
    for lr in PROMPT_RATES:
        config, _ = method_defaults("prompt", "--prompt_tuning_init", "RANDOM")
        runs.append(lab.run("prompt RANDOM", config, lr, method="prompt", group="prompt RANDOM"))
    return {"runs": runs, "best_lr_per_setting": best_lr}


def best_run(runs: list) -> dict | None:
    """The run with the lowest task loss (None if none finished)."""
    done = [run for run in runs if run is not None and run["task_after"] is not None]
    done = [run for run in done if math.isfinite(run["task_after"])]
    return min(done, key=lambda run: run["task_after"]) if done else None


def plot(results: dict, path: str) -> str:
    from tinypeft.plots import add_bits_axis, pyplot, save_figure

    plt = pyplot()
    base = results["base_losses"]
    settings = results["settings"]
    first = [run for run in results["runs"] if run["seed"] == settings["seed"] and run["group"] in GROUPS]
    grid = [run for run in first if "text" not in run and run["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    for ax, key, title in (
        (axes[0], "task", "task (code) validation loss after training: lower is better"),
        (axes[1], "prose", "original (prose) validation loss after: above the line is forgetting"),
    ):
        for group, color in COLORS.items():
            line = [run for run in grid if run["group"] == group]
            ax.plot([r["lr"] for r in line], [r[f"{key}_after"] for r in line], "o-", color=color, lw=2, label=group)
        again = [run for run in results["runs"] if run["seed"] != settings["seed"] and run["status"] == "ok"]
        for run in again:
            ax.plot(run["lr"], run[f"{key}_after"], "x", color=COLORS[run["group"]], ms=9, mew=2)
        old = [r for r in grid if (r["group"], r["lr"]) == OLD_DEFAULT]
        if old:
            ax.plot(old[0]["lr"], old[0][f"{key}_after"], "o", mfc="none", mec="black", ms=14, mew=1.5,
                    label="the default before this sweep (seed 1: x)")  # fmt: skip
        ax.axhline(base[key], color="0.4", ls="--", lw=1.2, label="base model (before fine-tuning)")
        values = finite([r[f"{key}_after"] for r in grid + again] + [base[key]])
        if values:
            ax.set_ylim(min(values) - 0.05, max(values) + 0.1)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("loss (nats per byte)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        add_bits_axis(ax)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Prefix tuning (20 virtual tokens): initialisation x projection x learning rate, {settings['steps']} steps "
        f"of {settings['batch_size']} x {settings['seq_len']} bytes of code (x: seed {settings['seed'] + 1})"
    )
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
