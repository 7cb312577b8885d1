"""Generation vectors: greedy generation from the first tokens of a case, with and without the KV cache. The
tokens generated and the logits each step picked from are what a port must reproduce, both ways; with the cache,
a step reads one token and the keys and values so far, virtual tokens and prefixes included (where ports of
prefix tuning break). A port opts in with `generate_case(input, use_cache)`; VECTORS.md describes the files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import engine, gpt
from ..backend import to_numpy
from ..errors import CheckpointError
from ..generation import forward_cached
from ..io import load_safetensors, save_json, save_safetensors
from .checker import CaseReport, TensorCheck, _raised, build, check_array
from .format import FORMAT, VERSION, Array, Case, _short, load_listed, read_document

GENERATION_NAME = "generation.json"
LOGITS_NAME = "step_logits.safetensors"
# each step's logits are one forward of the model, as a case's are: the cases' logits tolerances
TOLERANCES = {"float64": 1e-10, "float32": 1e-5}
# the top two logits of every step are at least this far apart, so that float32 rounding (~1e-6 here) cannot
# change which token greedy picks
MARGIN = 1e-3


@dataclass(frozen=True)
class GenerationSpec:
    """Greedy generation of `new_tokens` tokens after the first `prompt_length` tokens of each row of a golden case."""

    case: str
    prompt_length: int = 3
    new_tokens: int = 5
    description: str = ""


SPECS: tuple[GenerationSpec, ...] = (
    GenerationSpec("full-odd", description="the base model: the cache holds the prompt's keys and values"),
    GenerationSpec("lora-odd", description="LoRA on every linear layer: the cached steps go through it too"),
    GenerationSpec("prompt_tuning-random", description="virtual tokens: in the cache after the first step only"),
    GenerationSpec(
        "prefix_tuning-projection", description="the projected prefix: in the cache after the first step only"
    ),
)


@dataclass
class GenerationVector:
    name: str
    case: Case
    prompt_length: int
    new_tokens: int
    tokens: Array  # (B, prompt + new) int64
    logits: Array  # (new, B, V) float64
    tolerance: float
    description: str = ""

    def port_input(self) -> dict[str, Any]:
        return generation_input(self.name, self.case, self.prompt_length, self.new_tokens)


def generation_input(name: str, case: Case, prompt_length: int, new_tokens: int) -> dict[str, Any]:
    """What `generate_case` gets: the case's input, its input_ids cut to the prompt, no labels, no mask."""
    given = case.port_input()
    del given["labels"]
    prompt = given["input_ids"][:, :prompt_length].copy()
    return {**given, "name": name, "case": case.name, "input_ids": prompt, "attention_mask": None,
            "max_new_tokens": new_tokens}  # fmt: skip


def generate_case(g: Mapping[str, Any], use_cache: bool) -> dict[str, Array]:
    """tinypeft itself behind the interface a port implements: greedy, in the case's dtype, with tinypeft's KV
    cache (generation.forward_cached) or the full forward of everything so far at each step."""
    view, _ = build(g)
    tokens = np.asarray(g["input_ids"])
    steps, kv = [], None
    for _ in range(g["max_new_tokens"]):
        if use_cache:
            logits, kv = forward_cached(view, view.xp.asarray(tokens if kv is None else tokens[:, -1:]), kv)
        else:
            logits = engine.logits(view, view.xp.asarray(tokens))
        last = to_numpy(logits[:, -1])
        steps.append(last)
        tokens = np.concatenate([tokens, last.argmax(-1)[:, None]], axis=1)
    return {"tokens": tokens, "logits": np.stack(steps)}


# ------------------------------------------------------------------ writing and reading
def compute_generation(spec: GenerationSpec, case: Case) -> GenerationVector:
    """The expected values: the full forward at every step in float64, from exactly the case's weights."""
    name = f"{spec.case}-generate-{case.dtype}"
    exact = {**generation_input(name, case, spec.prompt_length, spec.new_tokens), "dtype": "float64"}
    exact["weights"] = {k: v.astype(np.float64) for k, v in exact["weights"].items()}
    view, _ = build(exact, device="cpu")
    tokens = exact["input_ids"]
    steps = []
    for _ in range(spec.new_tokens):
        # the reference forward, as the cases' expected logits are computed
        logits = gpt.forward(view.params, view.config, *view.check_inputs(tokens), view.sites)[0]
        last = np.asarray(logits[:, -1], dtype=np.float64)
        top = np.sort(last, axis=-1)[:, -2:]
        if not (top[:, 1] - top[:, 0] >= MARGIN).all():
            raise AssertionError(f"{name}: a near tie between the two likeliest tokens; choose another prompt")
        steps.append(last)
        tokens = np.concatenate([tokens, last.argmax(-1)[:, None]], axis=1)
    return GenerationVector(name, case, spec.prompt_length, spec.new_tokens, tokens.astype(np.int64),
                            np.stack(steps), TOLERANCES[case.dtype], spec.description)  # fmt: skip


def write_generation(folder: str | os.PathLike, g: GenerationVector) -> None:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, LOGITS_NAME), {"logits": g.logits})
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "generation",
        "name": g.name,
        "case": g.case.name,
        "description": g.description,
        "prompt_length": g.prompt_length,
        "new_tokens": g.new_tokens,
        "expected": {"tokens": g.tokens.tolist(), "logits_shape": list(g.logits.shape)},
        "tolerance": {"logits": g.tolerance},
    }
    save_json(os.path.join(folder, GENERATION_NAME), doc)


def export_generations(folder: str | os.PathLike, cases: Sequence[Case]) -> list[str]:
    """Every generation whose case is among `cases`, written next to them; returns their folder names."""
    by_name = {c.name: c for c in cases}
    names = []
    for spec in SPECS:
        for dtype in ("float64", "float32"):
            case = by_name.get(f"{spec.case}-{dtype}")
            if case is not None:
                g = compute_generation(spec, case)
                write_generation(os.path.join(os.fspath(folder), g.name), g)
                names.append(g.name)
    return names


def load_generations(
    folder: str | os.PathLike, cases: Sequence[Case], patterns: Sequence[str] = ("*",)
) -> list[GenerationVector]:
    """The generations index.json lists whose name matches a glob and whose case is among `cases`, validated."""
    return load_listed(folder, "generations", cases, patterns, load_generation)


def load_generation(folder: str, cases: Mapping[str, Case]) -> GenerationVector | None:
    path = os.path.join(folder, GENERATION_NAME)
    doc = read_document(path, "generation")
    case = cases.get(doc.get("case"))
    if case is None:
        return None
    B, T = case.input_ids.shape
    prompt, new = doc.get("prompt_length"), doc.get("new_tokens")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (prompt, new)) or not (
        0 < prompt <= T and 0 < new and prompt + new <= case.model_config["n_positions"]
    ):
        raise CheckpointError(f"{path}: 'prompt_length' and 'new_tokens' must be counts that fit the case's model")
    expected = doc.get("expected") if isinstance(doc.get("expected"), dict) else {}
    try:
        tokens = np.array(expected.get("tokens"), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        tokens = np.zeros(0)
    V = case.model_config["vocab_size"]
    if tokens.shape != (B, prompt + new) or not ((tokens >= 0) & (tokens < V)).all():
        raise CheckpointError(f"{path}: expected 'tokens' must be {B} rows of {prompt + new} token ids below {V}")
    if not (tokens[:, :prompt] == case.input_ids[:, :prompt]).all():
        raise CheckpointError(f"{path}: expected 'tokens' must start with the case's first {prompt} tokens")
    logits = load_safetensors(os.path.join(folder, LOGITS_NAME)).get("logits")
    if logits is None or logits.dtype != np.float64 or logits.shape != (new, B, V) or not np.isfinite(logits).all():
        raise CheckpointError(f"{folder}: {LOGITS_NAME} must hold 'logits', float64, finite, of shape {(new, B, V)}")
    tolerance = (doc.get("tolerance") or {}).get("logits") if isinstance(doc.get("tolerance"), dict) else None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise CheckpointError(f"{path}: 'tolerance' must hold logits, a number in (0, 1); got {_short(tolerance)}")
    return GenerationVector(doc["name"], case, prompt, new, tokens, logits, float(tolerance),
                            str(doc.get("description", "")))  # fmt: skip


# ------------------------------------------------------------------ checking
def check_tokens(got: Any, want: Array) -> TensorCheck:
    """The generated ids, exactly: the error is the fraction of ids that differ."""
    try:
        got_ids = np.asarray(got)
    except Exception as e:
        return TensorCheck("tokens", math.inf, 0.0, False, f"not an array: {_raised(e)}")
    if got_ids.shape != want.shape or got_ids.dtype.kind not in "iu":
        return TensorCheck(
            "tokens", math.inf, 0.0, False, f"{got_ids.dtype} {got_ids.shape}; expected integers {want.shape}"
        )
    wrong = np.argwhere(got_ids != want)
    if len(wrong) == 0:
        return TensorCheck("tokens", 0.0, 0.0, True)
    row, position = wrong[0]
    note = f"row {row} differs first at position {position}: {got_ids[row, position]}, expected {want[row, position]}"
    return TensorCheck("tokens", len(wrong) / want.size, 0.0, False, note)


def compare_generation(g: GenerationVector, result: Any, use_cache: bool) -> CaseReport:
    report = CaseReport(f"{g.name} {'cached' if use_cache else 'uncached'}", g.case.method, g.case.dtype)
    if not isinstance(result, Mapping) or not {"tokens", "logits"} <= set(result):
        report.failure = f"generate_case must return a dict with tokens and logits; got {_short(result)}"
        return report
    report.checks.append(check_tokens(result["tokens"], g.tokens))
    report.checks.append(check_array("logits", result["logits"], g.logits, g.tolerance, g.case.dtype))
    return report


def check_generations(
    vectors: Sequence[GenerationVector], run: Callable[[dict[str, Any], bool], Any]
) -> list[CaseReport]:
    """Run a port's generate_case on every generation, without and with its cache; what it raises fails that run."""
    reports = []
    for g in vectors:
        for use_cache in (False, True):
            try:
                with np.errstate(all="ignore"):
                    report = compare_generation(g, run(g.port_input(), use_cache), use_cache)
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                name = f"{g.name} {'cached' if use_cache else 'uncached'}"
                report = CaseReport(name, g.case.method, g.case.dtype, failure=f"generate_case {_raised(e)}")
            reports.append(report)
    return reports
