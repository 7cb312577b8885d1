"""Catastrophic forgetting: ways to fine-tune the shipped base on code, at matched steps.

    python examples/forgetting.py            # writes runs/experiments/forgetting.{json,png}
    python examples/forgetting.py --out docs/experiments   # rewrites the committed results
    python examples/forgetting.py --quick    # a few seconds: 3 steps per method, into runs/quick

Full fine-tuning, LoRA, prompt tuning, P-tuning, IA3, bottleneck adapters, BitFit, VeRA, LoHa, LoKr, OFT,
BOFT, AdaLoRA and trainable tokens, each as `tinypeft finetune --method M` configures it (its default config
and learning rate; trainable tokens on the bytes of code's punctuation, CODE_TOKENS), train for the same steps
on the same batches of the code corpus. Measured for each: how much the task (code) loss fell, how much the
original (prose) loss rose, both against the base model; the trainable parameters; the median time of a
training step; and the peak memory of building the model and running two steps (tracemalloc, as
benchmarks/run.py measures it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tinypeft.cli import method_defaults
from tinypeft.lab import Lab, experiment_main

NAME = "forgetting"
METHODS = {  # label: `tinypeft finetune --method` name
    "full fine-tuning": "full",
    "LoRA r=8 (c_attn)": "lora",
    "prompt tuning (20 tokens)": "prompt",
    "P-tuning (20 tokens, MLP)": "ptuning",
    "IA3": "ia3",
    "bottleneck adapters (16)": "adapter",
    "BitFit": "bitfit",
    "VeRA r=256 (c_attn)": "vera",
    "LoHa r=8 (c_attn)": "loha",
    "LoKr r=8 (c_attn)": "lokr",
    "OFT (blocks of 32, c_attn)": "oft",
    "BOFT (blocks of 4, c_attn)": "boft",
    "AdaLoRA r 12 -> 8 (c_attn)": "adalora",
    "trainable tokens (15 bytes)": "trainable_tokens",
}
# trainable tokens has no default rows: the bytes of Python's punctuation, which prose uses rarely
CODE_TOKENS = sorted(set(b"()[]{}:=_#'\"\n.,"))
FLAGS = {"trainable_tokens": ("--token_indices", *map(str, CODE_TOKENS))}
COLORS = ("black", "tab:blue", "tab:orange", "tab:olive", "tab:green", "tab:purple", "tab:brown", "tab:cyan", "tab:red")
COLORS += ("tab:pink", "tab:gray", "gold", "darkred", "teal")


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main(NAME, __doc__, argv, measure, plot, eval_every=25)


def measure(lab: Lab) -> dict:
    runs = []
    for label, method in METHODS.items():
        # the experiment's steps: AdaLoRA's budget schedule spans the run
        config, lr = method_defaults(method, "--steps", str(lab.settings.steps), *FLAGS.get(method, ()))
        runs.append(lab.run(label, config, lr, measure_memory=True, method=method))
    # step times from the runs above come from different minutes of a shared machine; these are
    # timed one step of each method in turn, so a change in load hits them all alike
    rounds = 2 if lab.settings.steps < 10 else 10
    configs = {label: method_defaults(method, *FLAGS.get(method, ()))[0] for label, method in METHODS.items()}
    times = lab.step_times(configs, rounds)
    for run in runs:
        run["interleaved_step_seconds"] = times[run["label"]]
    print("interleaved step times (ms): " + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in times.items()))
    return {"runs": runs, "interleaved_rounds": rounds}


def plot(results: dict, path: str) -> str:
    from tinypeft.plots import pyplot, save_figure

    plt = pyplot()
    base = results["base_losses"]
    settings = results["settings"]
    runs = results["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), dpi=110, gridspec_kw={"height_ratios": [1.5, 1]})
    plane, params_ax = axes[0]
    time_ax, memory_ax = axes[1]

    # the forgetting plane: every evaluation of every run, base model at the origin. The axes fit the
    # runs that learned the task; one that made the task worse is named in a note instead, or its
    # path would squeeze the others into a corner.
    plane.axhline(0, color="0.6", lw=0.8)
    plane.axvline(0, color="0.6", lw=0.8)
    shown, notes = [], []
    for run, color in zip(runs, COLORS, strict=False):
        if run["status"] != "ok":
            notes.append(f"{run['label']}: {run['status']}")
            continue
        forgetting = [e["prose"] - base["prose"] for e in run["evals"]]
        gain = [base["task"] - e["task"] for e in run["evals"]]
        if gain[-1] <= 0:
            notes.append(
                f"{run['label']}, off this scale (it made code worse):\n"
                f"code loss {-gain[-1]:+.2f}, prose loss {forgetting[-1]:+.2f} nats at step {settings['steps']};\n"
                f"at step 0: {-gain[0]:+.2f} and {forgetting[0]:+.2f}"
            )
            continue
        shown.append((forgetting, gain))
        plane.plot(forgetting, gain, "-", color=color, lw=1.5, alpha=0.6)
        plane.plot(forgetting[:-1], gain[:-1], "o", color=color, ms=3.5, alpha=0.6)
        plane.plot(forgetting[-1], gain[-1], "o", color=color, ms=10, label=run["label"])
    if shown:
        xs = [x for f, _ in shown for x in f] + [0.0]
        ys = [y for _, g in shown for y in g] + [0.0]
        pad_x, pad_y = 0.08 * (max(xs) - min(xs) + 1e-3), 0.08 * (max(ys) - min(ys) + 1e-3)
        plane.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        plane.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    if notes:
        plane.text(
            0.98,
            0.03,
            "\n".join(notes),
            transform=plane.transAxes,
            ha="right",
            va="bottom",
            fontsize=7.5,
            bbox={"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "0.7"},
        )
    plane.set_xlabel("prose loss increase vs the base model (nats per byte): forgetting →")
    plane.set_ylabel("code loss decrease vs the base model (nats per byte): learning →")
    plane.set_title(
        f"code learned against prose forgotten: a path per method\n"
        f"(small dots: every {settings['eval_every']} steps; big dot: step {settings['steps']}; best is top left)",
        fontsize=10,
    )
    plane.grid(alpha=0.3)
    plane.legend(fontsize=8, loc="upper right")

    ok = [(run, color) for run, color in zip(runs, COLORS, strict=False) if run["status"] == "ok"]
    labels = [run["label"] for run, _ in ok]
    colors = [color for _, color in ok]
    y = range(len(ok))
    for ax, values, xlabel, fmt, log in (
        (params_ax, [run["trainable_parameters"] for run, _ in ok], "trainable parameters", "{:,.0f}", True),
        (time_ax, [1e3 * run["interleaved_step_seconds"] for run, _ in ok], "training step (ms)", "{:.0f}", False),
        (memory_ax, [run["peak_memory_bytes"] / 2**20 for run, _ in ok], "peak memory (MiB)", "{:.1f}", False),
    ):
        ax.barh(y, values, color=colors, alpha=0.8)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        if log:
            ax.set_xscale("log")
        for i, v in enumerate(values):
            ax.annotate(fmt.format(v), (v, i), textcoords="offset points", xytext=(3, -3), fontsize=8)
        ax.set_xlim(right=max(values) * (4 if log else 1.25))
        ax.grid(alpha=0.3, axis="x")
    params_ax.set_title("trainable parameters (log scale)", fontsize=10)
    time_ax.set_title(
        f"training step: forward + backward + AdamW on {settings['batch_size']} x {settings['seq_len']} bytes\n"
        f"(median of {results['interleaved_rounds']}, the methods timed in turn)",
        fontsize=10,
    )
    memory_ax.set_title(
        "peak memory: load the base, two training steps (tracemalloc)\nweights, activations, gradients and AdamW state",
        fontsize=10,
    )
    fig.suptitle(
        f"Fine-tuning the shipped base on code for {settings['steps']} steps: each method at its default learning rate",
    )
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
