"""The golden vectors' files: the names and constants VECTORS.md documents, a case in memory (`Case`),
and how one is written (`write_case`). The loader that validates them is in load.py.

The files are deterministic: the same case writes the same bytes (JSON with sorted keys and Python's
shortest round-trip floats; safetensors with one metadata key, since the library writes a map of
several in an order that changes from run to run).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..backend import Array
from ..errors import CheckpointError
from ..io import load_json, save_json, save_safetensors

FORMAT = "tinypeft-golden-vectors"
VERSION = 1
INDEX_NAME = "index.json"
CASE_NAME = "case.json"
WEIGHTS_NAME = "weights.safetensors"
EXPECTED_NAME = "expected.safetensors"
DTYPES = ("float64", "float32")
GRAD_PREFIX = "grad/"  # expected.safetensors: "logits", "grad/<name>", "derived/<name>"
DERIVED_PREFIX = "derived/"
MODEL_CONFIG_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon")


@dataclass
class Case:
    """A golden case: what a port is given (`port_input()`) and what it must reproduce."""

    name: str
    method: str
    variant: str
    description: str
    dtype: str
    model_config: dict[str, Any]
    method_config: dict[str, Any] | None
    trainable: list[str]
    weights: dict[str, Array]
    input_ids: Array
    labels: Array
    attention_mask: Array | None
    logits: Array
    loss: float
    grads: dict[str, Array]
    derived: dict[str, Array] = field(default_factory=dict)
    tolerances: dict[str, Any] = field(default_factory=dict)

    def port_input(self) -> dict[str, Any]:
        """What `run_case` gets: everything but the expected values (copies, so a port cannot edit the case)."""
        return {
            "name": self.name,
            "method": self.method,
            "dtype": self.dtype,
            "model_config": dict(self.model_config),
            "method_config": None if self.method_config is None else dict(self.method_config),
            "trainable": list(self.trainable),
            "weights": {k: v.copy() for k, v in self.weights.items()},
            "input_ids": self.input_ids.copy(),
            "labels": self.labels.copy(),
            "attention_mask": None if self.attention_mask is None else self.attention_mask.copy(),
        }


def _case_json(case: Case) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": case.name,
        "method": case.method,
        "variant": case.variant,
        "description": case.description,
        "dtype": case.dtype,
        "model_config": case.model_config,
        "method_config": case.method_config,
        "trainable": case.trainable,
        "inputs": {
            "input_ids": case.input_ids.tolist(),
            "labels": case.labels.tolist(),
            "attention_mask": None if case.attention_mask is None else case.attention_mask.tolist(),
        },
        "expected": {
            "loss": case.loss,
            "logits_shape": list(case.logits.shape),
            "grads": sorted(case.grads),
            "derived": sorted(case.derived),
        },
        "tolerance": case.tolerances,
    }


def write_case(folder: str | os.PathLike, case: Case) -> None:
    """case.json, weights.safetensors (the case's dtype) and expected.safetensors (float64), each atomically."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, WEIGHTS_NAME), case.weights)
    expected = {"logits": case.logits}
    expected |= {GRAD_PREFIX + n: g for n, g in case.grads.items()}
    expected |= {DERIVED_PREFIX + n: d for n, d in case.derived.items()}
    save_safetensors(os.path.join(folder, EXPECTED_NAME), expected)
    save_json(os.path.join(folder, CASE_NAME), _case_json(case))


def _short(value: Any) -> str:
    """A value for an error message, cut short: a damaged file may hold a huge one."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def listed(folder: str, key: str) -> list[str]:
    """The folder names index.json lists under `key` (none if it has no such key), validated."""
    names = load_json(os.path.join(folder, INDEX_NAME)).get(key, [])
    plain = isinstance(names, list) and all(isinstance(n, str) and n and "/" not in n and "\\" not in n for n in names)
    if not plain or any(n in (".", "..") for n in names):
        raise CheckpointError(f"{folder}/index.json: {key!r} must be a list of folder names; got {_short(names)}")
    return names


Vector = TypeVar("Vector")


def load_listed(
    folder: str | os.PathLike,
    key: str,
    cases: Sequence[Case],
    patterns: Sequence[str],
    load_one: Callable[[str, Mapping[str, Case]], Vector | None],
) -> list[Vector]:
    """Every folder index.json lists under `key` whose name matches a glob, loaded by `load_one` (which returns
    None when the folder's case is not among `cases`): what each kind's loader (trajectories, merges,
    generations) does alike."""
    folder = os.fspath(folder)
    by_name = {c.name: c for c in cases}
    loaded = (load_one(os.path.join(folder, n), by_name) for n in listed(folder, key) if _matches(n, patterns))
    return [v for v in loaded if v is not None]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def read_document(path: str, kind: str) -> dict[str, Any]:
    """The JSON document of one vector of a kind, checked to be this format and version."""
    doc = load_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a version {VERSION} {FORMAT} {kind}")
    return doc
