"""Merge vectors (issue 17): the base weights after merging and after unmerging every case whose method merges.
tinypeft passes its own, the torch port passes them through check-vectors, a port without merge_case is told
they were not run, each one-line break of the port's merge or unmerge fails the merges it serves, and the loader
refuses a damaged merge."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from port_mutations import MERGE_MUTATIONS, PORT, broken_port

from tinypeft.cli import main
from tinypeft.errors import CheckpointError
from tinypeft.vectors import check_merges, load_entry_points, load_merges, merge_case, unmerge_case

# one case of each method that merges: LoRA, DoRA, PiSSA, IA3, and the methods the port reads off its sites
FEW = ("lora-padded-*", "dora-rslora-*", "pissa-dora-*", "ia3-odd-*", "vera-odd-*", "oft-odd-*", "boft-butterfly-*")
FEW += ("lora-wte-*", "trainable_tokens-odd-*")  # the token table: its merge is the table the lookup reads


@pytest.fixture(scope="module")
def merges(vectors, cases):
    return load_merges(vectors, cases)


def test_every_case_whose_method_merges_has_a_merge_that_changes_the_base(merges, cases):
    methods = {m.case.method_config["peft_type"] for m in merges}
    assert methods == {"LORA", "IA3", "VERA", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT", "TRAINABLE_TOKENS"}
    assert {m.case.name for m in merges} == {c.name for c in cases if c.method_config and c.method_config[
        "peft_type"] in methods}  # fmt: skip
    for m in merges:  # the merged tensors differ from the base they replace, well beyond any tolerance
        for name, value in m.merged.items():
            base = m.case.weights[name].astype(np.float64)
            assert np.linalg.norm(value - base) > 1e-3 * np.linalg.norm(base), (m.name, name)


def test_tinypeft_passes_its_own_merges(merges):
    mine = [m for m in merges if m.case.name.rsplit("-", 1)[0] in {p[:-2] for p in FEW}]
    for report in check_merges(mine, merge_case, unmerge_case):
        assert report.passed, (report.name, report.failure)
        for check in report.checks:  # float64 exactly; unmerging restores the very arrays
            assert check.error <= (1e-14 if report.dtype == "float64" else check.tolerance / 10), (report.name, check)
            if check.tensor.startswith("unmerged "):
                assert check.error == 0, (report.name, check)


def test_the_port_passes_the_merges(merges, vectors, tmp_path, capsys):
    """One case of each way the port merges, directly; check-vectors runs a port's merges and counts them per kind
    (test_port_torch.py runs the port on every merge)."""
    entry = load_entry_points(str(PORT))
    mine = [m for m in merges if m.case.name.rsplit("-", 1)[0] in {p[:-2] for p in FEW}]
    assert len(mine) == 2 * len(FEW)
    for report in check_merges(mine, entry["merge_case"], entry["unmerge_case"]):
        assert report.passed, (report.name, report.failure, [c for c in report.checks if not c.passed])
        assert any(c.tensor.startswith("unmerged ") for c in report.checks)
    report = tmp_path / "report.json"
    assert (
        main(["check-vectors", str(vectors), "--impl", str(PORT), "--cases", "ia3-odd-*", "--report", str(report)]) == 0
    )
    out = capsys.readouterr().out
    assert "ia3-odd-merge-float32" in out and re.search(r"\nmerges +2 +2  ", out), out
    merged = [c for c in json.loads(report.read_text())["cases"] if c["kind"] == "merges"]
    assert len(merged) == 2 and all(c["passed"] for c in merged)


def test_a_port_without_merge_case_is_told_and_passes(vectors, tmp_path, capsys):
    impl = tmp_path / "cases_only.py"
    impl.write_text("from tinypeft.vectors import run_case\n")
    assert main(["check-vectors", str(vectors), "--impl", str(impl), "--cases", "ia3-odd-*"]) == 0
    out = capsys.readouterr().out
    assert f"2 merges not run: {impl} has no merge_case (VECTORS.md)" in out


def test_a_port_that_merges_another_tensor_too_fails(merges):
    m = next(m for m in merges if m.name == "lora-odd-merge-float64")
    got = merge_case(m.port_input())
    got["transformer.wte.weight"] = got["transformer.wte.weight"] * 1.001
    del got["transformer.ln_f.bias"]
    report = check_merges([m], lambda _: got, None)[0]
    assert {c.tensor: c.note for c in report.checks if not c.passed} == {
        "transformer.wte.weight": "",
        "transformer.ln_f.bias": "base parameter missing",
    }


@pytest.mark.parametrize("name", MERGE_MUTATIONS)
def test_breaking_a_merge_fails_the_merges_it_serves(name, merges, tmp_path):
    mutation = MERGE_MUTATIONS[name]
    broken = tmp_path / "broken_port.py"
    broken.write_text(broken_port(name))
    entry = load_entry_points(str(broken))
    mine = [m for m in merges if mutation.breaks(m) and m.case.dtype == "float64"]
    assert mine, "the mutation must break some merge"
    survivors = [r.name for r in check_merges(mine, entry["merge_case"], entry["unmerge_case"]) if r.passed]
    assert not survivors, f"{name}: these merges still pass: {survivors}"


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda d: d["expected"]["merged"].pop(), "expected 'merged' must list the tensors"),
        (lambda d: d["tolerance"].update(merged=2), "'tolerance' must hold merged and unmerged"),
    ],
)  # fmt: skip
def test_the_loader_refuses_a_damaged_merge(vectors, cases, tmp_path, damage, fragment):
    name = "dora-odd-merge-float64"
    copy = tmp_path / "v"
    copy.mkdir()
    shutil.copytree(Path(vectors) / name, copy / name)
    (copy / "index.json").write_text(json.dumps({"merges": [name]}))
    doc = json.loads((copy / name / "merge.json").read_text())
    damage(doc)
    (copy / name / "merge.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=fragment):
        load_merges(copy, cases)


def test_each_kind_has_its_own_index_key_and_a_folder_without_them_still_checks(vectors, tmp_path, capsys):
    """A folder written before the kinds existed (index.json with cases only) checks its cases; a key a reader
    does not know is ignored."""
    index = json.loads((vectors / "index.json").read_text())
    assert {"trajectories", "merges", "generations", "round_trips"} <= set(index)
    name = "ia3-odd-float64"
    old = tmp_path / "old"
    shutil.copytree(vectors / name, old / name)
    kept = {k: index[k] for k in ("format", "version", "generated_by", "tolerance_notes")}
    (old / "index.json").write_text(json.dumps({**kept, "cases": [name], "a_later_kind": ["x"]}))
    assert main(["check-vectors", str(old), "--impl", str(PORT)]) == 0
    out = capsys.readouterr().out
    assert "1 cases: 1 passed, 0 failed" in out and "merge" not in out
