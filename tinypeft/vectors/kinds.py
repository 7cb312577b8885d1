"""The kinds of golden vectors and how `tinypeft check-vectors` runs each: the cases (every port), and the kinds
a port opts into by defining their entry points beside `run_case` (training trajectories, merges, generations,
adapter round trips). A kind whose entry point a port lacks is counted as not run; it does not fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checker import CaseReport, TensorCheck, check_vectors, over_tolerance
from .generation import check_generations, load_generations
from .load import load_vectors
from .merge import check_merges, load_merges
from .roundtrip import check_round_trips, load_round_trips
from .trajectory import check_trajectories, load_trajectories


@dataclass(frozen=True)
class Kind:
    """A kind of vectors: its index.json key, how it is named to a reader, the entry point a port opts in with,
    how its vectors are loaded (folder, the selected cases, the globs) and checked (vectors, entry points)."""

    key: str
    noun: str
    entry_point: str
    load: Callable[[str, Sequence[Any], Sequence[str]], list[Any]]
    check: Callable[[list[Any], Mapping[str, Callable[..., Any]]], list[CaseReport]]


KINDS: tuple[Kind, ...] = (
    Kind("trajectories", "training trajectories", "run_trajectory",
         lambda folder, cases, patterns: load_trajectories(folder, cases),
         lambda vectors, entry: check_trajectories(vectors, entry["run_trajectory"])),
    Kind("merges", "merges", "merge_case", load_merges,
         lambda vectors, entry: check_merges(vectors, entry["merge_case"], entry.get("unmerge_case"))),
    Kind("generations", "generations", "generate_case", load_generations,
         lambda vectors, entry: check_generations(vectors, entry["generate_case"])),
    Kind("round_trips", "adapter round trips", "save_adapter", load_round_trips,
         lambda vectors, entry: check_round_trips(vectors, entry["save_adapter"])),
)  # fmt: skip


@dataclass
class KindResult:
    """What check-vectors found for one kind: the reports of what it ran, and how many it could not run."""

    key: str
    noun: str
    reports: list[CaseReport] = field(default_factory=list)
    not_run: int = 0
    missing_entry_point: str = ""

    def worst(self) -> tuple[str, TensorCheck] | None:
        """The (vector name, tensor check) furthest over, or closest to, its tolerance over every report."""
        found = [(r.name, w) for r in self.reports if (w := r.worst()) is not None]
        return max(found, key=lambda nw: over_tolerance(nw[1]), default=None)


def check_all(
    folder: str | os.PathLike, entry_points: Mapping[str, Callable[..., Any]], patterns: Sequence[str] = ("*",)
) -> list[KindResult]:
    """Every kind of vectors in `folder` whose case matches a glob, run through the entry points the port has."""
    folder = os.fspath(folder)
    results = [KindResult("cases", "cases", check_vectors(folder, entry_points["run_case"], patterns))]
    cases = load_vectors(folder, patterns)
    for kind in KINDS:
        vectors = kind.load(folder, cases, ("*",))
        result = KindResult(kind.key, kind.noun)
        if kind.entry_point in entry_points:
            result.reports = kind.check(vectors, entry_points)
        else:
            result.not_run, result.missing_entry_point = len(vectors), kind.entry_point
        results.append(result)
    return results
