"""The PyTorch port in examples/port_torch, written from docs/ alone, passes freshly exported golden vectors
at their tolerances; it imports neither tinypeft nor transformers nor peft; and breaking any one of its
formulas makes the cases that formula serves fail. Run with -rP to see the port's measured errors."""

from __future__ import annotations

import ast
import json
from collections import Counter, defaultdict

import pytest
from port_mutations import MUTATIONS, PORT, broken_port

from tinypeft.cli import main
from tinypeft.vectors import DTYPES, SPECS, TRAJECTORY_SPECS, check_vectors, load_impl

ALLOWED_IMPORTS = {"__future__", "json", "math", "os", "re", "collections.abc", "typing", "numpy", "torch"}


def test_the_port_passes_every_case_at_the_stated_tolerances(vectors, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(["check-vectors", str(vectors), "--impl", str(PORT), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    cases = json.loads(report.read_text())["cases"]
    # every case, every training trajectory, every merge (the port has run_trajectory and merge_case)
    kinds = Counter(c["kind"] for c in cases)
    assert kinds["cases"] == len(SPECS) * len(DTYPES) and kinds["trajectories"] == len(TRAJECTORY_SPECS) * len(DTYPES)
    assert kinds["merges"] > 0 and all(c["passed"] for c in cases)
    assert all(t["passed"] is True for c in cases for t in c["tensors"]), "every derived tensor is checked too"
    worst: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for case in cases:
        if case["kind"] != "cases":  # the other kinds' errors: their own tests and VECTORS.md
            continue
        for t in case["tensors"]:
            kind = t["tensor"] if t["tensor"] in ("loss", "logits") else "derived" if " " in t["tensor"] else "grads"
            cell = worst[(case["method"], case["dtype"])]
            cell[kind] = max(cell.get(kind, 0.0), t["error"])
    print(f"{'method':20s}{'dtype':9s}{'loss':>10s}{'logits':>10s}{'grads':>10s}{'derived':>10s}")
    for (method, dtype), cell in sorted(worst.items()):
        row = "".join(f"{cell[k]:10.1e}" if k in cell else f"{'':10s}" for k in ("loss", "logits", "grads", "derived"))
        print(f"{method:20s}{dtype:9s}{row}")


def test_the_port_imports_no_tinypeft_transformers_or_peft():
    """Only the standard library, NumPy and PyTorch: what it knows of tinypeft comes from docs/."""
    imported = set()
    for node in ast.walk(ast.parse(PORT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


# ------------------------------------------------------------------ break one formula, see the vectors fail
@pytest.mark.parametrize("name", MUTATIONS)
def test_breaking_one_formula_fails_the_cases_it_serves(name, cases, vectors, tmp_path):
    mutation = MUTATIONS[name]
    broken = tmp_path / "broken_port.py"
    broken.write_text(broken_port(name))
    # float64 only, to keep the suite quick: its tolerance is the one that tells a wrong formula from rounding
    # (tests/vectors/test_vectors_page.py runs each on the float32 cases too, for VECTORS.md's table)
    expected_to_fail = [c.name for c in cases if mutation.breaks(c) and c.dtype == "float64"]
    assert expected_to_fail, "the mutation must break some case"
    reports = check_vectors(vectors, load_impl(str(broken)), expected_to_fail)
    survivors = [r.name for r in reports if r.passed]
    assert not survivors, f"{name}: these cases still pass: {survivors}"
