"""Adapter round trips (issue 17): a port writes a case's adapter files, tinypeft reads them back onto the case's
base and computes the case's logits. tinypeft's own files pass, the torch port's pass through check-vectors, each
one-line break of the port's file writing fails the round trips it serves, and a folder tinypeft cannot read is
reported, not raised."""

from __future__ import annotations

import re

import pytest
from port_mutations import PORT, ROUND_TRIP_MUTATIONS, broken_port

from tinypeft.cli import main
from tinypeft.vectors import check_round_trips, load_entry_points, load_round_trips, save_adapter
from tinypeft.vectors.roundtrip import CASES


@pytest.fixture(scope="module")
def round_trips(vectors, cases):
    return load_round_trips(vectors, cases)


def test_every_listed_case_makes_the_trip_and_tinypeft_s_own_files_pass(round_trips):
    assert sorted(t.case.name for t in round_trips) == sorted(f"{c}-{d}" for c in CASES for d in ("float64", "float32"))
    for report in check_round_trips(round_trips, save_adapter):
        assert report.passed, (report.name, report.failure, [c for c in report.checks if not c.passed])
        logits = next(c for c in report.checks if c.tensor == "logits")
        assert logits.error <= (0 if report.dtype == "float64" else logits.tolerance / 10), (report.name, logits)


def test_the_port_passes_every_round_trip(round_trips, vectors, capsys):
    for report in check_round_trips(round_trips, load_entry_points(str(PORT))["save_adapter"]):
        assert report.passed, (report.name, report.failure, [c for c in report.checks if not c.passed])
    assert main(["check-vectors", str(vectors), "--impl", str(PORT), "--cases", "vera-odd-*"]) == 0
    assert re.search(r"\nadapter round trips +2 +2  ", capsys.readouterr().out)


def test_a_folder_tinypeft_cannot_read_fails_its_round_trip(round_trips):
    report = check_round_trips(round_trips[:1], lambda case, folder: None)[0]
    assert not report.passed and report.failure.startswith("tinypeft could not read the folder save_adapter wrote")


@pytest.mark.parametrize("name", ROUND_TRIP_MUTATIONS)
def test_breaking_the_files_fails_the_round_trips_they_serve(name, round_trips, tmp_path):
    mutation = ROUND_TRIP_MUTATIONS[name]
    broken = tmp_path / "broken_port.py"
    broken.write_text(broken_port(name))
    mine = [t for t in round_trips if mutation.breaks(t)]
    assert mine, "the mutation must break some round trip"
    survivors = [r.name for r in check_round_trips(mine, load_entry_points(str(broken))["save_adapter"]) if r.passed]
    assert not survivors, f"{name}: these round trips still pass: {survivors}"
