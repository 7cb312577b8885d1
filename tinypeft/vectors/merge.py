"""Merge vectors: for every case whose method merges (its own tensors folded into the base weights), the base
weights after `merge_adapter()` and after `unmerge_adapter()`. A port opts in with `merge_case(input)` and
`unmerge_case(input)` beside its `run_case`; VECTORS.md describes the files and what to compute.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..errors import CheckpointError
from ..io import load_safetensors, save_json, save_safetensors
from ..model import GPTConfig, parameter_shapes
from .checker import CaseReport, TensorCheck, _raised, build_model, check_array
from .format import FORMAT, VERSION, Array, Case, _short, load_listed, read_document

MERGE_NAME = "merge.json"
MERGED_NAME = "merged.safetensors"
# merged: W + dW (or diag(l) W, W R) is one product and one sum: a float64 port lands within a few roundings,
# 1e-10 leaves room for another order of summation only. float32: the unit roundoff 6e-8 times the few operations
# of a merge, OFT's solve and BOFT's products of block-diagonal factors the most (VECTORS.md gives the measured
# figures); 1e-5 leaves room for larger blocks, and a wrong formula lands at 1e-3 and beyond. unmerged: a port that
# undoes the update (subtracts dW, divides by DoRA's k or IA3's l, as PEFT does) rounds W + dW first, so its error
# is the unit roundoff times |W + dW| / |W|; restoring the arrays (tinypeft) is exact. PEFT's own IA3 unmerge
# divides by l + 1e-8 and lands ~1e-8 off: outside the float64 tolerance, on purpose (the vectors hold the base).
TOLERANCES = {"float64": {"merged": 1e-10, "unmerged": 1e-10}, "float32": {"merged": 1e-5, "unmerged": 1e-5}}
UNMERGED_PREFIX = "unmerged "


@dataclass
class MergeVector:
    """A case's merge: the base tensors the merge changes (float64), and the tolerances."""

    name: str
    case: Case
    merged: dict[str, Array]
    tolerances: dict[str, float] = field(default_factory=dict)

    def port_input(self) -> dict[str, Any]:
        """What `merge_case` and `unmerge_case` get: the case's input, named after the merge."""
        return {**self.case.port_input(), "name": self.name, "case": self.case.name}

    def base_names(self) -> list[str]:
        return list(parameter_shapes(GPTConfig(**self.case.model_config)))

    def expected(self, unmerged: bool) -> dict[str, Array]:
        """Every base parameter as it must come back: the merged tensors, the case's weights elsewhere."""
        after = {} if unmerged else self.merged
        return {n: after[n] if n in after else self.case.weights[n].astype(np.float64) for n in self.base_names()}


def base_state(model: Any) -> dict[str, Array]:
    base = model.base_model if hasattr(model, "base_model") else model
    return {n: to_numpy(base.params[n]).copy() for n in parameter_shapes(base.config)}


def merge_case(case: Mapping[str, Any]) -> dict[str, Array]:
    """tinypeft itself behind the interface a port implements: every base parameter after merge_adapter()."""
    model, _ = build_model(case)
    model.merge_adapter()
    return base_state(model)


def unmerge_case(case: Mapping[str, Any]) -> dict[str, Array]:
    """Every base parameter after merge_adapter() then unmerge_adapter()."""
    model, _ = build_model(case)
    model.merge_adapter()
    model.unmerge_adapter()
    return base_state(model)


def merges(case: Case) -> bool:
    """Whether the case's method folds tensors of its own into the base (not a base-only case, not prompt or
    prefix tuning or the adapters, which have no merge, not the selective methods, whose trained tensors
    are base tensors already)."""
    model, _ = build_model(case.port_input(), device="cpu")
    if not hasattr(model, "active") or not model.active.can_merge():
        return False
    return set(model.active.params) != set(model.active.overrides.values())


# ------------------------------------------------------------------ writing and reading
def compute_merge(case: Case) -> MergeVector:
    """The expected values: the merge in float64, from exactly the case's (dtype-rounded) weights."""
    exact = {**case.port_input(), "dtype": "float64"}
    exact["weights"] = {k: v.astype(np.float64) for k, v in exact["weights"].items()}
    model, _ = build_model(exact, device="cpu")
    model.merge_adapter()
    after = base_state(model)
    changed = {n: v for n, v in after.items() if not np.array_equal(v, exact["weights"][n])}
    if not changed:
        raise AssertionError(f"{case.name}: merging changes no base tensor; the merge would check nothing")
    name = f"{case.name.removesuffix('-' + case.dtype)}-merge-{case.dtype}"
    return MergeVector(name, case, changed, dict(TOLERANCES[case.dtype]))


def write_merge(folder: str | os.PathLike, m: MergeVector) -> None:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, MERGED_NAME), m.merged)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "merge",
        "name": m.name,
        "case": m.case.name,
        "expected": {"merged": sorted(m.merged)},
        "tolerance": m.tolerances,
    }
    save_json(os.path.join(folder, MERGE_NAME), doc)


def export_merges(folder: str | os.PathLike, cases: Sequence[Case]) -> list[str]:
    """The merge of every case among `cases` whose method merges, written next to them; their folder names."""
    names = []
    for case in cases:
        if merges(case):
            m = compute_merge(case)
            write_merge(os.path.join(os.fspath(folder), m.name), m)
            names.append(m.name)
    return names


def load_merges(
    folder: str | os.PathLike, cases: Sequence[Case], patterns: Sequence[str] = ("*",)
) -> list[MergeVector]:
    """The merges index.json lists whose name matches a glob and whose case is among `cases`, validated."""
    return load_listed(folder, "merges", cases, patterns, load_merge)


def load_merge(folder: str, cases: Mapping[str, Case]) -> MergeVector | None:
    path = os.path.join(folder, MERGE_NAME)
    doc = read_document(path, "merge")
    case = cases.get(doc.get("case"))
    if case is None:
        return None  # its case was not selected
    merged = load_safetensors(os.path.join(folder, MERGED_NAME))
    base = set(parameter_shapes(GPTConfig(**case.model_config)))
    expected = doc.get("expected")
    if not isinstance(expected, dict) or expected.get("merged") != sorted(merged) or not merged:
        raise CheckpointError(f"{path}: expected 'merged' must list the tensors of {MERGED_NAME}, sorted")
    for name, value in merged.items():
        if name not in base:
            raise CheckpointError(f"{folder}: merged tensor {name!r} is not a base parameter")
        if value.dtype != np.float64 or value.shape != case.weights[name].shape or not np.isfinite(value).all():
            raise CheckpointError(f"{folder}: merged tensor {name!r} must be float64, finite, of its weight's shape")
    tolerance = doc.get("tolerance")
    if (
        not isinstance(tolerance, dict)
        or set(tolerance) != {"merged", "unmerged"}
        or not all(_positive(v) for v in tolerance.values())
    ):
        raise CheckpointError(f"{path}: 'tolerance' must hold merged and unmerged, numbers in (0, 1)")
    return MergeVector(doc["name"], case, merged, tolerance)


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 < x < 1


# ------------------------------------------------------------------ checking
def compare_state(report: CaseReport, want: Mapping[str, Array], got: Any, tolerance: float, prefix: str) -> None:
    """Every base parameter of `want` against what a port returned; a missing or foreign name fails."""
    if not isinstance(got, Mapping):
        report.failure = f"expected a dict of base parameter name -> array; got {_short(got)}"
        return
    for name, value in want.items():
        if name in got:
            report.checks.append(check_array(prefix + name, got[name], value, tolerance, report.dtype))
        else:
            report.checks.append(TensorCheck(prefix + name, math.inf, tolerance, False, "base parameter missing"))
    for name in sorted(set(got) - set(want), key=repr):
        report.checks.append(TensorCheck(prefix + str(name), math.inf, 0.0, False, "not a base parameter"))


def check_merges(
    vectors: Sequence[MergeVector],
    merge: Callable[[dict[str, Any]], Any],
    unmerge: Callable[[dict[str, Any]], Any] | None,
) -> list[CaseReport]:
    """Run a port's merge_case (and unmerge_case, if it has one) on every merge; what it raises fails that merge."""
    reports = []
    for m in vectors:
        report = CaseReport(m.name, m.case.method, m.case.dtype)
        for entry, unmerged in ((merge, False), (unmerge, True)):
            if entry is None or report.failure:
                continue
            what = "unmerge_case" if unmerged else "merge_case"
            try:
                with np.errstate(all="ignore"):
                    got = entry(m.port_input())
                    tolerance = m.tolerances["unmerged" if unmerged else "merged"]
                    compare_state(report, m.expected(unmerged), got, tolerance, UNMERGED_PREFIX if unmerged else "")
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                report.failure = f"{what} {_raised(e)}"
            if report.failure and not report.failure.startswith(what):
                report.failure = f"{what}: {report.failure}"
        reports.append(report)
    return reports
