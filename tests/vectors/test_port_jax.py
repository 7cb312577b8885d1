"""The JAX port in examples/port_jax, a second port written from docs/ alone, passes freshly exported golden
vectors at their tolerances, training trajectories included; it imports neither tinypeft nor transformers nor
peft nor torch; and each one-line break of the torch port, made to it, fails the cases that formula serves.
Run with -rP to see the port's measured errors.

Every case costs the port one XLA compilation (about 0.4 s of CPU with the flags below), so by default the suite runs
one case per method label in both dtypes (the case a trajectory starts from, where there is one: every
trajectory runs) and each break on the cheapest float64 case it breaks. TINYPEFT_ALL_PORT_CASES=1 runs every
case, every trajectory, and each break on every float64 case it breaks, as test_port_torch.py does. The merges,
generations and adapter round trips, and the breaks of the port's merge, KV cache and files, run the same way: a
few of each by default, every one with TINYPEFT_ALL_PORT_CASES=1."""

from __future__ import annotations

import os

# Each case is compiled once and run once, on tiny arrays: with LLVM's optimizations off, XLA compiles a case in
# about a fifth of the CPU time (0.3 s against 1.5 s), which keeps this file near a minute. It moves some float32
# roundings: the worst float32 gradient error goes from 6e-7 to 1.1e-5 (lora-regex's c_fc.lora_A, tolerance 1e-4);
# float64 is unchanged. Set before jax loads (only the port imports it); flags already in XLA_FLAGS come after, and
# win. `tinypeft check-vectors` runs the port with XLA's defaults.
os.environ["XLA_FLAGS"] = " ".join(
    ["--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0", os.environ.get("XLA_FLAGS", "")]
).strip()

import ast
import json
from collections import defaultdict

import pytest
from port_mutations_jax import (
    JAX_GENERATION_MUTATIONS,
    JAX_MERGE_MUTATIONS,
    JAX_MUTATIONS,
    JAX_PORT,
    JAX_ROUND_TRIP_MUTATIONS,
    JAX_TRAJECTORY_MUTATIONS,
    broken_jax_port,
)

from tinypeft.cli import main
from tinypeft.vectors import (
    DTYPES,
    SPECS,
    TRAJECTORY_SPECS,
    check_generations,
    check_merges,
    check_round_trips,
    check_trajectories,
    check_vectors,
    load_entry_points,
    load_generations,
    load_merges,
    load_port,
    load_round_trips,
)
from tinypeft.vectors import load_trajectories as load_all_trajectories

ALL_CASES = os.environ.get("TINYPEFT_ALL_PORT_CASES") == "1"
ALLOWED_IMPORTS = {
    "__future__", "json", "math", "os", "re", "collections.abc", "dataclasses", "typing",
    "numpy", "jax", "jax.numpy", "jax.scipy.linalg",
}  # fmt: skip


def representative_cases() -> list[str]:
    """One golden case per method label: the one a trajectory starts from if there is one, else the first."""
    starts = {t.case for t in TRAJECTORY_SPECS}
    chosen: dict[str, str] = {}
    for spec in SPECS:
        name = f"{spec.label}-{spec.variant}"
        if spec.label not in chosen or (name in starts and chosen[spec.label] not in starts):
            chosen[spec.label] = name
    return list(chosen.values())


SELECTED = [f"{spec.label}-{spec.variant}" for spec in SPECS] if ALL_CASES else representative_cases()


def cheapest(items: list, size) -> list:
    """All of `items` with TINYPEFT_ALL_PORT_CASES=1; else the one with the fewest trainable tensors (the
    smallest backward to compile)."""
    return items if ALL_CASES or not items else [min(items, key=size)]


def test_the_port_passes_every_selected_case_and_trajectory(vectors, tmp_path, capsys):
    report = tmp_path / "report.json"
    patterns = [f"{name}-*" for name in SELECTED]  # its dtypes and its trajectories
    code = main(["check-vectors", str(vectors), "--impl", str(JAX_PORT), "--report", str(report), "--cases", *patterns])
    out = capsys.readouterr().out
    assert code == 0, out
    everything = json.loads(report.read_text())["cases"]
    cases = [c for c in everything if c["kind"] in ("cases", "trajectories")]
    trajectories = {f"{spec.name}-{dtype}" for spec in TRAJECTORY_SPECS for dtype in DTYPES}
    assert len({c["method"] for c in cases}) == len({spec.label for spec in SPECS}), "every method label"
    assert len(cases) == len(SELECTED) * len(DTYPES) + len(trajectories) and all(c["passed"] for c in cases)
    assert {c["name"] for c in cases} >= trajectories, "every training trajectory runs"
    assert all(t["passed"] is True for c in cases for t in c["tensors"]), "every derived tensor is checked too"
    worst: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for case in cases:
        for t in case["tensors"]:
            if case["name"] in trajectories:
                kind = "trajectory"
            else:
                kind = (
                    t["tensor"] if t["tensor"] in ("loss", "logits") else "derived" if " " in t["tensor"] else "grads"
                )
            cell = worst[(case["method"], case["dtype"])]
            cell[kind] = max(cell.get(kind, 0.0), t["error"])
    kinds = ("loss", "logits", "grads", "derived", "trajectory")
    print(f"{len(cases)} cases and trajectories ({'all' if ALL_CASES else 'one case per method label'})")
    print(f"{'method':20s}{'dtype':9s}" + "".join(f"{k:>12s}" for k in kinds))
    for (method, dtype), cell in sorted(worst.items()):
        print(f"{method:20s}{dtype:9s}" + "".join(f"{cell[k]:12.1e}" if k in cell else f"{'':12s}" for k in kinds))
    check_the_other_kinds([c for c in everything if c not in cases])


def check_the_other_kinds(reports: list[dict]) -> None:
    """The merges (unmerging included), the generations (with and without the cache) and the adapter round trips
    that check-vectors ran from the selected cases all pass; their worst errors, per kind and dtype."""
    by_kind = {kind: [r for r in reports if r["kind"] == kind] for kind in ("merges", "generations", "round_trips")}
    assert {r["kind"] for r in reports} == set(by_kind) and all(by_kind.values()), "every kind runs"
    assert all(r["passed"] for r in reports), [r["name"] for r in reports if not r["passed"]]
    assert all(any(t["tensor"].startswith("unmerged ") for t in r["tensors"]) for r in by_kind["merges"])
    assert {r["name"].rsplit(" ", 1)[1] for r in by_kind["generations"]} == {"cached", "uncached"}
    print(f"\n{'kind':14s}{'dtype':9s}{'run':>5s}  worst error / tolerance (vector, tensor)")
    for kind, mine in by_kind.items():
        for dtype in DTYPES:
            checks = [
                (t["error"], t["tolerance"], r["name"], t["tensor"])
                for r in mine
                if r["dtype"] == dtype
                for t in r["tensors"]
            ]
            error, tolerance, name, tensor = max(checks)
            runs = sum(r["dtype"] == dtype for r in mine)
            print(f"{kind:14s}{dtype:9s}{runs:5d}  {error:.2e} / {tolerance:.0e} ({name}, {tensor})")


def test_the_port_imports_no_tinypeft_transformers_peft_or_torch():
    """Only the standard library, NumPy and JAX: what it knows of tinypeft comes from docs/."""
    imported = set()
    for node in ast.walk(ast.parse(JAX_PORT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


def test_the_port_has_every_break_of_the_torch_port():
    from port_mutations import (
        GENERATION_MUTATIONS,
        MERGE_MUTATIONS,
        MUTATIONS,
        ROUND_TRIP_MUTATIONS,
        TRAJECTORY_MUTATIONS,
    )

    assert list(JAX_MUTATIONS) == list(MUTATIONS) and list(JAX_TRAJECTORY_MUTATIONS) == list(TRAJECTORY_MUTATIONS)
    assert list(JAX_MERGE_MUTATIONS) == list(MERGE_MUTATIONS)
    assert list(JAX_GENERATION_MUTATIONS) == list(GENERATION_MUTATIONS)
    assert list(JAX_ROUND_TRIP_MUTATIONS) == list(ROUND_TRIP_MUTATIONS)


# ------------------------------------------------------------------ break a merge, the KV cache, the adapter files
@pytest.mark.parametrize("name", JAX_MERGE_MUTATIONS)
def test_breaking_a_merge_fails_the_merges_it_serves(name, vectors, cases, tmp_path):
    mutation = JAX_MERGE_MUTATIONS[name]
    broken = tmp_path / "broken_jax_port.py"
    broken.write_text(broken_jax_port(name))
    entry = load_entry_points(str(broken))
    mine = [m for m in load_merges(vectors, cases) if mutation.breaks(m) and m.case.dtype == "float64"]
    assert mine, "the mutation must break some merge"
    chosen = cheapest(mine, lambda m: len(m.case.weights))
    survivors = [r.name for r in check_merges(chosen, entry["merge_case"], entry["unmerge_case"]) if r.passed]
    assert not survivors, f"{name}: these merges still pass: {survivors}"


@pytest.mark.parametrize("name", JAX_GENERATION_MUTATIONS)
def test_breaking_the_cache_fails_the_cached_generations_it_serves(name, vectors, cases, tmp_path):
    mutation = JAX_GENERATION_MUTATIONS[name]
    broken = tmp_path / "broken_jax_port.py"
    broken.write_text(broken_jax_port(name))
    mine = [g for g in load_generations(vectors, cases) if mutation.breaks(g) and g.case.dtype == "float64"]
    assert mine, "the mutation must break some generation"
    chosen = cheapest(mine, lambda g: len(g.case.weights))
    reports = check_generations(chosen, load_entry_points(str(broken))["generate_case"])
    assert [r.passed for r in reports] == [True, False] * len(chosen), [(r.name, r.passed) for r in reports]


@pytest.mark.parametrize("name", JAX_ROUND_TRIP_MUTATIONS)
def test_breaking_the_files_fails_the_round_trips_they_serve(name, vectors, cases, tmp_path):
    mutation = JAX_ROUND_TRIP_MUTATIONS[name]
    broken = tmp_path / "broken_jax_port.py"
    broken.write_text(broken_jax_port(name))
    mine = [t for t in load_round_trips(vectors, cases) if mutation.breaks(t)]
    assert mine, "the mutation must break some round trip"
    chosen = cheapest(mine, lambda t: len(t.case.weights))
    survivors = [r.name for r in check_round_trips(chosen, load_entry_points(str(broken))["save_adapter"]) if r.passed]
    assert not survivors, f"{name}: these round trips still pass: {survivors}"


# ------------------------------------------------------------------ break one formula, see the vectors fail
@pytest.mark.parametrize("name", JAX_MUTATIONS)
def test_breaking_one_formula_fails_the_cases_it_serves(name, cases, vectors, tmp_path):
    mutation = JAX_MUTATIONS[name]
    broken = tmp_path / "broken_jax_port.py"
    broken.write_text(broken_jax_port(name))
    mine = [c for c in cases if mutation.breaks(c) and c.dtype == "float64"]
    assert mine, "the mutation must break some case"
    chosen = [c.name for c in cheapest(mine, lambda c: len(c.trainable))]
    reports = check_vectors(vectors, load_port(str(broken))[0], chosen)
    assert [r.name for r in reports] == chosen
    survivors = [r.name for r in reports if r.passed]
    assert not survivors, f"{name}: these cases still pass: {survivors}"


@pytest.mark.parametrize("name", JAX_TRAJECTORY_MUTATIONS)
def test_breaking_a_training_step_fails_the_trajectories_it_serves(name, cases, vectors, tmp_path):
    mutation = JAX_TRAJECTORY_MUTATIONS[name]
    broken = tmp_path / "broken_jax_port.py"
    broken.write_text(broken_jax_port(name))
    mine = [t for t in load_all_trajectories(vectors, cases) if mutation.breaks(t) and t.case.dtype == "float64"]
    assert mine, "the mutation must break some trajectory"
    chosen = cheapest(mine, lambda t: len(t.case.trainable))
    survivors = [r.name for r in check_trajectories(chosen, load_port(str(broken))[1]) if r.passed]
    assert not survivors, f"{name}: these trajectories still pass: {survivors}"


def test_a_numpy_float64_scalar_in_the_port_fails_its_float32_cases_only(vectors, tmp_path):
    """The dtype trap (model.md, notes for porters): rsLoRA's scaling as np.sqrt, a float64 scalar, turns the
    float32 computation float64 under jax_enable_x64; the values stay close, and the checker fails the case by dtype."""
    source = JAX_PORT.read_text()
    old = '(math.sqrt(cfg["r"]) if cfg["use_rslora"]'
    assert source.count(old) == 1
    broken = tmp_path / "float64_scalar_port.py"
    broken.write_text(source.replace(old, '(np.sqrt(cfg["r"]) if cfg["use_rslora"]'))
    reports = {r.name: r for r in check_vectors(vectors, load_port(str(broken))[0], ["rslora-rank1-*"])}
    assert reports["rslora-rank1-float64"].passed
    failed = [c for c in reports["rslora-rank1-float32"].checks if not c.passed]
    assert failed and all("is float64; a float32 case needs float32 arrays back" in c.note for c in failed)
    assert {c.tensor for c in failed} >= {"logits"}
