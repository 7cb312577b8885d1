"""Checking an implementation against golden vectors: `run_case` is tinypeft itself behind the interface
every port implements (VECTORS.md), `load_impl` finds a port's, `compare` measures what one returned for a
case tensor by tensor against the case's tolerances, and `check_vectors` runs it on a folder of cases.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import engine
from ..backend import to_numpy
from ..errors import CheckpointError, ConfigError, TinyPeftError
from ..methods import PeftConfig
from ..model import GPT, GPTConfig, parameter_shapes
from ..peft_model import get_peft_model
from .format import Array, Case, _short
from .load import load_vectors

RunCase = Callable[[dict[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class TensorCheck:
    """One compared tensor: its error, its tolerance, and whether it passed (None: not checked)."""

    tensor: str
    error: float
    tolerance: float
    passed: bool | None
    note: str = ""


@dataclass
class CaseReport:
    name: str
    method: str
    dtype: str
    checks: list[TensorCheck] = field(default_factory=list)
    failure: str = ""  # the implementation raised, or returned something unusable

    @property
    def passed(self) -> bool:
        return not self.failure and all(c.passed is not False for c in self.checks)

    def worst(self) -> TensorCheck | None:
        """The compared tensor furthest over, or closest to, its tolerance (a failure before any pass)."""
        compared = [c for c in self.checks if c.passed is not None]
        return max(compared, key=over_tolerance, default=None)


def over_tolerance(check: TensorCheck) -> tuple[bool, float, bool]:
    """How far a check is over its tolerance, failures first: error / tolerance (an exact check, tolerance 0,
    that passed counts as 0, and yields to a measured one on a tie)."""
    if not check.tolerance:
        return (not check.passed, 0.0 if check.error == 0 else math.inf, False)
    return (not check.passed, check.error / check.tolerance, True)


# Not gradcheck.relative_error, on purpose: that one compares two computations of equal standing, so it is
# symmetric (it divides by the larger norm, with a floor for gradients that are ~0). Here one side is the
# reference: the metric VECTORS.md states divides by the expected tensor's norm alone (never zero: the
# loader refuses an all-zero expected tensor), and a port's non-finite result must read as inf, not nan.
def error_vs_expected(got: Any, want: Array) -> float:
    """||got - want|| / ||want|| over all elements, inf if got is not finite (want is never zero)."""
    got = np.asarray(got, dtype=np.float64)
    if not np.isfinite(got).all():
        return math.inf
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check_array(tensor: str, got: Any, want: Array, tolerance: float, dtype: str) -> TensorCheck:
    """One returned tensor against the expected one: its shape, its dtype (the case's), its error. The loss
    may be a Python float (the port's own float(loss)), which says nothing of the dtype it was computed in."""
    # the dtype is read before anything is converted: a float32 case computed partly in float64 (JAX
    # promotes a float32 array that meets a NumPy float64 scalar) is close in value, and wrong
    python_float = tensor == "loss" and type(got) is float
    try:
        got_dtype = np.asarray(got).dtype
        got = np.asarray(got, dtype=np.float64)
    except Exception as e:  # whatever the port's object raises (a torch tensor that requires grad, say)
        return TensorCheck(tensor, math.inf, tolerance, False, f"not an array: {_raised(e)}")
    if got.shape != want.shape:
        return TensorCheck(tensor, math.inf, tolerance, False, f"shape {got.shape}, expected {want.shape}")
    error = error_vs_expected(got, want)
    if got_dtype != np.dtype(dtype) and not python_float:
        note = f"{tensor} is {_dtype_name(got_dtype)}; a {dtype} case needs {dtype} arrays back"
        return TensorCheck(tensor, error, tolerance, False, note)
    return TensorCheck(tensor, error, tolerance, error <= tolerance)


def compare(case: Case, result: Any) -> CaseReport:
    """Check what an implementation returned for `case` against the expected values and tolerances."""
    report = CaseReport(case.name, case.method, case.dtype)
    if not isinstance(result, Mapping) or not {"logits", "loss", "grads"} <= set(result):
        report.failure = f"run_case must return a dict with logits, loss and grads; got {_short(result)}"
        return report

    def check(tensor: str, got: Any, want: Array, tolerance: float) -> None:
        report.checks.append(check_array(tensor, got, want, tolerance, case.dtype))

    check("loss", result["loss"], np.asarray(case.loss), case.tolerances["loss"])
    check("logits", result["logits"], case.logits, case.tolerances["logits"])
    grads = result["grads"]
    if not isinstance(grads, Mapping):
        report.failure = f"grads must be a dict of tensor name -> array; got {type(grads).__name__}"
        return report
    for name, want in case.grads.items():
        if name in grads:
            check(name, grads[name], want, case.tolerances["grads"][name])
        else:
            report.checks.append(TensorCheck(name, math.inf, case.tolerances["grads"][name], False, "gradient missing"))
    for name in sorted(set(grads) - set(case.grads), key=repr):
        report.checks.append(TensorCheck(str(name), math.inf, 0.0, False, "a gradient of a tensor that does not train"))
    derived = result.get("derived") or {}
    if not isinstance(derived, Mapping):
        report.failure = f"derived must be a dict of tensor name -> array; got {type(derived).__name__}"
        return report
    for name, want in case.derived.items():
        tolerance = case.tolerances["derived"][name]
        if name in derived:
            check(f"derived {name}", derived[name], want, tolerance)
        else:
            report.checks.append(TensorCheck(f"derived {name}", math.nan, tolerance, None, "not returned (optional)"))
    for name in sorted(set(derived) - set(case.derived), key=repr):
        report.checks.append(TensorCheck(f"derived {name}", math.inf, 0.0, False, "not a derived tensor of this case"))
    return report


def _dtype_name(dtype: np.dtype) -> str:
    """float64, int64, object, <U1: a dtype as a port's author reads it."""
    return dtype.name if dtype.kind in "biufc" else dtype.str


def check_vectors(folder: str | os.PathLike, run_case: RunCase, patterns: Sequence[str] = ("*",)) -> list[CaseReport]:
    """Run an implementation on every case (matching a glob in `patterns`) and compare. Whatever the
    implementation does instead of returning (an exception, or sys.exit: it must not end the check with
    its own exit status), and a result that breaks when it is read, fails its case; it does not stop the
    others. Only KeyboardInterrupt, the user's, stops the check."""
    reports = []
    for case in load_vectors(folder, patterns):
        try:
            with np.errstate(all="ignore"):
                result = run_case(case.port_input())
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            report = CaseReport(case.name, case.method, case.dtype, failure=f"run_case {_raised(e)}")
        else:
            try:
                with np.errstate(all="ignore"):
                    report = compare(case, result)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # a result object whose methods raise or exit when read
                failure = f"reading what run_case returned {_raised(e)}"
                report = CaseReport(case.name, case.method, case.dtype, failure=failure)
        reports.append(report)
    return reports


def _raised(e: BaseException) -> str:
    """What a port's exception says, as one line ("raised ValueError: ...", "called sys.exit(0)"), even
    when its own str() fails."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({_safe_str(e.code, repr)}) instead of returning"
    text = _safe_str(e, str)
    return f"raised {type(e).__name__}" + (f": {text}" if text else "")


def _safe_str(value: Any, show: Callable[[Any], str]) -> str:
    try:
        text = show(value)
    except Exception as e:
        text = f"<unprintable: {type(e).__name__}>"
    text = " ".join(text.split())  # one line
    return text if len(text) <= 500 else text[:497] + "..."


def load_impl(spec: str) -> RunCase:
    """`run_case` from an implementation: a dotted module name importable from the current folder, or the
    path of a .py file or of a package folder."""
    return load_port(spec)[0]


# the functions a port may define beside run_case, each opting into one kind of vectors (VECTORS.md)
OPTIONAL_ENTRY_POINTS = ("run_trajectory", "merge_case", "unmerge_case", "generate_case", "save_adapter")


def load_port(spec: str) -> tuple[RunCase, Callable[[dict[str, Any]], Mapping[str, Any]] | None]:
    """An implementation's `run_case`, and its `run_trajectory` if it has one (the training trajectories are
    a kind a port opts into), importing it once."""
    entry_points = load_entry_points(spec)
    return entry_points["run_case"], entry_points.get("run_trajectory")


def load_entry_points(spec: str) -> dict[str, Callable[..., Any]]:
    """An implementation's `run_case` and whichever of OPTIONAL_ENTRY_POINTS it defines, importing it once."""
    path = os.path.abspath(spec)
    try:
        if spec.endswith(".py") or os.path.isdir(path):
            location = os.path.join(path, "__init__.py") if os.path.isdir(path) else path
            if not os.path.isfile(location):
                raise ConfigError(f"--impl {spec}: {location} does not exist")
            name = "golden_vector_impl_" + os.path.splitext(os.path.basename(path))[0]
            search = [path] if os.path.isdir(path) else None
            module_spec = importlib.util.spec_from_file_location(name, location, submodule_search_locations=search)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(spec)
    except (TinyPeftError, KeyboardInterrupt):
        raise
    except BaseException as e:  # the implementation's own import failing, or exiting: say so in one line
        raise ConfigError(f"--impl {spec}: importing it {_raised(e)}") from None
    run = getattr(module, "run_case", None)
    if not callable(run):
        raise ConfigError(f"--impl {spec}: the module has no function run_case(case) -> dict (see VECTORS.md)")
    optional = {name: getattr(module, name, None) for name in OPTIONAL_ENTRY_POINTS}
    return {"run_case": run} | {name: f for name, f in optional.items() if callable(f)}


# ------------------------------------------------------------------ tinypeft as an implementation
def build(case: Mapping[str, Any], device: str | None = None) -> tuple[Any, dict[str, Array]]:
    """The compute view of the case's model and method, its weights loaded, in the case's dtype, on `device`
    (None: the default); and the tensors the method's init derived from the base weights (in float64)."""
    model, derived = build_model(case, device)
    view = model.view()
    if set(view.trainable) != set(case["trainable"]):
        raise CheckpointError(f"case {case['name']}: 'trainable' is not what its method trains")
    return view, derived


def build_model(case: Mapping[str, Any], device: str | None = None) -> tuple[Any, dict[str, Array]]:
    """The case's model (a GPT, or a PeftModel around one), its weights loaded, in the case's dtype, on `device`;
    and the tensors the method's init derived from the base weights (in float64)."""
    dtype = case["dtype"]
    config = GPTConfig(**case["model_config"], dtype=dtype)
    weights = dict(case["weights"])
    base = GPT(config, device=device)
    base.load_state_dict({n: weights.pop(n) for n in parameter_shapes(config)})
    method_config = case["method_config"]
    model: Any = base
    derived: dict[str, Array] = {}
    if method_config is None:
        base.trainable = set(case["trainable"])
    else:
        model = get_peft_model(base, PeftConfig.from_dict(method_config))
        adapter = model.active
        derived = adapter.derived()  # from the fresh adapter: what the init computes from the base weights
        stands_in_for = {v: k for k, v in adapter.overrides.items()}
        state = {}
        for name in adapter.params:
            if name in stands_in_for:  # a trained copy of a base tensor: the case holds it under the base name
                state[name] = base.params[stands_in_for[name]]
            elif name in weights:
                state[name] = weights.pop(name)
            else:
                raise CheckpointError(f"case {case['name']}: the weights lack the adapter tensor {name!r}")
        saved = adapter.state_dict()
        for name, value in derived.items():  # a derived tensor the adapter saves but never trains (frozen
            if name in saved and name not in adapter.params:  # random projections) is not in the weights: as drawn
                state[name] = value
        adapter.load_state_dict(state)
    if weights:
        raise CheckpointError(f"case {case['name']}: weights this method does not use: {sorted(weights)[:3]}")
    return model, derived


def run_case(case: Mapping[str, Any]) -> dict[str, Any]:
    """tinypeft itself behind the interface every port implements: builds the model and adapter from the
    case's configs, loads its weights, and computes in the case's dtype."""
    dtype = case["dtype"]
    view, derived = build(case)
    ids, labels, mask = case["input_ids"], case["labels"], case["attention_mask"]
    logits = engine.logits(view, ids, mask)
    loss, grads = engine.loss_and_grad(view, ids, labels, mask)
    # on the GPU (TINYPEFT_BACKEND=cuda) the case runs there; what a port returns is host arrays, of the
    # case's dtype (derived() gives float64 copies of what the init computed in the model's dtype)
    return {
        "logits": to_numpy(logits),
        "loss": float(loss),
        "grads": {name: to_numpy(g) for name, g in grads.items()},
        "derived": {name: to_numpy(d).astype(dtype) for name, d in derived.items()},
    }
