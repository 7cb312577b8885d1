"""Learning against forgetting: each method's frontier over learning rates, checkpoints and seeds.

    python examples/frontiers.py            # writes runs/experiments/frontiers.{json,png} and frontiers_spectra.png
    python examples/frontiers.py --out docs/experiments   # rewrites the committed results
    python examples/frontiers.py --replot --out docs/experiments   # redraws both PNGs from the JSON
    python examples/frontiers.py --quick    # seconds: 3 steps, two seeds, into runs/quick
    python examples/frontiers.py --out docs/experiments --resume   # finishes a grid that was stopped
    python examples/frontiers.py --seeds 0 1   # other seeds than the default 0 1 2
    python examples/frontiers.py --methods BitFit IA3   # some of the methods only
    python examples/frontiers.py --out docs/experiments --resume --finished_only   # the runs saved so far, no more

Biderman et al., "LoRA Learns Less and Forgets Less" (TMLR 2024), at tinypeft's scale: the shipped base
(pretrained on prose) fine-tuned on code. Every method trains at three learning rates with three seeds (the
seed draws the adapter's initialisation and the batches), evaluated every 10 steps; each evaluation is a point
(code loss, prose loss), each run a trajectory, and a method's frontier is the Pareto front of its points.

1. Frontiers: every trajectory, each seed's front per method, and the fronts of all methods together.
2. Matched forgetting: the prose-loss rise of each method when its code loss has fallen by a given gain,
   interpolated along each trajectory, the best over the learning rates, per seed; mean and spread over seeds.
3. The rank of what fine-tuning learns: the singular values of ΔW = W_after - W_before of every block matrix
   after full fine-tuning and after LoRA at two ranks (adapter merged), and the rank that holds 90% of
   ΔW's squared Frobenius norm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from tinypeft.cli import method_defaults
from tinypeft.io import load_json, save_json
from tinypeft.lab import (
    Lab,
    command_line,
    experiment_main,
    experiment_parser,
    forgetting_at_gain,
    output_paths,
    pareto_front,
    rank_for_variance,
    weight_updates,
)

NAME = "frontiers"
ALL_LINEAR = ("--target_modules", "c_attn", "c_proj", "c_fc")  # c_proj: attention's and the MLP's
METHODS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    # label: (`tinypeft finetune --method`, its flags, learning rates, half a decade apart)
    "full fine-tuning": ("full", (), (3e-4, 1e-3, 3e-3)),
    "LoRA r=8": ("lora", ("--rank", "8", *ALL_LINEAR), (3e-3, 1e-2, 3e-2)),
    "LoRA r=64": ("lora", ("--rank", "64", *ALL_LINEAR), (1e-3, 3e-3, 1e-2)),
    "DoRA r=8": ("lora", ("--rank", "8", "--use_dora", *ALL_LINEAR), (3e-3, 1e-2, 3e-2)),
    "IA3": ("ia3", (), (1e-2, 3e-2, 1e-1)),
    "prompt tuning (20 tokens)": ("prompt", (), (1e-2, 3e-2, 1e-1)),
    "prefix tuning (20 tokens)": ("prefix", (), (3e-2, 1e-1, 3e-1)),
    "bottleneck adapters (16)": ("adapter", (), (1e-3, 3e-3, 1e-2)),
    "BitFit": ("bitfit", (), (1e-3, 3e-3, 1e-2)),
}
FULL = "full fine-tuning"
SPECTRA = (FULL, "LoRA r=8", "LoRA r=64")  # the methods whose ΔW is measured
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)
GAINS = (0.1, 0.2, 0.3, 0.4)  # nats per byte of code loss: the matched comparison's levels
GAIN_STEP = 0.005  # the grid of gains the fronts are drawn on
VARIANCE = 0.9
KEPT_BELOW_TOP = 1e-4
COLORS = dict(
    zip(
        METHODS,
        ("black", "tab:blue", "navy", "tab:cyan", "tab:green", "tab:olive", "tab:orange", "tab:purple", "tab:brown"),
        strict=True,
    )
)


# Every finished run is written to NAME.partial.json beside the results; --resume takes the runs found
# there instead of training them again (same seed, same batches: the same numbers), so a grid stopped
# halfway is finished, not restarted.
PARTIAL: dict[str, Any] = {"path": None, "runs": {}, "seeds": None, "methods": None, "finished_only": False}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --resume and --seeds are this script's own: the shared parser does not know them
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--resume", action="store_true")
    own.add_argument("--seeds", type=int, nargs="+", default=None)
    own.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    own.add_argument("--finished_only", action="store_true")
    mine, shared = own.parse_known_args(argv)
    if mine.seeds is not None and (len(set(mine.seeds)) < len(mine.seeds) or min(mine.seeds) < 0):
        raise SystemExit(f"--seeds takes distinct seeds >= 0, got {mine.seeds}")
    PARTIAL["seeds"], PARTIAL["methods"] = mine.seeds, mine.methods
    PARTIAL["finished_only"] = mine.resume and mine.finished_only
    json_path, _ = output_paths(experiment_parser(NAME, NAME).parse_args(shared), NAME)
    PARTIAL["path"] = json_path.removesuffix(".json") + ".partial.json"
    if mine.resume and os.path.exists(PARTIAL["path"]):
        PARTIAL["runs"] = {run_key(run): run for run in load_json(PARTIAL["path"])["runs"]}
    if "--replot" in argv:  # the analysis is recomputed from the runs in the JSON, then drawn
        results = load_json(json_path)
        save_json(json_path, results | analyse(results["runs"], results["base_losses"], results["seeds"]))
    code = experiment_main(NAME, __doc__, shared, measure, plot, steps=100, eval_every=10)
    if "--replot" not in argv:
        results = load_json(json_path)
        # the command that remakes these numbers: --seeds matters; --resume gives the same numbers, and
        # the runs --finished_only leaves out are listed in missing_runs
        command = command_line(NAME, [a for a in argv if a not in ("--resume", "--finished_only")])
        save_json(json_path, results | {"command": command})
        if os.path.exists(PARTIAL["path"]) and not results.get("missing_runs"):  # kept while runs are missing
            os.remove(PARTIAL["path"])
    print("\n\n".join(tables(load_json(json_path)).values()))
    return code


def run_key(run: dict) -> tuple[str, float, int]:
    return run["label"], run["lr"], run["seed"]


# ---------------------------------------------------------------- measuring
def spectrum_of_update(base_params: dict[str, np.ndarray], keep_values: bool):
    """An `inspect` for Lab.run: the rank that holds VARIANCE of each block matrix's ΔW's squared norm
    and, if keep_values (the first seed's runs: the JSON stays small), its singular values to 4 digits
    down to KEPT_BELOW_TOP of the largest (LoRA's below its rank are float32 rounding of the merge)."""

    def inspect(model) -> dict[str, Any]:
        spectra, ranks = {}, {}
        for name, delta in weight_updates(model, base_params).items():
            singular_values = np.linalg.svd(delta, compute_uv=False)
            kept = singular_values[singular_values >= KEPT_BELOW_TOP * singular_values[0]]
            spectra[name] = [float(f"{s:.4g}") for s in kept]
            ranks[name] = rank_for_variance(singular_values, VARIANCE)
        return {"update_rank90": ranks} | ({"update_singular_values": spectra} if keep_values else {})

    return inspect


def measure(lab: Lab) -> dict[str, Any]:
    quick = lab.settings.steps < 10
    seeds = QUICK_SEEDS if quick else SEEDS
    seeds = tuple(PARTIAL["seeds"]) if PARTIAL["seeds"] is not None else seeds
    base_params = lab.fresh_base().state_dict()
    runs, missing = [], []
    for seed in seeds:  # seed outermost: a run cut short still has every method at the first seeds
        for label, (method, flags, rates) in METHODS.items():
            if PARTIAL["methods"] is not None and label not in PARTIAL["methods"]:
                continue
            config, _ = method_defaults(method, *flags)
            inspect = spectrum_of_update(base_params, seed == SEEDS[0]) if label in SPECTRA else None
            for lr in rates:
                row = PARTIAL["runs"].get((label, lr, seed))
                if row is None and PARTIAL["finished_only"]:
                    missing.append({"label": label, "lr": lr, "seed": seed})
                    continue
                if row is None:
                    row = lab.run(label, config, lr, seed=seed, method=method, flags=list(flags), inspect=inspect)
                    row.pop("train_losses", None)  # the evaluations are the trajectory; the JSON stays small
                runs.append(row)
                if PARTIAL["path"] is not None:
                    save_json(PARTIAL["path"], {"runs": runs})
    resumed = sum(run_key(run) in PARTIAL["runs"] for run in runs)
    # the runs' own wall time: `minutes` is this invocation's, which under --resume leaves out the resumed runs
    run_minutes = round(sum(run["seconds"] for run in runs) / 60, 2)
    return {
        "runs": runs,
        "resumed_runs": resumed,
        "missing_runs": missing,
        "run_minutes": run_minutes,
        "seeds": list(seeds),
        "gains": list(GAINS),
        "variance": VARIANCE,
    } | analyse(runs, lab.base_losses, seeds)


# ---------------------------------------------------------------- analysis (from the JSON's runs alone)
def trajectory(run: dict, base: dict) -> tuple[list[float], list[float]]:
    """(task gains, prose forgettings) of a run's evaluations, in training order."""
    return [base["task"] - e["task"] for e in run["evals"]], [e["prose"] - base["prose"] for e in run["evals"]]


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (None for one value), min and max, and how many."""
    if not values:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def best_forgetting_at_gain(runs: Sequence[dict], base: dict, gain: float) -> float | None:
    """The least forgetting at `gain` over runs (of one method and seed), each interpolated along its trajectory."""
    values = [forgetting_at_gain(*trajectory(run, base), gain) for run in runs if run["status"] == "ok"]
    done = [v for v in values if v is not None]
    return min(done) if done else None


def envelope(values: Sequence[float | None]) -> list[float | None]:
    """Each value replaced by the least of it and the values after it (None where there are none): along a
    rising grid of gains, the least forgetting at that gain or more, which is the Pareto front."""
    out: list[float | None] = []
    best = None
    for value in reversed(values):
        if value is not None:
            best = value if best is None else min(best, value)
        out.append(best)
    return out[::-1]


def analyse(runs: Sequence[dict], base: dict, seeds: Sequence[int]) -> dict[str, Any]:
    """The fronts, the matched-forgetting table, the verdict against full fine-tuning and the ranks of ΔW."""
    by = {
        label: {seed: [r for r in runs if r["label"] == label and r["seed"] == seed] for seed in seeds}
        for label in METHODS
    }
    by = {label: per_seed for label, per_seed in by.items() if any(per_seed.values())}
    fronts, reach, matched, curves = {}, {}, {}, {}
    for label, per_seed in by.items():
        points = {
            seed: [(e["task"], e["prose"]) for r in rs if r["status"] == "ok" for e in r["evals"]]
            for seed, rs in per_seed.items()
        }
        fronts[label] = {str(seed): pareto_front(p) for seed, p in points.items()}
        best_gains = [base["task"] - min(t for t, _ in p) for p in points.values() if p]
        reach[label] = spread(best_gains)
        top = max(best_gains, default=0.0)
        grid = [round(GAIN_STEP * i, 6) for i in range(1, int(top / GAIN_STEP) + 1)]
        envelopes = {
            seed: envelope([best_forgetting_at_gain(rs, base, g) for g in grid]) for seed, rs in per_seed.items()
        }
        curves[label] = {"gains": grid, "per_seed": {str(s): v for s, v in envelopes.items()}}
        matched[label] = {}
        for gain in GAINS:
            per = {}
            for seed, rs in per_seed.items():
                # the least forgetting of any point with at least this gain: where the run crossed it, or later
                later = [v for g, v in zip(grid, envelopes[seed], strict=True) if g >= gain and v is not None][:1]
                here = best_forgetting_at_gain(rs, base, gain)
                done = [v for v in [here, *later] if v is not None]
                per[seed] = min(done) if done else None
            matched[label][str(gain)] = spread([v for v in per.values() if v is not None]) | {
                "per_seed": {str(s): v for s, v in per.items()}
            }
    verdict = {}
    for label in by:
        if label == FULL or FULL not in matched:
            continue
        verdict[label] = {}
        for gain in GAINS:
            mine, full = matched[label][str(gain)]["per_seed"], matched[FULL][str(gain)]["per_seed"]
            # same seed, same batches: the difference is paired
            diffs = [mine[s] - full[s] for s in mine if mine[s] is not None and full.get(s) is not None]
            if not diffs or len(diffs) < len(seeds):
                call = "not reached by every seed"
            elif all(d < 0 for d in diffs):
                call = "forgets less"
            elif all(d > 0 for d in diffs):
                call = "forgets more"
            else:
                call = "within the seeds' spread"
            verdict[label][str(gain)] = spread(diffs) | {"call": call}
    return {
        "fronts": fronts,
        "reach": reach,
        "matched_forgetting": matched,
        "front_curves": curves,
        "verdict_vs_full": verdict,
        "ranks": ranks(runs, by),
    }


def ranks(runs: Sequence[dict], by: dict) -> dict[str, Any]:
    """For each method of SPECTRA and learning rate: the final code loss (mean over seeds) and, per
    block matrix, the rank holding VARIANCE of ΔW's squared norm over the seeds."""
    table: dict[str, Any] = {}
    for label in SPECTRA:
        if label not in by:
            continue
        table[label] = {}
        for lr in METHODS[label][2]:
            rs = [r for r in runs if r["label"] == label and r["lr"] == lr]
            ok = [r for r in rs if r["status"] == "ok"]
            if not ok:
                continue
            names = list(ok[0]["update_rank90"])
            table[label][str(lr)] = {
                "task_after": spread([r["task_after"] for r in ok]),
                "prose_after": spread([r["prose_after"] for r in ok]),
                "rank90": {name: spread([r["update_rank90"][name] for r in ok]) for name in names},
            }
    return table


# ---------------------------------------------------------------- tables (docs/frontiers.md holds them verbatim)
def pm(cell: dict, seeds: int, signed: bool = True) -> str:
    """mean ± sd of a spread, with how many seeds when not all; "not reached" when none."""
    if cell["n"] == 0:
        return "not reached"
    text = f"{cell['mean']:+.3f}" if signed else f"{cell['mean']:.3f}"
    text += f" ± {cell['sd']:.3f}" if cell["sd"] is not None else ""
    return text + (f" ({cell['n']} of {seeds} seeds)" if cell["n"] < seeds else "")


def matrix_shape(name: str, base_config: dict) -> tuple[int, int]:
    """(in, out) of a block matrix (GPT-2's Conv1D stores W as in x out)."""
    width = base_config["n_embd"]
    inner = base_config.get("n_inner") or 4 * width
    module = name.split(".", 3)[3].removesuffix(".weight")
    return {"attn.c_attn": (width, 3 * width), "attn.c_proj": (width, width), "mlp.c_fc": (width, inner)}.get(
        module, (inner, width)
    )


def tables(results: dict) -> dict[str, str]:
    """The page's tables: the grid's final losses, the matched forgetting, the verdict against full
    fine-tuning and the ranks of ΔW, as markdown."""
    seeds = len(results["seeds"])
    labels = [label for label in METHODS if label in results["reach"]]
    gains = [str(g) for g in results["gains"]]
    params = {r["label"]: r["trainable_parameters"] for r in results["runs"] if r["status"] == "ok"}

    grid = ["| method | trainable | low rate | middle rate | high rate |"]
    grid.append("|---|---|---|---|---|")
    for label in labels:
        cells = []
        for lr in METHODS[label][2]:
            rs = [r for r in results["runs"] if r["label"] == label and r["lr"] == lr]
            done = [r for r in rs if r["status"] == "ok"]
            if len(done) < len(rs):
                cells.append(f"{lr:g}: {len(rs) - len(done)} of {len(rs)} diverged")
                continue
            task = spread([r["task_after"] for r in done])
            prose = spread([r["prose_after"] for r in done])
            cells.append(f"{lr:g}: {pm(task, seeds, False)}, {pm(prose, seeds, False)}")
        grid.append(f"| {label} | {params.get(label, 0):,d} | " + " | ".join(cells) + " |")

    matched = ["| method | best code gain | " + " | ".join(f"forgetting at gain {g}" for g in gains) + " |"]
    matched.append("|---" * (2 + len(gains)) + "|")
    for label in labels:
        cells = [pm(results["matched_forgetting"][label][g], seeds) for g in gains]
        matched.append(f"| {label} | {pm(results['reach'][label], seeds, False)} | " + " | ".join(cells) + " |")

    verdict = ["| method | " + " | ".join(f"at gain {g}: minus full fine-tuning" for g in gains) + " |"]
    verdict.append("|---" * (1 + len(gains)) + "|")
    for label in labels:
        if label not in results["verdict_vs_full"]:
            continue
        per_gain = results["verdict_vs_full"][label]
        cells = []
        for g in gains:
            cell = per_gain[g]
            cells.append(cell["call"] if cell["n"] < seeds else f"{pm(cell, seeds)}: {cell['call']}")
        verdict.append(f"| {label} | " + " | ".join(cells) + " |")

    # full fine-tuning at every rate (its code loss rises with the rate here, so one of them may match a
    # LoRA's), each LoRA at the rate of its lowest code loss
    chosen = chosen_rates(results)
    columns = [(FULL, str(lr)) for lr in METHODS[FULL][2] if str(lr) in results["ranks"].get(FULL, {})]
    columns += [(label, str(chosen[label])) for label in SPECTRA[1:] if label in chosen]
    header = " | ".join(f"{label}, lr {float(lr):g}" for label, lr in columns)
    rank = [f"| block matrix | shape | {header} | i.i.d. Gaussian matrix of that shape |"]
    rank.append("|---" * (3 + len(columns)) + "|")
    first = results["ranks"][columns[0][0]][columns[0][1]]["rank90"] if columns else {}
    for name in first:
        shape = matrix_shape(name, results["base_config"])
        cells = []
        for label, lr in columns:
            cell = results["ranks"][label][lr]["rank90"][name]
            text = f"{cell['mean']:.1f}"
            cells.append(text + (f" ({cell['min']}-{cell['max']})" if cell["min"] != cell["max"] else ""))
        noise = rank_for_variance(np.linalg.svd(np.random.default_rng(0).standard_normal(shape), compute_uv=False))
        rank.append(f"| {short(name)} | {shape[0]}x{shape[1]} | " + " | ".join(cells) + f" | {noise} |")
    loss_cells = [pm(results["ranks"][label][lr]["task_after"], seeds, False) for label, lr in columns]
    rank.append("| **code loss after** | | " + " | ".join(loss_cells) + " | |")
    return {
        "grid": "\n".join(grid),
        "matched": "\n".join(matched),
        "verdict": "\n".join(verdict),
        "ranks": "\n".join(rank),
    }


# ---------------------------------------------------------------- plots
def short(name: str) -> str:
    """transformer.h.2.mlp.c_fc.weight -> h2 mlp.c_fc"""
    parts = name.split(".")
    return f"h{parts[2]} {parts[3]}.{parts[4]}"


def plot(results: dict, path: str) -> str:
    plot_frontiers(results, path)
    plot_spectra(results, path.removesuffix(".png") + "_spectra.png")
    return path


def plot_frontiers(results: dict, path: str) -> str:
    from tinypeft.plots import pyplot, save_figure

    plt = pyplot()
    base, runs, seeds = results["base_losses"], results["runs"], results["seeds"]
    labels = [label for label in METHODS if label in results["fronts"]]
    fig = plt.figure(figsize=(20, 11), dpi=100)
    grid = fig.add_gridspec(3, 5)
    styles = ("-", "--", ":")
    ok = [r for r in runs if r["status"] == "ok"]
    tasks = [e["task"] for r in ok for e in r["evals"]] + [base["task"]]
    proses = [e["prose"] for r in ok for e in r["evals"]] + [base["prose"]]
    # a run that blew prose loss up would squeeze every other into a corner: clip the view at the 98th percentile
    top = float(np.percentile(proses, 98)) if proses else base["prose"] + 1
    xlim = (min(tasks) - 0.02, max(tasks) + 0.02)
    ylim = (min(proses) - 0.02, top + 0.02)
    for i, label in enumerate(labels):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        rates = METHODS[label][2]
        cmap = plt.get_cmap("viridis")
        for r in ok:
            if r["label"] != label:
                continue
            color = cmap(rates.index(r["lr"]) / max(1, len(rates) - 1)) if r["lr"] in rates else "gray"
            ax.plot(
                [e["task"] for e in r["evals"]],
                [e["prose"] for e in r["evals"]],
                styles[seeds.index(r["seed"]) % 3],
                color=color,
                lw=1,
                marker=".",
                ms=3,
                alpha=0.8,
            )
        for seed, front in results["fronts"][label].items():
            if front:
                xs, ys = zip(*front, strict=True)
                ax.step(xs, ys, where="post", color="red", lw=0.9, alpha=0.7, ls=styles[seeds.index(int(seed)) % 3])
        ax.plot(base["task"], base["prose"], "k*", ms=9)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        reach = results["reach"][label]
        ax.set_title(f"{label}: best gain {reach['mean']:.3f} ± {reach['sd'] or 0:.3f}", fontsize=9)
        for lr_index, lr in enumerate(rates):
            ax.plot([], [], color=cmap(lr_index / max(1, len(rates) - 1)), label=f"lr {lr:g}")
        if i == 0:
            for s_index, seed in enumerate(seeds):
                ax.plot([], [], styles[s_index % 3], color="gray", label=f"seed {seed}")
            ax.plot([], [], color="red", lw=0.9, label="front (per seed)")
        ax.legend(fontsize=6.5, loc="upper left")
        if i // 3 == 2:
            ax.set_xlabel("code loss (task)", fontsize=8)
        if i % 3 == 0:
            ax.set_ylabel("prose loss (forgetting ↑)", fontsize=8)
        ax.tick_params(labelsize=7)

    # all fronts together: the least forgetting at each gain, mean over seeds, band = min..max over seeds
    ax = fig.add_subplot(grid[:, 3:])
    for label in labels:
        curve = results["front_curves"][label]
        mean, low, high, xs = [], [], [], []
        for j, gain in enumerate(curve["gains"]):
            values = [v[j] for v in curve["per_seed"].values()]
            if all(v is not None for v in values):
                xs.append(base["task"] - gain)
                mean.append(base["prose"] + statistics.fmean(values))
                low.append(base["prose"] + min(values))
                high.append(base["prose"] + max(values))
        if xs:
            ax.plot(xs, mean, color=COLORS[label], lw=2, label=label)
            ax.fill_between(xs, low, high, color=COLORS[label], alpha=0.15, lw=0)
    ax.plot(base["task"], base["prose"], "k*", ms=12, label="base model")
    for gain in results["gains"]:
        ax.axvline(base["task"] - gain, color="0.6", lw=0.8, ls=":")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("code validation loss (nats per byte): learning ←")
    ax.set_ylabel("prose validation loss (nats per byte): forgetting ↑")
    ax.set_title(
        "each method's front: least prose loss at each code loss, best over learning rates and checkpoints\n"
        "(line: mean over seeds where every seed gets there; band: min to max over seeds; dotted: the matched gains)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    settings = results["settings"]
    fig.suptitle(
        f"Learning code against forgetting prose: {len(labels)} methods x 3 learning rates x {len(seeds)} seeds, "
        f"{settings['steps']} steps, evaluated every {settings['eval_every']} (star: the base)",
        fontsize=12,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def plot_spectra(results: dict, path: str) -> str:
    from tinypeft.plots import pyplot, save_figure

    plt = pyplot()
    modules = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), dpi=100)
    styles = {FULL: "-", "LoRA r=64": "--", "LoRA r=8": ":"}
    chosen = chosen_rates(results)
    seed = results["seeds"][0]
    for label, lr in chosen.items():
        run = next(
            (
                r
                for r in results["runs"]
                if r["label"] == label and r["lr"] == lr and r["seed"] == seed and r["status"] == "ok"
            ),
            None,
        )
        if run is None:
            continue
        for name, values in run["update_singular_values"].items():
            col = next(i for i, m in enumerate(modules) if f".{m}." in name)
            layer = int(name.split(".")[2])
            color = plt.get_cmap("plasma")(layer / 4)
            s = np.asarray(values)
            k = np.arange(1, len(s) + 1)
            axes[0, col].semilogy(k, s / s[0], styles[label], color=color, lw=1.2)
            axes[1, col].plot(k, np.cumsum(s**2) / np.sum(s**2), styles[label], color=color, lw=1.2)
    for col, module in enumerate(modules):
        axes[0, col].set_title(f"{module}: sigma_i / sigma_1 of ΔW", fontsize=10)
        axes[1, col].set_title(f"{module}: share of ||ΔW||² in the top k", fontsize=10)
        axes[1, col].axhline(results["variance"], color="0.4", lw=0.8)
        axes[1, col].set_xlabel("k (singular direction)")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    for label, lr in chosen.items():
        axes[0, 0].plot([], [], styles[label], color="0.3", label=f"{label} (lr {lr:g})")
    for layer in range(4):
        axes[0, 0].plot([], [], color=plt.get_cmap("plasma")(layer / 4), label=f"block {layer}")
    axes[0, 0].legend(fontsize=7.5, loc="lower left")
    fig.suptitle(
        f"Singular values of ΔW = W_after - W_before per block matrix, seed {seed}, each method at the learning rate "
        f"of its lowest code loss (LoRA's: the merged B·A·alpha/r, rank ≤ r up to float32 rounding)",
        fontsize=11,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def chosen_rates(results: dict) -> dict[str, float]:
    """For each method of SPECTRA measured: the learning rate of its lowest final code loss (mean over seeds)."""
    chosen = {}
    for label, per_lr in results["ranks"].items():
        lr = min(per_lr, key=lambda k: per_lr[k]["task_after"]["mean"])
        chosen[label] = float(lr)
    return chosen


if __name__ == "__main__":
    sys.exit(main())
