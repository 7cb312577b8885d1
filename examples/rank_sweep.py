"""Rank sweep: LoRA with r = 1, 2, 4, 8, 16, 32, 64 on the shipped base, fine-tuned on the code corpus.

    python examples/rank_sweep.py            # writes runs/experiments/rank_sweep.{json,png}
    python examples/rank_sweep.py --out docs/experiments   # rewrites the committed results
    python examples/rank_sweep.py --quick    # a few seconds: 3 steps per rank, into runs/quick

Each rank trains what `tinypeft finetune --rank R` trains (LoRA on c_attn, lora_alpha = 2r, so the
scale alpha/r stays 2, at LoRA's default learning rate) for the same steps on the same batches. The
question (the LoRA paper's): does the task loss stop improving long before the trainable parameters
stop growing?
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tinypeft.cli import method_defaults
from tinypeft.lab import Lab, experiment_main, plateau

NAME = "rank_sweep"
RANKS = (1, 2, 4, 8, 16, 32, 64)
PLATEAU_NATS = 0.01  # "as good as the best rank": within this much task loss of it


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main(NAME, __doc__, argv, measure, plot, eval_every=0)


def measure(lab: Lab) -> dict:
    runs = []
    for rank in RANKS:
        config, lr = method_defaults("lora", "--rank", str(rank))
        runs.append(lab.run(f"LoRA r={rank}", config, lr, rank=rank))
    near_best = plateau(RANKS, [run["task_after"] for run in runs], PLATEAU_NATS)
    print(f"smallest rank within {PLATEAU_NATS} nats of the best: {near_best}")
    return {"runs": runs, "plateau_nats": PLATEAU_NATS, "smallest_rank_near_best": near_best}


def plot(results: dict, path: str) -> str:
    from tinypeft.plots import add_bits_axis, pyplot, save_figure

    plt = pyplot()
    runs = [run for run in results["runs"] if run["status"] == "ok"]
    ranks = [run["rank"] for run in runs]
    base = results["base_losses"]
    steps = results["settings"]["steps"]
    fig, (task_ax, prose_ax, params_ax) = plt.subplots(1, 3, figsize=(15, 4.6), dpi=110)
    for ax, key, color, what in (
        (task_ax, "task", "tab:blue", "task (code) validation loss"),
        (prose_ax, "prose", "tab:red", "original (prose) validation loss"),
    ):
        ax.plot(ranks, [run[f"{key}_after"] for run in runs], "o-", color=color, lw=2, label=f"after {steps} steps")
        ax.axhline(base[key], color="0.4", ls="--", lw=1.2, label="base model (before fine-tuning)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("loss (nats per byte)")
        ax.set_title(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        add_bits_axis(ax)
    task_ax.set_title("task (code) validation loss: lower is better")
    prose_ax.set_title("original (prose) validation loss: above the line is forgetting")

    counts = [run["trainable_parameters"] for run in runs]
    params_ax.plot(ranks, counts, "s-", color="tab:green", lw=2, label="LoRA (c_attn, 4 layers)")
    full = results["base_parameters"]
    params_ax.axhline(full, color="0.4", ls="--", lw=1.2, label=f"full fine-tuning ({full:,d})")
    for r, n in zip(ranks, counts, strict=True):
        params_ax.annotate(f"{n:,d}", (r, n), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    params_ax.set_xscale("log", base=2)
    params_ax.set_yscale("log")
    params_ax.set_xticks(ranks, [str(r) for r in ranks])
    params_ax.set_xlabel("LoRA rank r")
    params_ax.set_ylabel("trainable parameters")
    params_ax.set_title("trainable parameters grow linearly with r")
    params_ax.grid(alpha=0.3, which="both")
    params_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"LoRA rank sweep: {steps} steps of {results['settings']['batch_size']} x {results['settings']['seq_len']} "
        f"bytes on the code corpus, lr {runs[0]['lr']:g}, alpha = 2r"
        if runs
        else "LoRA rank sweep"
    )
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
