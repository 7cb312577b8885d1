"""The figures of VECTORS.md, measured: how big the export is, how close tinypeft and the torch port come to
every case in each dtype, and by how much each one-line break of the port (port_mutations.py) misses, in
float64 and in float32. `measure` runs it all on a folder of exported vectors; measured.json keeps the result;
`render` writes the page's marked blocks from it; tests/vectors/test_vectors_page.py checks that the page is
what measured.json renders and that a fresh measurement agrees with measured.json, so no figure can drift.

    PYTHONPATH=.:tests python tests/vectors/vectors_page.py     # measure again, rewrite measured.json and the pages

(It also writes docs/walkthrough.md's table of the modules each config touches, from walkthrough_table.py.)

A fresh measurement agrees when its integers are equal and its floats within a factor AGREEMENT, or both below
FLOAT64_NOISE (float64 rounding, which another BLAS or CPU changes freely); float32 rounding errors also change
a little from one CPU's kernels to another's, which the factor allows.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from port_mutations import (
    GENERATION_MUTATIONS,
    MERGE_MUTATIONS,
    MUTATIONS,
    PORT,
    ROUND_TRIP_MUTATIONS,
    TRAJECTORY_MUTATIONS,
    Mutation,
    broken_port,
)
from walkthrough_table import render as targets

from tinypeft.vectors import (
    FLOAT32_TOLERANCES,
    FLOAT64_TOLERANCE,
    TRAJECTORY_SPECS,
    Case,
    CaseReport,
    Trajectory,
    check_generations,
    check_merges,
    check_round_trips,
    check_trajectories,
    compare,
    error_vs_expected,
    export_vectors,
    generate_case,
    load_entry_points,
    load_generations,
    load_impl,
    load_merges,
    load_port,
    load_round_trips,
    load_trajectories,
    load_vectors,
    merge_case,
    run_case,
    run_trajectory,
    save_adapter,
    unmerge_case,
)
from tinypeft.vectors.generation import SPECS as GENERATION_SPECS
from tinypeft.vectors.merge import TOLERANCES as MERGE_TOLERANCES

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "VECTORS.md"
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
MEASURED = Path(__file__).resolve().parent / "measured.json"
AGREEMENT = 1.25
FLOAT64_NOISE = 1e-13
KINDS = ("loss", "logits", "grads", "layernorm", "derived")
LAYERNORM_WEIGHTS = ("ln_1.weight", "ln_2.weight", "ln_f.weight")


# ------------------------------------------------------------------ measuring
def kind_of(tensor: str) -> str:
    if tensor in ("loss", "logits"):
        return tensor
    if tensor.startswith("derived "):
        return "derived"
    return "layernorm" if tensor.endswith(LAYERNORM_WEIGHTS) else "grads"


def worst(report: CaseReport) -> dict[str, float]:
    """The largest error of each kind of tensor in one case."""
    out: dict[str, float] = {}
    for check in report.checks:
        if check.passed is not None:
            kind = kind_of(check.tensor)
            out[kind] = max(out.get(kind, 0.0), check.error)
    return out


def over_tolerance(report: CaseReport) -> float:
    """How far the case's furthest tensor is past its tolerance (error / tolerance; 1 is the limit)."""
    return max(c.error / c.tolerance for c in report.checks if c.passed is not None)


def run(impl: Callable, case: Case) -> CaseReport:
    try:
        return compare(case, impl(case.port_input()))
    except Exception as e:  # a broken port may raise (a shape that no longer fits): the case fails
        return CaseReport(case.name, case.method, case.dtype, failure=f"{type(e).__name__}: {e}")


def errors_of(impl: Callable, cases: list[Case]) -> dict[str, Any]:
    """dtype -> method label -> kind -> the largest error over the label's cases; every case must pass."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for case in cases:
        report = run(impl, case)
        assert report.passed, (case.name, report.failure, [c for c in report.checks if not c.passed])
        cell = table[case.dtype][case.method]
        for kind, error in worst(report).items():
            cell[kind] = max(cell.get(kind, 0.0), error)
    return {dtype: dict(by_label) for dtype, by_label in table.items()}


def mutation_effects(cases: list[Case], folder: Path) -> dict[str, Any]:
    """For each break of the port, per dtype: the cases it is meant to break, how many of them fail, the least
    of their largest errors, and the range of their logits' errors."""
    out = {}
    for name, mutation in MUTATIONS.items():
        path = folder / f"broken_{len(out)}.py"
        path.write_text(broken_port(name))
        impl = load_impl(str(path))
        per_dtype = {}
        for dtype in ("float64", "float32"):
            reports = [run(impl, c) for c in cases if c.dtype == dtype and mutation.breaks(c)]
            computed = [r for r in reports if not r.failure]  # the others raised: the break shows at once
            logits = [worst(r)["logits"] for r in computed]
            per_dtype[dtype] = {
                "cases": len(reports),
                "failed": sum(not r.passed for r in reports),
                "raised": len(reports) - len(computed),
                "least": min((max(worst(r).values()) for r in computed), default=None),
                "least_over_tolerance": min((over_tolerance(r) for r in computed), default=None),
                "logits": [min(logits), max(logits)] if logits else None,
            }
        out[name] = per_dtype
    return out


def trajectory_errors(run: Callable, trajectories: list[Trajectory]) -> dict[str, Any]:
    """trajectory name (less its dtype) -> dtype -> {"losses", "params"}: the largest errors; all must pass."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for t, report in zip(trajectories, check_trajectories(trajectories, run), strict=True):
        assert report.passed, (t.name, report.failure, [c for c in report.checks if not c.passed])
        params = max(c.error for c in report.checks if c.tensor != "losses")
        losses = next(c.error for c in report.checks if c.tensor == "losses")
        table[t.name.removesuffix(f"-{t.case.dtype}")][t.case.dtype] = {"losses": losses, "params": params}
    return dict(table)


def trajectory_breaks(trajectories: list[Trajectory], folder: Path) -> dict[str, Any]:
    """For each break of the port's training step, per dtype: its trajectories, how many fail, the least of
    their largest errors."""
    out = {}
    for i, (name, mutation) in enumerate(TRAJECTORY_MUTATIONS.items()):
        path = folder / f"broken_step_{i}.py"
        path.write_text(broken_port(name))
        run = load_port(str(path))[1]
        per_dtype = {}
        for dtype in ("float64", "float32"):
            mine = [t for t in trajectories if t.case.dtype == dtype and mutation.breaks(t)]
            reports = check_trajectories(mine, run)
            largest = [max(c.error for c in r.checks) for r in reports if not r.failure]
            per_dtype[dtype] = {
                "cases": len(reports),
                "failed": sum(not r.passed for r in reports),
                "least": min(largest, default=None),
            }
        out[name] = per_dtype
    return out


# ------------------------------------------------------------------ the kinds a port opts into
Check = Callable[[list[Any], Mapping[str, Callable[..., Any]]], list[CaseReport]]
CHECK_MERGES: Check = lambda vectors, entry: check_merges(vectors, entry["merge_case"], entry["unmerge_case"])  # noqa: E731
CHECK_GENERATIONS: Check = lambda vectors, entry: check_generations(vectors, entry["generate_case"])  # noqa: E731
CHECK_ROUND_TRIPS: Check = lambda vectors, entry: check_round_trips(vectors, entry["save_adapter"])  # noqa: E731
TINYPEFT = {"merge_case": merge_case, "unmerge_case": unmerge_case, "generate_case": generate_case,
            "save_adapter": save_adapter}  # fmt: skip


def passed(reports: list[CaseReport]) -> list[CaseReport]:
    for r in reports:
        assert r.passed, (r.name, r.failure, [c for c in r.checks if not c.passed])
    return reports


def merge_errors(entry: Mapping[str, Callable[..., Any]], merges: list[Any]) -> dict[str, Any]:
    """dtype -> method label -> {"merged", "unmerged"}: the largest errors; every merge must pass."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(
        lambda: defaultdict(lambda: {"merged": 0.0, "unmerged": 0.0})
    )
    for m, report in zip(merges, passed(CHECK_MERGES(merges, entry)), strict=True):
        cell = table[m.case.dtype][m.case.method]
        for c in report.checks:
            key = "unmerged" if c.tensor.startswith("unmerged ") else "merged"
            cell[key] = max(cell[key], c.error)
    return {dtype: {label: dict(cell) for label, cell in by_label.items()} for dtype, by_label in table.items()}


def generation_errors(entry: Mapping[str, Callable[..., Any]], generations: list[Any]) -> dict[str, Any]:
    """case -> dtype -> {"uncached", "cached"}: the logits' errors (the tokens are equal: every run must pass)."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    reports = passed(CHECK_GENERATIONS(generations, entry))
    for g, pair in zip(generations, zip(reports[::2], reports[1::2], strict=True), strict=True):
        for key, report in zip(("uncached", "cached"), pair, strict=True):
            table[g.case.name.removesuffix("-" + g.case.dtype)][g.case.dtype][key] = report.checks[1].error
    return {name: dict(by_dtype) for name, by_dtype in table.items()}


def round_trip_errors(entry: Mapping[str, Callable[..., Any]], trips: list[Any]) -> dict[str, Any]:
    """case -> dtype -> the logits' error after tinypeft reads the files back; every round trip must pass."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for t, report in zip(trips, passed(CHECK_ROUND_TRIPS(trips, entry)), strict=True):
        table[t.case.name.removesuffix("-" + t.case.dtype)][t.case.dtype] = report.checks[-1].error
    return dict(table)


def kind_breaks(mutations: Mapping[str, Mutation], vectors: list[Any], check: Check, folder: Path,
                runs: Callable[[CaseReport], bool] = lambda r: True) -> dict[str, Any]:  # fmt: skip
    """For each break, per dtype: the runs it is meant to break (`runs` picks them among a vector's reports), how
    many fail, how many raise, the least of their largest errors; and how many of the other runs fail."""
    out = {}
    for i, (name, mutation) in enumerate(mutations.items()):
        path = folder / f"broken_kind_{len(name)}_{i}.py"
        path.write_text(broken_port(name))
        entry = load_entry_points(str(path))
        per_dtype = {}
        for dtype in ("float64", "float32"):
            reports = check([v for v in vectors if v.case.dtype == dtype and mutation.breaks(v)], entry)
            meant = [r for r in reports if runs(r)]
            largest = [max(c.error for c in r.checks) for r in meant if not r.failure and r.checks]
            largest = [x for x in largest if math.isfinite(x)]  # inf: failed before any number (a file's tensor)
            per_dtype[dtype] = {
                "cases": len(meant),
                "failed": sum(not r.passed for r in meant),
                "raised": sum(bool(r.failure) for r in meant),
                "least": min(largest, default=None),
                "others_failed": sum(not r.passed for r in reports if not runs(r)),
            }
        out[name] = per_dtype
    return out


def float32_svd_residuals(cases: list[Case]) -> float:
    """The largest error of PiSSA's residual computed with the SVD in float32, as PEFT computes it."""
    errors = [0.0]
    for case in cases:
        if case.dtype != "float32":
            continue
        for name, want in case.derived.items():
            if name.endswith(".pissa_residual"):
                W = case.weights[name.removesuffix(".pissa_residual") + ".weight"]  # (in, out), float32
                r = case.method_config["r"]
                U, S, Vh = np.linalg.svd(W.T, full_matrices=False)
                errors.append(error_vs_expected(W - ((U[:, :r] * S[:r]) @ Vh[:r]).T, want))
    return max(errors)


def measure(folder: str | os.PathLike) -> dict[str, Any]:
    """Every figure of the page, from the vectors exported in `folder`."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    cases = load_vectors(folder)
    trajectories = load_trajectories(folder, cases)
    merges, generations = load_merges(folder, cases), load_generations(folder, cases)
    trips = load_round_trips(folder, cases)
    port, port_trajectory = load_port(str(PORT))
    entry = load_entry_points(str(PORT))
    with tempfile.TemporaryDirectory() as scratch:
        mutations = mutation_effects(cases, Path(scratch))
        breaks = trajectory_breaks(trajectories, Path(scratch))
        merge_breaks = kind_breaks(MERGE_MUTATIONS, merges, CHECK_MERGES, Path(scratch))
        generation_breaks = kind_breaks(GENERATION_MUTATIONS, generations, CHECK_GENERATIONS, Path(scratch),
                                        lambda r: r.name.endswith(" cached"))  # fmt: skip
        round_trip_breaks = kind_breaks(ROUND_TRIP_MUTATIONS, trips, CHECK_ROUND_TRIPS, Path(scratch))
    return {
        "export": {
            "cases": len(cases) // 2,
            "folders": len(cases),
            "trajectories": len(trajectories),
            "merges": len(merges),
            "generations": len(generations),
            "round_trips": len(trips),
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "most_rows": max(c.input_ids.size for c in cases),
        },
        "float32_svd": float32_svd_residuals(cases),
        "tinypeft": errors_of(run_case, cases),
        "port": errors_of(port, cases),
        "mutations": mutations,
        "trajectories": {
            "tinypeft": trajectory_errors(run_trajectory, trajectories),
            "port": trajectory_errors(port_trajectory, trajectories),
            "breaks": breaks,
        },
        "merges": {"tinypeft": merge_errors(TINYPEFT, merges), "port": merge_errors(entry, merges),
                   "breaks": merge_breaks},
        "generations": {"tinypeft": generation_errors(TINYPEFT, generations),
                        "port": generation_errors(entry, generations), "breaks": generation_breaks},
        "round_trips": {"tinypeft": round_trip_errors(TINYPEFT, trips), "port": round_trip_errors(entry, trips),
                        "breaks": round_trip_breaks},
    }  # fmt: skip


def disagreements(kept: Any, fresh: Any, where: str = "") -> list[str]:
    """Where a fresh measurement differs from the kept one beyond what another machine explains."""
    if kept is None or fresh is None:
        return [] if kept is fresh else [f"{where}: {kept!r} kept, {fresh!r} measured"]
    if isinstance(kept, Mapping) and isinstance(fresh, Mapping):
        if set(kept) != set(fresh):
            return [f"{where}: keys {sorted(set(kept) ^ set(fresh))} in one measurement only"]
        return [d for k in kept for d in disagreements(kept[k], fresh[k], f"{where}/{k}")]
    if isinstance(kept, list) and isinstance(fresh, list) and len(kept) == len(fresh):
        pairs = enumerate(zip(kept, fresh, strict=True))
        return [d for i, (a, b) in pairs for d in disagreements(a, b, f"{where}[{i}]")]
    if isinstance(kept, int) and isinstance(fresh, int):
        return [] if kept == fresh else [f"{where}: {kept} kept, {fresh} measured"]
    if isinstance(kept, (int, float)) and isinstance(fresh, (int, float)):
        if kept == fresh or (abs(kept) < FLOAT64_NOISE and abs(fresh) < FLOAT64_NOISE):
            return []
        if kept > 0 and fresh > 0 and 1 / AGREEMENT <= fresh / kept <= AGREEMENT:
            return []
        return [f"{where}: {kept:.3g} kept, {fresh:.3g} measured"]
    return [f"{where}: {kept!r} kept, {fresh!r} measured"]


# ------------------------------------------------------------------ rendering
def e(x: float, digits: int = 2) -> str:
    """2.5e-6: a figure, to `digits` significant digits."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def ratio(x: float) -> str:
    """1.5, 83, 5.0e3: how many times a tolerance."""
    return f"{x:.1f}" if x < 10 else f"{x:.0f}" if x < 1000 else e(x)


def latex(x: float, digits: int = 2) -> str:
    """$2.5 \\times 10^{-6}$, or $10^{-5}$ for a power of ten."""
    mantissa, _, exponent = e(x, digits).partition("e")
    return f"$10^{{{exponent}}}$" if float(mantissa) == 1 else f"${mantissa} \\times 10^{{{exponent}}}$"


def largest(m: Mapping[str, Any], impls: tuple[str, ...], dtype: str, kinds: tuple[str, ...]) -> float:
    return max(
        (v for impl in impls for cell in m[impl].get(dtype, {}).values() for k, v in cell.items() if k in kinds),
        default=0.0,
    )


def render_counts(m: Mapping[str, Any]) -> str:
    x = m["export"]
    return (
        f"{x['cases']} cases, each in float64 and in float32 ({x['folders']} case folders), and {x['trajectories']} "
        f"[training trajectories](#training-trajectories) from {x['trajectories'] // 2} of them, {x['merges']} "
        f"[merges](#merges), {x['generations']} [generations](#generation-with-and-without-the-kv-cache) and "
        f"{x['round_trips']} [adapter round trips](#adapter-round-trips): {x['files']} files, "
        f"{x['bytes']:,} bytes in files, about {x['bytes'] / 1e6:.1f} MB (a disk-usage tool that counts the "
        "folders' own blocks too says more)."
    )


def render_tolerances(m: Mapping[str, Any]) -> str:
    both = ("tinypeft", "port")
    forward, grads = largest(m, both, "float32", ("loss", "logits")), largest(m, both, "float32", ("grads",))
    layernorm = largest(m, both, "float32", ("layernorm",))
    svd = largest(m, both, "float32", ("derived",))
    ratios = [
        FLOAT32_TOLERANCES["loss"] / forward,
        FLOAT32_TOLERANCES["gradient"] / grads,
        FLOAT32_TOLERANCES["layernorm_weight"] / layernorm,
    ]
    least64 = min(v["float64"]["least"] for v in m["mutations"].values() if v["float64"]["least"] is not None)
    rows = [
        "| dtype | tensor | tolerance | why |",
        "|---|---|---|---|",
        f"| float64 | everything | {latex(FLOAT64_TOLERANCE, 1)} | the torch port, another order of summation, lands "
        f"within {latex(largest(m, ('port',), 'float64', KINDS), 1)} of tinypeft; a wrong formula lands far beyond "
        f"{latex(FLOAT64_TOLERANCE, 1)}: the least of the breaks below by {latex(least64)} |",
        f"| float32 | loss, logits | {latex(FLOAT32_TOLERANCES['loss'], 1)} | measured $\\le$ {latex(forward)} "
        "(tinypeft and the torch port): float32's unit roundoff $6 \\times 10^{-8}$ through two blocks |",
        f"| float32 | gradients | {latex(FLOAT32_TOLERANCES['gradient'], 1)} | measured $\\le$ {latex(grads)}: the "
        "backward is twice as deep, and subtracts softmax and LayerNorm terms |",
        f"| float32 | LayerNorm weight gradients (`ln_1`, `ln_2`, `ln_f` `.weight`) | "
        f"{latex(FLOAT32_TOLERANCES['layernorm_weight'], 1)} | a sum over all $B \\cdot T$ rows of "
        "$\\bar y \\odot \\hat x$ whose terms cancel: the most fragile tensor in float32 (llm.c #228), and its error "
        f"grows with $B \\cdot T$; here (at most {m['export']['most_rows']} rows) measured $\\le$ {latex(layernorm)} |",
        f"| float32 | derived (PiSSA's residual) | {latex(FLOAT32_TOLERANCES['derived'], 1)} | with the SVD in float64 "
        f"(tinypeft, the torch port) it lands at {latex(svd)}; with the SVD in float32, as PEFT computes it, at "
        f"{latex(m['float32_svd'])} |",
    ]
    mutations = m["mutations"]
    missed = [name for name, v in mutations.items() if v["float32"]["failed"] < v["float32"]["cases"]]
    computed = [name for name, v in mutations.items() if v["float32"]["least_over_tolerance"] is not None]
    closest = min(computed, key=lambda name: mutations[name]["float32"]["least_over_tolerance"])
    float32_note = (
        "Every break fails its float32 cases as well, but some only just: the closest, "
        f'"{closest}", by {ratio(mutations[closest]["float32"]["least_over_tolerance"])} times a tolerance. '
        if not missed
        else f"These breaks pass some of their float32 cases: {', '.join(missed)}. "
    )
    intro = (
        f"The float32 tolerances of the loss, logits and gradients are {min(ratios):.0f} to {max(ratios):.0f} "
        "times what tinypeft and the torch port reach here. Each one-line break of the torch port in "
        f"`tests/vectors/port_mutations.py` ({len(mutations)} of them) fails every float64 case it is meant to "
        "break, by at least the error given (the least, over those cases, of the case's largest tensor error; "
        "a break may raise instead, when a shape no longer fits). "
        f"{float32_note}The float64 cases are the ones that tell a wrong formula from rounding with room to spare."
    )
    return "\n".join(rows) + "\n\n" + intro + "\n\n" + render_mutations(m)


def render_mutations(m: Mapping[str, Any]) -> str:
    def failed(effect: Mapping[str, Any]) -> str:
        raised = f" ({effect['raised']} raise)" if effect["raised"] else ""
        return f"{effect['failed']} of {effect['cases']}{raised}"

    def least(effect: Mapping[str, Any], key: str) -> str:
        if effect["raised"] == effect["cases"]:
            return "raises"
        return e(effect[key]) if key == "least" else ratio(effect[key])

    def spread(effect: Mapping[str, Any]) -> str:
        if effect["raised"] == effect["cases"]:
            return "none"
        low, high = (e(x) for x in effect["logits"])
        return low if low == high else f"{low} to {high}"

    rows = [
        "| break | float64: cases failed | least error | float32: cases failed | least error / tolerance "
        "| logits error |",
        "|---|---|---|---|---|---|",
    ]
    for name, effects in m["mutations"].items():
        f64, f32 = effects["float64"], effects["float32"]
        rows.append(
            f"| {name} | {failed(f64)} | {least(f64, 'least')} | {failed(f32)} | "
            f"{least(f32, 'least_over_tolerance')} | {spread(f32)} |"
        )
    return "\n".join(rows)


def render_errors(m: Mapping[str, Any]) -> str:
    def cell(impl: str, dtype: str, label: str) -> str:
        errors = m[impl][dtype][label]
        grads = max(errors.get("grads", 0.0), errors.get("layernorm", 0.0))
        return f"{e(errors['loss'], 1)} / {e(errors['logits'], 1)} / {e(grads, 1)}"

    labels = list(m["port"]["float64"])
    rows = [
        f"Largest errors per method label and kind (tinypeft itself in float64: "
        f"{e(largest(m, ('tinypeft',), 'float64', KINDS), 1)}; grads include the LayerNorm weights'):",
        "",
        "| method | port float64: loss / logits / grads | port float32: loss / logits / grads | "
        "tinypeft float32: loss / logits / grads |",
        "|---|---|---|---|",
    ]
    for label in labels:
        rows.append(
            f"| {label} | {cell('port', 'float64', label)} | {cell('port', 'float32', label)} | "
            f"{cell('tinypeft', 'float32', label)} |"
        )
    return "\n".join(rows)


def render_trajectories(m: Mapping[str, Any]) -> str:
    t = m["trajectories"]
    specs = {s.name: s for s in TRAJECTORY_SPECS}

    def cell(impl: str, name: str, dtype: str) -> str:
        errors = t[impl][name][dtype]
        return f"{e(errors['losses'], 1)} / {e(errors['params'], 1)}"

    rows = [
        "| trajectory | what it covers | port float64: losses / tensors | port float32 | tinypeft float32 |",
        "|---|---|---|---|---|",
    ]
    for name in t["port"]:
        rows.append(
            f"| `{name}` | {specs[name].description} | {cell('port', name, 'float64')} | "
            f"{cell('port', name, 'float32')} | {cell('tinypeft', name, 'float32')} |"
        )
    rows += [
        "",
        "Each one-line break of the torch port's training step (`TRAJECTORY_MUTATIONS` in "
        "`tests/vectors/port_mutations.py`) fails every float64 trajectory it is meant to break; the least of "
        "their largest errors, and what it does to the float32 ones:",
        "",
        "| break | float64: trajectories failed | least error | float32: trajectories failed | least error |",
        "|---|---|---|---|---|",
    ]
    for name, b in t["breaks"].items():
        f64, f32 = b["float64"], b["float32"]
        rows.append(
            f"| {name} | {f64['failed']} of {f64['cases']} | {e(f64['least'])} | {f32['failed']} of {f32['cases']} "
            f"| {e(f32['least'])} |"
        )
    return "\n".join(rows)


def render_breaks(breaks: Mapping[str, Any], noun: str, others: str = "") -> str:
    """The table of a kind's breaks: per dtype, how many of the runs each is meant to break fail, and the least of
    their largest errors ("raises" when every one raised, empty when it is meant to break none of that dtype)."""

    def cells(b: Mapping[str, Any]) -> str:
        raised = f" ({b['raised']} raise)" if b["raised"] else ""
        least = (
            "" if not b["cases"] else "raises" if b["raised"] == b["cases"]
            else "inf" if b["least"] is None else e(b["least"])
        )  # fmt: skip
        extra = f" | {b['others_failed']}" if others else ""
        return f"{b['failed']} of {b['cases']}{raised}{extra} | {least}"

    other = f" | {others}" if others else ""
    rows = [
        f"| break | float64: {noun} failed{other} | least error | float32: {noun} failed{other} | least error |",
        "|---|---|---|---|---|" + ("---|---|" if others else ""),
    ]
    rows += [f"| {name} | {cells(b['float64'])} | {cells(b['float32'])} |" for name, b in breaks.items()]
    return "\n".join(rows)


def render_merges(m: Mapping[str, Any]) -> str:
    k = m["merges"]

    def cell(impl: str, dtype: str, label: str) -> str:
        errors = k[impl][dtype][label]
        return f"{e(errors['merged'], 1)} / {e(errors['unmerged'], 1)}"

    port32 = max(v for cell in k["port"]["float32"].values() for v in cell.values())
    rows = [
        f"{m['export']['merges']} merges ({m['export']['merges'] // 2} cases, each dtype). Largest errors per method "
        f"label, merged / unmerged (float32's tolerance {latex(MERGE_TOLERANCES['float32']['merged'], 1)} is "
        f"{ratio(MERGE_TOLERANCES['float32']['merged'] / port32)} times the port's largest):",
        "",
        "| method | port float64: merged / unmerged | port float32 | tinypeft float32 |",
        "|---|---|---|---|",
    ]
    rows += [f"| {label} | {cell('port', 'float64', label)} | {cell('port', 'float32', label)} | "
             f"{cell('tinypeft', 'float32', label)} |" for label in k["port"]["float64"]]  # fmt: skip
    rows += [
        "",
        "Each one-line break of the torch port's merge or unmerge (`MERGE_MUTATIONS` in "
        "`tests/vectors/port_mutations.py`) fails every float64 merge it is meant to break:",
        "",
        render_breaks(k["breaks"], "merges"),
    ]
    return "\n".join(rows)


def render_generations(m: Mapping[str, Any]) -> str:
    k = m["generations"]
    specs = {s.case: s for s in GENERATION_SPECS}

    def cell(impl: str, name: str, dtype: str) -> str:
        errors = k[impl][name][dtype]
        return f"{e(errors['uncached'], 1)} / {e(errors['cached'], 1)}"

    rows = [
        f"{m['export']['generations']} generations, each run without and with the cache; the tokens are equal in "
        "every run, and the logits' largest errors are, uncached / cached:",
        "",
        "| generation | what it covers | port float64 | port float32 | tinypeft float32 |",
        "|---|---|---|---|---|",
    ]
    rows += [f"| `{name}` | {specs[name].description} | {cell('port', name, 'float64')} | "
             f"{cell('port', name, 'float32')} | {cell('tinypeft', name, 'float32')} |"
             for name in k["port"]]  # fmt: skip
    rows += [
        "",
        "Each one-line break of the torch port's KV cache (`GENERATION_MUTATIONS`) fails the cached runs it is meant "
        "to break and none of the uncached ones (a break may raise, when a position falls off the table):",
        "",
        render_breaks(k["breaks"], "cached runs", "uncached runs failed"),
    ]
    return "\n".join(rows)


def render_round_trips(m: Mapping[str, Any]) -> str:
    k = m["round_trips"]
    rows = [
        f"{m['export']['round_trips']} round trips. The logits tinypeft computes from the port's files (in the case's "
        "dtype, so the float32 column is tinypeft's own rounding), against the case's:",
        "",
        "| case | port's files, float64 | port's files, float32 | tinypeft's files, float32 |",
        "|---|---|---|---|",
    ]
    rows += [f"| `{name}` | {e(k['port'][name]['float64'], 1)} | {e(k['port'][name]['float32'], 1)} | "
             f"{e(k['tinypeft'][name]['float32'], 1)} |" for name in k["port"]]  # fmt: skip
    rows += [
        "",
        "Each one-line break of the torch port's file writing (`ROUND_TRIP_MUTATIONS`) fails the round trips it is "
        "meant to break (a misnamed, misshaped or mistyped tensor fails before any logits, with an error of inf):",
        "",
        render_breaks(k["breaks"], "round trips"),
    ]
    return "\n".join(rows)


RENDERERS = {
    "counts": render_counts,
    "tolerances": render_tolerances,
    "errors": render_errors,
    "trajectories": render_trajectories,
    "merges": render_merges,
    "generations": render_generations,
    "round_trips": render_round_trips,
}


def rewrite(page: str, texts: Mapping[str, str]) -> str:
    """The page with each named block's text replaced."""
    for name, text in texts.items():
        page = re.sub(
            rf"(<!-- measured:{name} -->\n).*?(\n<!-- /measured:{name} -->)",
            lambda match, text=text: match.group(1) + text + match.group(2),
            page,
            flags=re.S,
        )
    return page


def texts(m: Mapping[str, Any]) -> dict[Path, dict[str, str]]:
    """Every generated block of every page: VECTORS.md's from the measurement, the walkthrough's table."""
    return {PAGE: {name: render(m) for name, render in RENDERERS.items()}, WALKTHROUGH: {"targets": targets()}}


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        export_vectors(folder)
        measured = measure(folder)
    MEASURED.write_text(json.dumps(measured, indent=1, allow_nan=False) + "\n")  # None where nothing was computed
    for page, blocks_of_page in texts(measured).items():
        page.write_text(rewrite(page.read_text(), blocks_of_page))
    print(f"wrote {MEASURED.relative_to(ROOT)}, and the generated blocks of VECTORS.md and docs/walkthrough.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
