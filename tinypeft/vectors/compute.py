"""Computing the golden cases: tinypeft's logits, loss and gradients in float64, from weights rounded to
the case's dtype, written with the tolerances a port must meet.

The expected values are always computed in float64. A float32 case holds float32 weights, and its
expected values are the float64 computation from exactly those weights: the error a port makes is then
its own float32 rounding, which the per-tensor tolerances bound.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import __version__, gpt
from ..errors import ConfigError
from ..gradcheck import model_loss_fn
from ..io import save_json
from ..methods.registry import GoldenCase
from ..model import GPT, GPTConfig
from ..peft_model import get_peft_model
from .format import DTYPES, FORMAT, INDEX_NAME, MODEL_CONFIG_FIELDS, VERSION, Array, Case, write_case
from .generation import export_generations
from .merge import export_merges
from .roundtrip import export_round_trips
from .specs import SPECS, make_batch
from .tolerances import TOLERANCE_NOTES, tolerances
from .trajectory import export_trajectories

# How far from its init every tensor is moved before the expected values are computed: GPT-2's init is
# symmetric (LayerNorm weights 1, biases 0) and LoRA's B = 0 makes dA vanish, so a gradient computed
# there checks little. 0.3 gives O(1) pre-activations and attention far from uniform in these widths.
PERTURBATION = 0.3


def _rounded(value: Array, dtype: str) -> Array:
    """value in float64, rounded to dtype's precision: the float32 cases compute exactly what is stored."""
    return np.asarray(value, dtype=np.float64).astype(dtype).astype(np.float64)


def compute_case(spec: GoldenCase, dtype: str) -> Case:
    """Build the spec's model in float64, move every tensor off its init, round it to `dtype`, and compute
    logits, loss and the gradients of the trainable tensors in float64."""
    rng = np.random.default_rng((spec.seed, 7))
    config = GPTConfig(**spec.model, dtype="float64")
    base = GPT(config, seed=spec.seed, device="cpu")  # the expected values: NumPy float64, whatever the default
    base.params = {k: _rounded(v + PERTURBATION * rng.standard_normal(v.shape), dtype) for k, v in base.params.items()}
    method_config = spec.config()
    model: Any = base
    derived: dict[str, Array] = {}
    if method_config is not None:
        model = get_peft_model(base, method_config, seed=spec.seed)
        adapter = model.active
        for name, value in adapter.params.items():
            moved = value + PERTURBATION * rng.standard_normal(value.shape) if spec.perturb_adapter else value
            adapter.params[name] = _rounded(moved, dtype)
        derived = adapter.derived()
    ids, labels, mask = make_batch(spec.batch, config.vocab_size, rng)
    view = model.view()
    # the reference forward and backward (gradcheck's hand path): the vectors do not move when the engine
    # computes the same numbers another way (its blocked attention rounds differently in the last bit)
    logits = gpt.forward(view.params, view.config, *view.check_inputs(ids, mask), view.sites)[0]
    loss, grads = model_loss_fn(view, ids, labels, mask)[1]()
    weight_names = [*base.params, *(n for n in view.params if n not in base.params and n not in _stand_ins(model))]
    weights = {n: np.asarray(view.params[n]).astype(dtype) for n in weight_names}
    trainable = sorted(view.trainable)
    for name in trainable:  # every gradient must say something: a zero one checks nothing
        if not np.linalg.norm(grads[name]) > 0:
            raise AssertionError(f"{spec.name}: the gradient of {name} is zero; the case would check nothing")
    case = Case(
        name=f"{spec.name}-{dtype}",
        method=spec.label,
        variant=spec.variant,
        description=spec.description,
        dtype=dtype,
        model_config={k: getattr(config, k) for k in MODEL_CONFIG_FIELDS},
        method_config=None if method_config is None else model.active.config.to_dict(),
        trainable=trainable,
        weights=weights,
        input_ids=ids.astype(np.int64),
        labels=labels.astype(np.int64),
        attention_mask=None if mask is None else mask.astype(np.int64),
        logits=np.asarray(logits, dtype=np.float64),
        loss=float(loss),
        grads={n: np.asarray(grads[n], dtype=np.float64) for n in trainable},
        derived=derived,
    )
    case.tolerances = tolerances(case)
    return case


def _stand_ins(model: Any) -> set[str]:
    """Adapter tensors that stand in for a base parameter (trained bias copies, LN tuning's copies): in the
    vectors they appear under the base parameter's name, as the forward uses them."""
    return set(model.active.overrides.values()) if hasattr(model, "active") else set()


def export_vectors(
    folder: str | os.PathLike, patterns: Sequence[str] = ("*",), dtypes: Sequence[str] = DTYPES
) -> list[str]:
    """Compute and write every case whose name (`lora-rank1-float32`) matches a glob in `patterns`, one
    folder each, the training trajectories that start from them (trajectory.py), and index.json listing
    both. Returns the case names."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r}: golden vectors come in {list(DTYPES)}")
    names, written = [], []
    for spec in SPECS:
        for dtype in dtypes:
            name = f"{spec.name}-{dtype}"
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                case = compute_case(spec, dtype)
                write_case(os.path.join(os.fspath(folder), name), case)
                names.append(name)
                written.append(case)
    if not names:
        known = [f"{s.name}-{d}" for s in SPECS for d in DTYPES]
        raise ConfigError(f"no case matches {list(patterns)}; the cases are named like {known[:3]} ...")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "generated_by": f"tinypeft {__version__} export-vectors",
        "cases": names,
        "tolerance_notes": TOLERANCE_NOTES,
        "trajectories": export_trajectories(folder, written),  # those whose case is among the cases written
        "merges": export_merges(folder, written),
        "generations": export_generations(folder, written),
        "round_trips": export_round_trips(written),
    }
    save_json(os.path.join(os.fspath(folder), INDEX_NAME), index)
    return names
