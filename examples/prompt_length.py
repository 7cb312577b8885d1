"""Soft-prompt length sweep: prompt tuning with NV = 1, 5, 20, 50, 100 virtual tokens on the shipped base.

    python examples/prompt_length.py            # writes docs/experiments/prompt_length.{json,png}
    python examples/prompt_length.py --quick    # a few seconds: 3 steps per length, into runs/quick

Each length trains what `tinypeft finetune --method prompt --num_virtual_tokens NV` trains (a soft
prompt initialised from N(0, 1), at prompt tuning's default learning rate) for the same steps on the
same batches of the code corpus. Longer prompts have more parameters but also lengthen every sequence
by NV positions, so each step costs more; both are measured.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tinypeft.cli import method_defaults
from tinypeft.experiment import Lab, experiment_main, plateau

NAME = "prompt_length"
LENGTHS = (1, 5, 20, 50, 100)
PLATEAU_NATS = 0.01


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main(NAME, __doc__, argv, measure, plot, eval_every=0)


def measure(lab: Lab) -> dict:
    runs = []
    for nv in LENGTHS:
        config, lr = method_defaults("prompt", "--num_virtual_tokens", str(nv))
        runs.append(lab.run(f"prompt tuning NV={nv}", config, lr, num_virtual_tokens=nv))
    near_best = plateau(LENGTHS, [run["task_after"] for run in runs], PLATEAU_NATS)
    print(f"shortest prompt within {PLATEAU_NATS} nats of the best: {near_best}")
    return {"runs": runs, "plateau_nats": PLATEAU_NATS, "shortest_prompt_near_best": near_best}


def plot(results: dict, path: str) -> str:
    from tinypeft.plots import add_bits_axis, pyplot, save_figure

    plt = pyplot()
    runs = [run for run in results["runs"] if run["status"] == "ok"]
    lengths = [run["num_virtual_tokens"] for run in runs]
    base = results["base_losses"]
    settings = results["settings"]
    fig, (loss_ax, cost_ax) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    for key, color, what in (("task", "tab:blue", "code (task)"), ("prose", "tab:red", "prose (original)")):
        loss_ax.plot(lengths, [run[f"{key}_after"] for run in runs], "o-", color=color, lw=2, label=f"{what}, after")
        loss_ax.axhline(base[key], color=color, ls="--", lw=1.2, alpha=0.7, label=f"{what}, base model")
    loss_ax.set_xscale("log")
    loss_ax.set_xticks(lengths, [str(n) for n in lengths])
    loss_ax.set_xlabel("soft-prompt length NV (virtual tokens)")
    loss_ax.set_ylabel("validation loss (nats per byte)")
    loss_ax.set_title(f"validation loss after {settings['steps']} steps (lower is better)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8, loc="best")
    add_bits_axis(loss_ax)

    step_ms = [1e3 * run["median_step_seconds"] for run in runs]
    cost_ax.plot(lengths, step_ms, "s-", color="tab:purple", lw=2, label="median training step (ms)")
    cost_ax.set_xscale("log")
    cost_ax.set_xticks(lengths, [str(n) for n in lengths])
    cost_ax.set_xlabel("soft-prompt length NV (virtual tokens)")
    cost_ax.set_ylabel("median training step (ms)", color="tab:purple")
    cost_ax.set_ylim(0, max(step_ms) * 1.2 if step_ms else 1)
    cost_ax.grid(alpha=0.3)
    params_ax = cost_ax.twinx()
    params = [run["trainable_parameters"] for run in runs]
    params_ax.plot(lengths, params, "^--", color="tab:green", lw=1.5, label="trainable parameters")
    params_ax.set_yscale("log")
    params_ax.set_ylabel("trainable parameters (NV x n_embd)", color="tab:green")
    cost_ax.set_title(
        f"cost: each step processes {settings['seq_len']} + NV positions; parameters grow with NV", fontsize=10
    )
    handles = cost_ax.get_legend_handles_labels()
    more = params_ax.get_legend_handles_labels()
    cost_ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    lr = runs[0]["lr"] if runs else float("nan")
    fig.suptitle(
        f"Prompt tuning on code: soft-prompt length sweep ({settings['batch_size']} x {settings['seq_len']}-byte "
        f"batches, lr {lr:g}, N(0, 1) initialisation)"
    )
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
