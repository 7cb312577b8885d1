"""Learning-rate sweep: LoRA against full fine-tuning over rates from 1e-4 to 1e-1 on the shipped base.

    python examples/lr_sweep.py            # writes runs/experiments/lr_sweep.{json,png}
    python examples/lr_sweep.py --out docs/experiments   # rewrites the committed results
    python examples/lr_sweep.py --quick    # a few seconds: 3 steps per rate, into runs/quick

LoRA (r = 8 on c_attn, lora_alpha 16: `tinypeft finetune`'s default) and full fine-tuning train for the
same steps on the same batches of the code corpus at each peak learning rate (warm-up, then cosine
decay to a tenth; AdamW; gradients clipped to norm 1). A run whose loss turns non-finite stops and is
marked diverged. The claim under test: LoRA tolerates (and wants) higher rates than full fine-tuning.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from tinypeft.cli import method_defaults
from tinypeft.lab import Lab, experiment_main, finite

NAME = "lr_sweep"
RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
METHODS = {"full fine-tuning": "full", "LoRA r=8 (c_attn)": "lora"}
COLORS = {"full": "black", "lora": "tab:blue"}
GOOD_NATS = 0.05  # a rate is "good" if its task loss is within this much of the method's best


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main(NAME, __doc__, argv, measure, plot, steps=100, eval_every=0)


def measure(lab: Lab) -> dict:
    runs = []
    for label, method in METHODS.items():
        config, default_lr = method_defaults(method)
        for lr in RATES:
            runs.append(lab.run(label, config, lr, method=method, default_lr=default_lr))
    summary = {method: summarize([run for run in runs if run["method"] == method]) for method in METHODS.values()}
    for method, numbers in summary.items():
        print(f"{method}: {numbers}")
    return {"runs": runs, "good_nats": GOOD_NATS, "summary": summary}


def summarize(runs: list[dict]) -> dict:
    """The best rate, and the rates within GOOD_NATS of it (the window a user can miss by and not mind)."""
    done = [run for run in runs if run["task_after"] is not None and math.isfinite(run["task_after"])]
    if not done:
        return {"best_lr": None}
    best = min(done, key=lambda run: run["task_after"])
    good = [run["lr"] for run in done if run["task_after"] <= best["task_after"] + GOOD_NATS]
    return {
        "best_lr": best["lr"],
        "best_task_loss": best["task_after"],
        "prose_loss_at_best": best["prose_after"],
        "good_rates": good,
        "good_window_decades": math.log10(max(good) / min(good)),
        "diverged_rates": [run["lr"] for run in runs if run["status"] != "ok"],
    }


def plot(results: dict, path: str) -> str:
    from tinypeft.plots import add_bits_axis, pyplot, save_figure

    plt = pyplot()
    base = results["base_losses"]
    settings = results["settings"]
    fig, (task_ax, prose_ax) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    for ax, key, title in (
        (task_ax, "task", "task (code) validation loss after training: lower is better"),
        (prose_ax, "prose", "original (prose) validation loss after: above the line is forgetting"),
    ):
        finished = finite([run[f"{key}_after"] for run in results["runs"]] + [base[key]])
        top = max(finished) + 0.1 * (max(finished) - min(finished) + 0.1)
        for label, method in METHODS.items():
            runs = [run for run in results["runs"] if run["method"] == method]
            ok = [run for run in runs if run["status"] == "ok"]
            color = COLORS[method]
            ax.plot([r["lr"] for r in ok], [r[f"{key}_after"] for r in ok], "o-", color=color, lw=2, label=label)
            diverged = [run["lr"] for run in runs if run["status"] != "ok"]
            if diverged:
                ax.plot(diverged, [top] * len(diverged), "x", color=color, ms=10, mew=2, label=f"{label}: diverged")
            if runs:
                ax.axvline(runs[0]["default_lr"], color=color, ls=":", lw=1.2, label=f"{label}: default rate")
        ax.axhline(base[key], color="0.4", ls="--", lw=1.2, label="base model (before fine-tuning)")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("loss (nats per byte)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        add_bits_axis(ax)
    task_ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"Learning-rate sweep: LoRA against full fine-tuning, {settings['steps']} steps of "
        f"{settings['batch_size']} x {settings['seq_len']} bytes of code (AdamW, warm-up + cosine)"
    )
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
