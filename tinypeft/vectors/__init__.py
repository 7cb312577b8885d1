"""Golden vectors: small cases of every method, with tinypeft's logits, loss and gradients, for ports.

`export_vectors(folder)` (the command `tinypeft export-vectors DIR`) writes, for the base model and
every method, a few small cases (an odd-sized config, rank 1, a padded batch, virtual tokens that fill
the position table), each in float64 and in float32: the configs, the weights, the inputs, and the
expected logits, loss and gradient of every trainable tensor, with the tolerance a correct port must
meet. `check_vectors(folder, run_case)` (the command `tinypeft check-vectors DIR --impl MODULE`) runs an
implementation on every case and reports each tensor's error against its tolerance. VECTORS.md at the
repository root describes the files precisely enough to write a checker in any language.

The package, by concern:
- specs.py: the cases, read from the method registry (each method's `golden_cases`), and their batches;
- compute.py: computing a case in float64, and `export_vectors`;
- tolerances.py: how close a port must come, per tensor;
- format.py: the files (names, `Case`, `write_case`); load.py: reading them back, validated;
- checker.py: `compare`, `check_vectors`, `load_impl`, and `run_case` (tinypeft itself as a port);
- trajectory.py: training trajectories, ten optimizer steps from a case (`run_trajectory`, a kind a port opts into);
- merge.py: the base weights after merging and unmerging a case's adapter (`merge_case`, `unmerge_case`);
- generation.py: greedy generation with and without the KV cache (`generate_case`);
- roundtrip.py: a port's adapter files read back by tinypeft (`save_adapter`);
- kinds.py: every kind, and `check_all`, what `tinypeft check-vectors` runs.
The same command writes the same bytes.
"""

from .checker import (
    CaseReport,
    RunCase,
    TensorCheck,
    check_vectors,
    compare,
    error_vs_expected,
    load_entry_points,
    load_impl,
    load_port,
    run_case,
)
from .compute import PERTURBATION, compute_case, export_vectors
from .format import (
    CASE_NAME,
    DERIVED_PREFIX,
    DTYPES,
    EXPECTED_NAME,
    FORMAT,
    GRAD_PREFIX,
    INDEX_NAME,
    MODEL_CONFIG_FIELDS,
    VERSION,
    WEIGHTS_NAME,
    Case,
    write_case,
)
from .generation import GenerationVector, check_generations, generate_case, load_generations
from .kinds import KINDS, Kind, KindResult, check_all
from .load import load_case, load_vectors
from .merge import MergeVector, check_merges, load_merges, merge_case, unmerge_case
from .roundtrip import RoundTrip, check_round_trips, load_round_trips, save_adapter
from .specs import SPECS, Batch, make_batch
from .tolerances import FLOAT32_TOLERANCES, FLOAT64_TOLERANCE, TOLERANCE_NOTES, tolerance_for, tolerances
from .trajectory import SPECS as TRAJECTORY_SPECS
from .trajectory import (
    Trajectory,
    TrajectorySpec,
    check_trajectories,
    compare_trajectory,
    load_trajectories,
    run_trajectory,
)

__all__ = [
    "CASE_NAME",
    "DERIVED_PREFIX",
    "DTYPES",
    "EXPECTED_NAME",
    "FLOAT32_TOLERANCES",
    "FLOAT64_TOLERANCE",
    "FORMAT",
    "GRAD_PREFIX",
    "INDEX_NAME",
    "KINDS",
    "MODEL_CONFIG_FIELDS",
    "PERTURBATION",
    "SPECS",
    "TOLERANCE_NOTES",
    "TRAJECTORY_SPECS",
    "VERSION",
    "WEIGHTS_NAME",
    "Batch",
    "Case",
    "CaseReport",
    "GenerationVector",
    "Kind",
    "KindResult",
    "MergeVector",
    "RoundTrip",
    "RunCase",
    "TensorCheck",
    "Trajectory",
    "TrajectorySpec",
    "check_all",
    "check_generations",
    "check_merges",
    "check_round_trips",
    "check_trajectories",
    "check_vectors",
    "compare",
    "compare_trajectory",
    "compute_case",
    "error_vs_expected",
    "export_vectors",
    "generate_case",
    "load_case",
    "load_entry_points",
    "load_generations",
    "load_impl",
    "load_merges",
    "load_port",
    "load_round_trips",
    "load_trajectories",
    "load_vectors",
    "make_batch",
    "merge_case",
    "run_case",
    "run_trajectory",
    "save_adapter",
    "tolerance_for",
    "tolerances",
    "unmerge_case",
    "write_case",
]
