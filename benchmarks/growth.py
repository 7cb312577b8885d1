"""How step time grows with T, n_embd, rank and batch, for tinypeft and PyTorch + PEFT: the scaling
section's medians on log-log axes, each curve with its fitted exponent.

The exponent is the least-squares slope of log(time) on log(value) over the points of an axis, so
time ∝ value^exponent across the range measured: 1 is linear, 2 quadratic; a curve that bends (fixed
costs at the small end, a regime change at the large end) has an exponent between its local slopes,
and the plot shows the bend.

    python -m benchmarks.growth benchmarks/results.json   # writes benchmarks/growth.png beside it
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONTENDERS = ("tinypeft lora", "torch+peft lora")


def fit_exponent(points: Mapping[float, float]) -> float | None:
    """The slope of log(time) on log(value); None with fewer than two points."""
    pairs = [(math.log(float(v)), math.log(t)) for v, t in points.items() if t]
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx if sxx else None


def exponents(scaling: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> dict[str, dict[str, float | None]]:
    """{axis: {contender: exponent}} from the scaling section's {axis: {value: {label: median_s}}}."""
    return {
        axis: {c: fit_exponent({v: row.get(c) for v, row in rows.items()}) for c in CONTENDERS}
        for axis, rows in scaling.items()
    }


def plot_growth(scaling: Mapping[str, Mapping[Any, Mapping[str, float]]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitted = exponents(scaling)
    fig, axes = plt.subplots(1, len(scaling), figsize=(4.2 * len(scaling), 3.6), squeeze=False)
    for ax, (axis, rows) in zip(axes[0], scaling.items(), strict=True):
        values = sorted(rows, key=float)
        for contender, style in zip(CONTENDERS, ("o-", "s--"), strict=True):
            times = [rows[v].get(contender) for v in values]
            kept = [(float(v), 1e3 * t) for v, t in zip(values, times, strict=True) if t]
            k = fitted[axis][contender]
            label = f"{contender} (∝ {axis}^{k:.2f})" if k is not None else contender
            ax.plot([v for v, _ in kept], [t for _, t in kept], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("LoRA step (ms)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("LoRA step time against each axis (the others at the grid's base), log-log")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # never a half-written PNG


def print_exponents(scaling: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> None:
    print("\n### fitted exponents of LoRA step time (time ∝ value^k over the grid)\n")
    print("| axis | tinypeft | torch+peft |\n|---|---|---|")
    for axis, by in exponents(scaling).items():
        shown = ["-" if by[c] is None else f"{by[c]:.2f}" for c in CONTENDERS]
        print(f"| {axis} | {shown[0]} | {shown[1]} |")


def main(argv: list[str] | None = None) -> int:
    import json

    args = sys.argv[1:] if argv is None else argv
    results = Path(args[0] if args else "benchmarks/results.json")
    scaling = json.loads(results.read_text())["scaling"]
    print_exponents(scaling)
    plot_growth(scaling, results.with_name("growth.png"))
    print(f"plot written to {results.with_name('growth.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
