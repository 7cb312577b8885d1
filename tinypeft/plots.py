"""Training plots (matplotlib, drawn off-screen). Optional: `pip install 'tinypeft[plot]'`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():
    """matplotlib.pyplot drawing off-screen (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_bits_axis(ax: Any, unit: str = "byte") -> Any:
    """A right-hand axis in bits per byte for an axis whose y is nats per byte (or per token)."""
    right = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
    right.set_ylabel(f"bits per {unit}")
    return right


def save_figure(fig: Any, path: str) -> str:
    """Write fig as a PNG at path (atomically) and close it; returns path."""
    _save(fig, path)
    pyplot().close(fig)
    return path


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average, so the curve shows the trend rather than batch-to-batch noise."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(
    train_losses: Sequence[Mapping[str, float]],
    evals: Sequence[Mapping[str, float]],
    path: str,
    title: str,
    eval_labels: Mapping[str, str] | None = None,
    unit: str = "byte",
) -> str:
    """Loss curves in nats per byte (bits per byte on the right axis; per token for a model with its own
    tokenizer): the smoothed training loss and every evaluation set. Writes a PNG to path and returns it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    steps = [row["step"] for row in train_losses]
    losses = [row["loss"] for row in train_losses]
    if losses:
        ax.plot(steps, losses, color="0.8", linewidth=0.8, label="train loss (each step)")
        ax.plot(
            steps, smooth(losses, max(1, len(losses) // 30)), color="0.35", linewidth=1.5, label="train loss (smoothed)"
        )
    eval_labels = dict(eval_labels or {})
    names = [k for k in (evals[0] if evals else {}) if k != "step"]
    for name, color in zip(names, ["tab:blue", "tab:red", "tab:green", "tab:purple"], strict=False):
        xs = [row["step"] for row in evals]
        ys = [row[name] for row in evals]
        ax.plot(
            xs, ys, "o-", color=color, linewidth=2, markersize=5, label=eval_labels.get(name, f"{name} validation loss")
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"loss (nats per {unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    add_bits_axis(ax, unit)
    fig.tight_layout()
    return save_figure(fig, path)


def _save(fig: Any, path: str) -> None:
    """Render to memory, then write through io's atomic write (temporary name, fsync, rename), so a
    killed run never leaves half a PNG."""
    import io

    from .io import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
