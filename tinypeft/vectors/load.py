"""Loading golden vectors, validated: anything missing, malformed or inconsistent in a case's files is a
CheckpointError that names the file and what is wrong (the loader is among the fuzzed targets,
tests/files/test_fuzz.py), and a glob that matches no case a ConfigError.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import checks
from ..errors import CheckpointError, ConfigError, TinyPeftError
from ..io import load_json, load_safetensors
from ..methods import PeftConfig
from ..model import GPTConfig, layer_of, parameter_shapes
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
    Array,
    Case,
    _short,
)


def load_vectors(folder: str | os.PathLike, patterns: Sequence[str] = ("*",)) -> list[Case]:
    """Every case listed in folder/index.json whose name matches a glob in `patterns`, loaded and validated."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder; expected golden vectors written by `tinypeft export-vectors`")
    path = os.path.join(folder, INDEX_NAME)
    index = load_json(path)
    _check_header(index, path)
    names = index.get("cases")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"{path}: 'cases' must be a non-empty list of case names; got {_short(names)}")
    for n in names:
        if n in (".", "..") or "/" in n or "\\" in n or "\0" in n:
            raise CheckpointError(f"{path}: case name {n!r} is not a plain folder name")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: 'cases' lists a case twice")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"no case of {folder} matches {list(patterns)}; its cases are {names[:4]} ...")
    cases = [load_case(os.path.join(folder, n)) for n in chosen]
    for n, case in zip(chosen, cases, strict=True):
        if case.name != n:
            raise CheckpointError(f"{os.path.join(folder, n, CASE_NAME)} is named {case.name!r}, not {n!r}")
    return cases


def load_case(folder: str | os.PathLike) -> Case:
    """One case folder, validated: anything missing, malformed or inconsistent is a CheckpointError that
    names the file and what is wrong."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CASE_NAME)
    doc = load_json(path)
    _check_header(doc, path)
    strings, model_config, config, method_config, trainable = _case_fields(doc, path)
    dtype = strings["dtype"]
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    weights = load_safetensors(weights_path)
    _check_weights(weights, config, dtype, weights_path)
    missing = [n for n in trainable if n not in weights]
    if missing:
        raise CheckpointError(f"{path}: trainable tensor {missing[0]!r} is not in {WEIGHTS_NAME}")

    input_ids, labels, attention_mask = _inputs(doc.get("inputs"), config, path)
    expected = doc.get("expected")
    if not isinstance(expected, dict):
        raise CheckpointError(f"{path}: 'expected' must be an object; got {_short(expected)}")
    loss = expected.get("loss")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not (math.isfinite(loss) and loss != 0):
        raise CheckpointError(f"{path}: expected 'loss' must be a finite non-zero number; got {_short(loss)}")

    expected_path = os.path.join(folder, EXPECTED_NAME)
    tensors = load_safetensors(expected_path)
    logits, grads, derived = _expected_tensors(tensors, expected, trainable, weights, input_ids, config, expected_path)
    tolerance = _tolerances(doc.get("tolerance"), grads, derived, path)
    return Case(
        name=strings["name"],
        method=strings["method"],
        variant=strings["variant"],
        description=strings["description"],
        dtype=dtype,
        model_config=model_config,
        method_config=method_config,
        trainable=trainable,
        weights=weights,
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        logits=logits,
        loss=float(loss),
        grads=grads,
        derived=derived,
        tolerances=tolerance,
    )


def _case_fields(doc: dict[str, Any], path: str) -> tuple[dict[str, str], dict, GPTConfig, dict | None, list[str]]:
    """case.json's names and description, model and method configs and trainable tensors, validated."""
    strings = {k: doc.get(k) for k in ("name", "method", "variant", "description", "dtype")}
    for key, value in strings.items():
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: {key!r} must be a string; got {_short(value)}")
    if strings["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: dtype {strings['dtype']!r}; golden vectors come in {list(DTYPES)}")
    model_config = _model_config(doc.get("model_config"), path)
    config = _gpt_config(model_config, strings["dtype"], path)
    method_config = doc.get("method_config")
    if method_config is not None:
        if not isinstance(method_config, dict):
            raise CheckpointError(f"{path}: 'method_config' must be an object or null; got {_short(method_config)}")
        PeftConfig.from_dict(method_config)  # a config tinypeft cannot read is refused here, with its reason
    trainable = doc.get("trainable")
    if not isinstance(trainable, list) or not trainable or not all(isinstance(n, str) for n in trainable):
        raise CheckpointError(f"{path}: 'trainable' must be a non-empty list of tensor names; got {_short(trainable)}")
    if len(set(trainable)) != len(trainable):
        raise CheckpointError(f"{path}: 'trainable' names a tensor twice")
    return strings, model_config, config, method_config, trainable


def _check_header(doc: Any, path: str) -> None:
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} must hold a JSON object; got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: 'format' is {_short(doc.get('format'))}; expected {FORMAT!r}")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise CheckpointError(f"{path}: version {_short(version)}; this tinypeft reads version {VERSION}")


def _model_config(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != set(MODEL_CONFIG_FIELDS):
        raise CheckpointError(
            f"{path}: 'model_config' must be an object with exactly the keys {list(MODEL_CONFIG_FIELDS)}; "
            f"got {_short(value)}"
        )
    return {k: value[k] for k in MODEL_CONFIG_FIELDS}


def _gpt_config(model_config: Mapping[str, Any], dtype: str, path: str) -> GPTConfig:
    try:
        return GPTConfig(**model_config, dtype=dtype)
    except ConfigError as e:
        raise CheckpointError(f"{path}: 'model_config' describes an impossible model: {e}") from None


def _check_weights(weights: Mapping[str, Array], config: GPTConfig, dtype: str, path: str) -> None:
    """Every base parameter with its exact shape, every tensor of the case's dtype and finite."""
    blocks = {layer_of(n) for n in weights} - {None}
    if max(blocks, default=-1) + 1 != config.n_layer:  # cheap, and bounds the table built next
        raise CheckpointError(
            f"{path} holds {max(blocks, default=-1) + 1} blocks; model_config has n_layer={config.n_layer}"
        )
    for name, shape in parameter_shapes(config).items():
        if name not in weights:
            raise CheckpointError(f"{path} lacks the base parameter {name!r}")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name!r} has shape {tuple(weights[name].shape)}; model_config needs {shape}"
            )
    for name, value in weights.items():
        if value.dtype != np.dtype(dtype):
            raise CheckpointError(f"{path}: {name!r} is {value.dtype}; this is a {dtype} case")
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: {name!r} holds non-finite values")


def _int_matrix(value: Any, what: str, path: str) -> Array:
    """A rectangular (B, T) list of JSON integers as an int64 array."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise CheckpointError(f"{path}: {what} must be a non-empty list of rows; got {_short(value)}")
    width = len(value[0])
    for row in value:
        if len(row) != width or not all(isinstance(v, int) and not isinstance(v, bool) for v in row):
            raise CheckpointError(f"{path}: {what} must be rows of equal length holding integers; got {_short(row)}")
        if any(not -(2**62) < v < 2**62 for v in row):
            raise CheckpointError(f"{path}: {what} holds an integer out of range: {_short(row)}")
    return np.array(value, dtype=np.int64)


def _inputs(value: Any, config: GPTConfig, path: str) -> tuple[Array, Array, Array | None]:
    if not isinstance(value, dict) or set(value) != {"input_ids", "labels", "attention_mask"}:
        raise CheckpointError(
            f"{path}: 'inputs' must be an object with input_ids, labels and attention_mask; got {_short(value)}"
        )
    ids = _int_matrix(value["input_ids"], "input_ids", path)
    labels = _int_matrix(value["labels"], "labels", path)
    mask = None if value["attention_mask"] is None else _int_matrix(value["attention_mask"], "attention_mask", path)
    try:
        checks.check_token_ids(ids, config.vocab_size)
        checks.check_labels(labels, ids.shape, config.vocab_size, leading_positions=None)
        checks.check_attention_mask(mask, ids.shape)
    except TinyPeftError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if ids.shape[1] > config.n_positions:
        raise CheckpointError(f"{path}: {ids.shape[1]} tokens do not fit n_positions={config.n_positions}")
    return ids, labels, mask


def _expected_tensors(
    tensors: Mapping[str, Array],
    expected: Mapping[str, Any],
    trainable: Sequence[str],
    weights: Mapping[str, Array],
    input_ids: Array,
    config: GPTConfig,
    path: str,
) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """logits, grads (one per trainable tensor, its shape) and derived tensors, all float64 and finite."""
    derived_names = expected.get("derived")
    if not isinstance(derived_names, list) or not all(isinstance(n, str) for n in derived_names):
        raise CheckpointError(f"{path}: expected 'derived' must be a list of names; got {_short(derived_names)}")
    if expected.get("grads") != sorted(trainable):
        raise CheckpointError(f"{path}: expected 'grads' must list the trainable tensors, sorted")
    wanted = {"logits", *(GRAD_PREFIX + n for n in trainable), *(DERIVED_PREFIX + n for n in derived_names)}
    if set(tensors) != wanted:
        extra, lacking = sorted(set(tensors) - wanted), sorted(wanted - set(tensors))
        raise CheckpointError(
            f"{path} does not hold the expected tensors: missing {lacking[:3]}, unexpected {extra[:3]}"
        )
    for name, value in tensors.items():
        if value.dtype != np.float64:
            raise CheckpointError(f"{path}: {name!r} is {value.dtype}; expected values are float64")
        if not np.isfinite(value).all() or not np.linalg.norm(value) > 0:
            raise CheckpointError(f"{path}: {name!r} must be finite and not all zero")
    logits = tensors["logits"]
    B, T = input_ids.shape
    shape = expected.get("logits_shape")
    if (
        logits.ndim != 3
        or shape != list(logits.shape)
        or logits.shape[0] != B
        or logits.shape[2] != config.vocab_size
        or not T <= logits.shape[1] <= config.n_positions
    ):
        raise CheckpointError(
            f"{path}: logits have shape {tuple(logits.shape)} (logits_shape {_short(shape)}); "
            f"expected ({B}, T', {config.vocab_size}) with {T} <= T' <= n_positions={config.n_positions}"
        )
    grads = {n: tensors[GRAD_PREFIX + n] for n in trainable}
    for name, g in grads.items():
        if g.shape != weights[name].shape:
            raise CheckpointError(
                f"{path}: the gradient of {name!r} has shape {g.shape}; the weight has {weights[name].shape}"
            )
    derived = {n: tensors[DERIVED_PREFIX + n] for n in derived_names}
    return logits, grads, derived


def _tolerances(value: Any, grads: Mapping[str, Array], derived: Mapping[str, Array], path: str) -> dict[str, Any]:
    def positive(x: Any, what: str) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and 0 < x < 1):
            raise CheckpointError(f"{path}: the tolerance of {what} must be a number in (0, 1); got {_short(x)}")
        return float(x)

    if not isinstance(value, dict) or set(value) != {"loss", "logits", "grads", "derived"}:
        raise CheckpointError(f"{path}: 'tolerance' must hold loss, logits, grads and derived; got {_short(value)}")
    result: dict[str, Any] = {
        "loss": positive(value["loss"], "the loss"),
        "logits": positive(value["logits"], "logits"),
    }
    for key, names in (("grads", grads), ("derived", derived)):
        table = value[key]
        if not isinstance(table, dict) or set(table) != set(names):
            raise CheckpointError(f"{path}: tolerance {key!r} must have one entry per tensor, {sorted(names)[:3]} ...")
        result[key] = {n: positive(table[n], n) for n in names}
    return result
