"""Merge-precision atlas: what storing and merging an adapter in float16 or bfloat16 costs, against float64.

    python examples/merge_precision.py            # writes runs/experiments/merge_precision.{json,png}
    python examples/merge_precision.py --out docs/experiments   # rewrites the committed results
    python examples/merge_precision.py --quick    # seconds: 3 training steps per adapter, into runs/quick

Adapters are trained on the shipped base for 100 steps (the code corpus, float32, as `tinypeft finetune`): LoRA at
r = 1, 8, 64 (alpha = 2r), DoRA r = 8, IA3 and VeRA. Each is then evaluated four ways on the same validation windows:
the float64 model (the ground truth: base and adapter in float64, unmerged), and, for each storage dtype
(float32, float16, bfloat16; tinypeft/precision.py: values rounded to the dtype, computed in float32), the
model unmerged and merged. LoRA merges as PEFT merges a (b)float16 weight on a CPU (ΔW in float32, cast to the
dtype, added in it); DoRA and IA3 merge in float32 from the stored tensors and are stored once. Then LoRA r = 8
with its alpha scaled by 1/16 ... 16 (the update's size against W's), and the drift of k merge/unmerge cycles:
PEFT's unmerge subtracts the cast ΔW again; tinypeft's puts the original arrays back.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import numpy as np

import tinypeft as tp
from tinypeft.cli import method_defaults
from tinypeft.data import eval_windows
from tinypeft.experiment import finetune
from tinypeft.lab import Lab, experiment_main
from tinypeft.precision import (
    STORAGE_DTYPES,
    lora_delta_float32,
    lora_merge_like_peft,
    lora_unmerge_like_peft,
    round_to,
    stored,
)
from tinypeft.train import evaluate

NAME = "merge_precision"
ADAPTERS = (
    ("LoRA r=1", "lora", ("--rank", "1")),
    ("LoRA r=8", "lora", ("--rank", "8")),
    ("LoRA r=64", "lora", ("--rank", "64")),
    ("DoRA r=8", "lora", ("--rank", "8", "--use_dora")),
    ("IA3", "ia3", ()),
    ("VeRA r=256", "vera", ()),
)
SCALES = (1 / 16, 1 / 4, 1, 4, 16)
CYCLES = (1, 10, 100, 1000)


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main(NAME, __doc__, argv, measure, plot, eval_every=0, steps=100)


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def rebuilt(model: tp.PeftModel, dtype: str, config: tp.PeftConfig | None = None) -> tp.PeftModel:
    """`model`'s base and adapter in a new model: float64 (the truth), or stored in `dtype` and computed in float32."""
    base = model.base_model
    compute = "float64" if dtype == "float64" else "float32"
    params = {k: np.asarray(v, np.float64) for k, v in base.params.items()}
    state = {k: np.asarray(v, np.float64) for k, v in model.adapter_state_dict().items()}
    if dtype != "float64":
        params, state = stored(params, dtype), stored(state, dtype)
    new_base = tp.GPT.with_params(dataclasses.replace(base.config, dtype=compute), np, params)
    new = tp.get_peft_model(new_base, config or model.active.config)
    new.load_adapter_state_dict(state)
    return new.eval()


def merged_like_peft(model: tp.PeftModel, dtype: str) -> tp.GPT:
    """The merged model stored in dtype: LoRA as PEFT merges it (ΔW cast to dtype, then added), DoRA and IA3
    merged in float32 from the stored tensors and stored once."""
    adapter = model.active
    lora = isinstance(adapter, tp.methods.lora.LoraAdapter) and not adapter.config.use_dora
    if lora:
        params = dict(model.base_model.params)
        for layer in adapter.layers:
            delta = lora_delta_float32(
                adapter.params[layer.lora_A], adapter.params[layer.lora_B], adapter.config.scaling
            )
            params[layer.weight] = lora_merge_like_peft(params[layer.weight], delta, dtype)
    else:
        merged = model.merge_and_unload().params
        params = {k: round_to(v, dtype) if v is not model.base_model.params[k] else v for k, v in merged.items()}
    return tp.GPT.with_params(model.base_model.config, np, params)


def evaluate_adapter(label: str, model: tp.PeftModel, ids: np.ndarray, lab: Lab, config=None) -> dict:
    """Truth, then unmerged and merged in each storage dtype: logits error, the share of the adapter's effect
    on the logits that is lost, the update's error, and the task validation loss."""
    s = lab.settings
    loss = lambda m: evaluate(m, lab.task.val, s.seq_len, s.eval_windows, s.batch_size)  # noqa: E731
    truth = rebuilt(model, "float64", config)
    truth_logits, base_logits = truth(ids), truth.base_model(ids)
    effect = np.linalg.norm(truth_logits - base_logits)
    true_merged = truth.merge_and_unload().params
    row = {"label": label, "truth_loss": loss(truth), "effect_norm": float(effect), "dtypes": {}}
    for dtype in STORAGE_DTYPES:
        unmerged = rebuilt(model, dtype, config)
        merged = merged_like_peft(unmerged, dtype)
        changed = [k for k, v in merged.params.items() if v is not unmerged.base_model.params[k]]
        update = [merged.params[k] - unmerged.base_model.params[k] for k in changed]
        true_update = [true_merged[k] - truth.base_model.params[k] for k in changed]
        lost = np.sqrt(sum(np.sum((u - t) ** 2) for u, t in zip(update, true_update, strict=True)))
        row["dtypes"][dtype] = {
            "unmerged_logits_error": relative(unmerged(ids), truth_logits),
            "merged_logits_error": relative(merged(ids), truth_logits),
            "merged_vs_unmerged": relative(merged(ids), unmerged(ids)),
            "effect_lost_unmerged": float(np.linalg.norm(unmerged(ids) - truth_logits) / effect),
            "effect_lost_merged": float(np.linalg.norm(merged(ids) - truth_logits) / effect),
            "update_error_merged": float(lost / np.sqrt(sum(np.sum(t**2) for t in true_update))),
            "unmerged_loss": loss(unmerged),
            "merged_loss": loss(merged),
        }
        d = row["dtypes"][dtype]
        print(
            f"{label:>20s} {dtype:>9s}  logits error unmerged {d['unmerged_logits_error']:.1e} merged "
            f"{d['merged_logits_error']:.1e}  update lost by merging {d['update_error_merged']:.1%}  loss "
            f"{row['truth_loss']:.4f} / {d['unmerged_loss']:.4f} / {d['merged_loss']:.4f}",
            flush=True,
        )
    return row


def drift(model: tp.PeftModel, ids: np.ndarray, cycles: Sequence[int]) -> dict:
    """k merge/unmerge cycles in each dtype: PEFT's (subtracting the cast ΔW) and tinypeft's (restoring)."""
    truth_logits = rebuilt(model, "float64")(ids)
    out = {}
    for dtype in STORAGE_DTYPES:
        m = rebuilt(model, dtype)
        adapter, base = m.active, dict(m.base_model.params)
        deltas = {
            layer.weight: lora_delta_float32(
                adapter.params[layer.lora_A], adapter.params[layer.lora_B], adapter.config.scaling
            )
            for layer in adapter.layers
        }
        weights, rows, done = dict(base), [], 0
        for k in cycles:
            for _ in range(k - done):
                for name, delta in deltas.items():
                    weights[name] = lora_unmerge_like_peft(
                        lora_merge_like_peft(weights[name], delta, dtype), delta, dtype
                    )
            done = k
            num = np.sqrt(sum(np.sum((weights[n] - base[n]) ** 2) for n in deltas))
            den = np.sqrt(sum(np.sum(base[n] ** 2) for n in deltas))
            m.base_model.params = weights
            rows.append({"cycles": k, "weight_drift": float(num / den), "logits_error": relative(m(ids), truth_logits)})
            m.base_model.params = base
        originals = dict(m.base_model.params)
        for _ in range(cycles[-1]):
            m.merge_adapter()
            m.unmerge_adapter()
        restored = all(m.base_model.params[k] is v for k, v in originals.items())
        out[dtype] = {"peft": rows, "tinypeft_restored_exactly": restored}
        print(f"{dtype:>9s} drift after {cycles[-1]} PEFT cycles {rows[-1]['weight_drift']:.1e}; tinypeft: {restored}")
    return out


def measure(lab: Lab) -> dict:
    s = lab.settings
    ids = eval_windows(lab.task.val, s.seq_len, min(8, s.eval_windows))
    adapters, trained = [], {}
    for label, method, flags in ADAPTERS:
        config, lr = method_defaults(method, *flags)
        run = finetune(lab.fresh_base(), config, lab.task, lab.prose, s.train_config(lr), method=label,
                       progress=lab.progress, quiet=True, sample_bytes=0, base_losses=lab.base_losses)  # fmt: skip
        trained[label] = run.model
        adapters.append(evaluate_adapter(label, run.model, ids, lab))
    lora8 = trained["LoRA r=8"]
    scales = []
    for factor in SCALES:
        config = dataclasses.replace(lora8.active.config, lora_alpha=lora8.active.config.lora_alpha * factor)
        scales.append(evaluate_adapter(f"LoRA r=8, alpha x {factor:g}", lora8, ids, lab, config) | {"scale": factor})
    cycles = CYCLES if s.steps > 3 else CYCLES[:2]
    return {"adapters": adapters, "scales": scales, "drift": drift(lora8, ids, cycles), "logit_windows": len(ids)}


def plot(results: dict, path: str) -> str:
    from tinypeft.plots import pyplot, save_figure

    plt = pyplot()
    colors = {"float32": "tab:blue", "float16": "tab:orange", "bfloat16": "tab:red"}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5), dpi=110)
    ax = axes[0, 0]
    labels = [row["label"] for row in results["adapters"]]
    x = np.arange(len(labels))
    for i, dtype in enumerate(STORAGE_DTYPES):
        for j, kind in enumerate(("unmerged", "merged")):
            values = [row["dtypes"][dtype][f"effect_lost_{kind}"] for row in results["adapters"]]
            ax.bar(x + (2 * i + j - 2.5) * 0.13, values, 0.13, color=colors[dtype], alpha=1.0 if j else 0.45,
                   label=f"{dtype} {kind}")  # fmt: skip
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("|logits - truth| / |adapter's effect on the logits|")
    ax.set_title("share of the adapter's effect lost, by method and storage dtype")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[0, 1]
    scales = [row["scale"] for row in results["scales"]]
    for dtype in STORAGE_DTYPES:
        ax.plot(scales, [r["dtypes"][dtype]["update_error_merged"] for r in results["scales"]], "o-",
                color=colors[dtype], label=f"{dtype}: merged update's error")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("alpha, as a multiple of the trained LoRA r=8's (its update's size)")
    ax.set_ylabel("|merged W - stored W - true ΔW| / |true ΔW|")
    ax.set_title("how much of the update a merge rounds away")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1, 0]
    for dtype in STORAGE_DTYPES:
        rows = results["drift"][dtype]["peft"]
        ax.plot([r["cycles"] for r in rows], [max(r["weight_drift"], 1e-12) for r in rows], "o-", color=colors[dtype],
                label=f"{dtype}: PEFT (unmerge subtracts)")  # fmt: skip
    ax.axhline(1e-12, color="0.3", ls="--", lw=1, label="tinypeft (unmerge restores): exactly 0, drawn at 1e-12")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("merge/unmerge cycles")
    ax.set_ylabel("|W_k - W_0| / |W_0| (LoRA r=8's layers)")
    ax.set_title("drift of the base weights after k merge/unmerge cycles")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1, 1]
    rows = results["adapters"]
    for i, dtype in enumerate(STORAGE_DTYPES):
        for j, kind in enumerate(("unmerged", "merged")):
            values = [row["dtypes"][dtype][f"{kind}_loss"] - row["truth_loss"] for row in rows]
            ax.bar(x + (2 * i + j - 2.5) * 0.13, values, 0.13, color=colors[dtype], alpha=1.0 if j else 0.45,
                   label=f"{dtype} {kind}")  # fmt: skip
    ax.axhline(0, color="0.3", lw=1)
    ax.set_xticks(x, labels)
    ax.set_ylabel("validation loss - float64 loss (nats per byte)")
    ax.set_title("effect on the task loss")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Merge precision on the shipped base ({results['settings']['steps']} training steps per adapter)")
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
