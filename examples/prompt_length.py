"""Soft-prompt length sweep: prompt tuning with NV = 1, 5, 20, 50, 100 virtual tokens on the shipped base.

    python examples/prompt_length.py            # writes runs/experiments/prompt_length.{json,png}
    python examples/prompt_length.py --out docs/experiments   # rewrites the committed results
    python examples/prompt_length.py --quick    # a few seconds: 3 steps per length, into runs/quick

Each length trains what `tinypeft finetune --method prompt --num_virtual_tokens NV
--prompt_tuning_init INIT` trains (at prompt tuning's default learning rate) for the same steps on the
same batches of the code corpus, for both initialisations: rows of the vocabulary table drawn at random
(SAMPLE_VOCAB, the command's default) and N(0, 1) (RANDOM, PEFT's default). Longer prompts have more
parameters but also lengthen every sequence by NV positions, so each step costs more; both are measured.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tinypeft.cli import method_defaults
from tinypeft.lab import Lab, experiment_main, plateau

NAME = "prompt_length"
LENGTHS = (1, 5, 20, 50, 100)
INITS = {"SAMPLE_VOCAB": ("tab:blue", "vocabulary rows"), "RANDOM": ("tab:orange", "N(0, 1)")}
PLATEAU_NATS = 0.01


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main(NAME, __doc__, argv, measure, plot, eval_every=0)


def measure(lab: Lab) -> dict:
    runs = []
    for init in INITS:
        for nv in LENGTHS:
            config, lr = method_defaults("prompt", "--num_virtual_tokens", str(nv), "--prompt_tuning_init", init)
            runs.append(lab.run(f"prompt tuning {init} NV={nv}", config, lr, num_virtual_tokens=nv, init=init))
    near_best = {
        init: plateau(LENGTHS, [run["task_after"] for run in runs if run["init"] == init], PLATEAU_NATS)
        for init in INITS
    }
    print(f"shortest prompt within {PLATEAU_NATS} nats of the best, per initialisation: {near_best}")
    return {"runs": runs, "plateau_nats": PLATEAU_NATS, "shortest_prompt_near_best": near_best}


def plot(results: dict, path: str) -> str:
    from tinypeft.plots import add_bits_axis, pyplot, save_figure

    plt = pyplot()
    ok = [run for run in results["runs"] if run["status"] == "ok"]
    base = results["base_losses"]
    settings = results["settings"]
    fig, (task_ax, prose_ax, cost_ax) = plt.subplots(1, 3, figsize=(17, 4.8), dpi=110)
    for ax, key, what in ((task_ax, "task", "code (task)"), (prose_ax, "prose", "prose (original)")):
        for init, (color, words) in INITS.items():
            line = [run for run in ok if run["init"] == init]
            xs = [run["num_virtual_tokens"] for run in line]
            ax.plot(xs, [run[f"{key}_after"] for run in line], "o-", color=color, lw=2, label=f"init: {words}")
        ax.axhline(base[key], color="0.4", ls="--", lw=1.2, label="base model (no prompt)")
        ax.set_xscale("log")
        ax.set_xticks(LENGTHS, [str(n) for n in LENGTHS])
        ax.set_xlabel("soft-prompt length NV (virtual tokens)")
        ax.set_ylabel("validation loss (nats per byte)")
        ax.set_title(f"{what} validation loss after {settings['steps']} steps", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        add_bits_axis(ax)
    runs = [run for run in ok if run["init"] == next(iter(INITS))] or ok
    lengths = [run["num_virtual_tokens"] for run in runs]

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
        f"batches, lr {lr:g})"
    )
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
