"""The shared gradient harness: everything a PEFT method must pass, checked for any method.

`check_method(method)` takes a registered method's name, its `MethodSpec`, or a bare config factory
(`GPTConfig -> PeftConfig | None`, None meaning the base model itself trains). For each of a few small
float64 cases (`DEFAULT_CASES`: one to three layers, one to four heads, odd sizes, batches of one to
three rows, padded at the right, the left and both ends) it builds the base model with every weight
moved off GPT-2's symmetric init, wraps it with the method's config, moves every adapter tensor off its
init too (LoRA's B = 0 would make dA vanish: a check there proves nothing), and checks:

1. gradients, three ways (`gradcheck.check_gradients`): the hand-written backward equals autograd's
   derivative of the very forward we ship (<= 1e-10 relative per tensor), and a fourth-order central
   difference along a random direction, per tensor and through all of them at once (<= 1e-6). No
   trainable tensor's gradient may be zero: it would check nothing.
2. the engine: `engine.backward` (stopped at the lowest trainable parameter) equals the reference
   `gpt.backward` bitwise, over exactly the trainable tensors; and what the public
   `model.loss_and_grad` returns (row blocks, public names) equals it to 1e-12.
3. the merge, where the adapter has one (`adapter.can_merge()`): `merge_and_unload()`'s logits equal
   the unmerged model's (<= 1e-12 relative; not for an adapter with a `merge_caveat`, LoRA on wte, whose
   merge also moves the tied head) and leave the base untouched; `merge_adapter()` computes the same;
   `unmerge_adapter()` puts back the base's exact arrays and the exact unmerged logits.
4. given a name or a MethodSpec, its error cases (`check_error_cases`): each raises exactly its error,
   saying what it promises, on one line, as the error catalogue checks them.

It returns a `MethodReport` (every error, per case and tensor) and, unless told not to, raises
`HarnessError` (an AssertionError) naming the case, the check and the tensor of each disagreement.
It runs from a plain script (a fixed loop over cases) and from tests (`check_case` with a
hypothesis-drawn `HarnessCase`). float64 and NumPy only: finite differences in float32 are noise.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import engine, gpt
from .gradcheck import check_gradients, relative_error
from .methods.base import PeftConfig
from .methods.registry import ERROR_MODEL, Batch, MethodSpec, method
from .model import GPT, GPTConfig
from .ops import IGNORE_INDEX, causal_lm_loss_backward, causal_lm_loss_forward
from .peft_model import PeftModel, get_peft_model

ConfigFactory = Callable[[GPTConfig], PeftConfig | None]
Model = GPT | PeftModel

# how far every base weight and adapter tensor is moved off its init: O(1) pre-activations and attention
# far from uniform at these widths (the golden vectors use the same)
PERTURBATION = 0.3


@dataclass(frozen=True)
class Tolerances:
    """Relative errors a correct method stays under, in float64 (measured: ~1e-15 for autograd and the
    merge, 1e-9 to 1e-12 for the directional check; see docs/write_a_method.md)."""

    autograd: float = 1e-10  # hand vs autograd, per tensor
    directional: float = 1e-6  # <grad, u> vs a central difference, relative to ||grad|| ||u||
    loss_and_grad: float = 1e-12  # the public API (row blocks on threads) vs the engine's backward
    merge: float = 1e-12  # merged logits vs unmerged logits


@dataclass(frozen=True)
class HarnessCase:
    """One model shape and batch. `model`'s dtype is ignored (the harness computes in float64); `seed`
    draws the weights, the perturbations, the batch and the finite-difference directions."""

    name: str
    model: GPTConfig
    batch: Batch
    seed: int = 0


DEFAULT_CASES: tuple[HarnessCase, ...] = (
    HarnessCase("1 layer, 1 head, B=1", GPTConfig(vocab_size=13, n_positions=16, n_embd=4, n_layer=1, n_head=1),
                Batch(1, 6), seed=0),
    HarnessCase("2 layers, 2 heads, B=3 padded right and left",
                GPTConfig(vocab_size=17, n_positions=16, n_embd=8, n_layer=2, n_head=2), Batch(3, 7, "mixed"), seed=1),
    HarnessCase("odd sizes: 3 heads of 3, n_inner 13, eps 1e-6, B=2 padded at both ends",
                GPTConfig(vocab_size=19, n_positions=16, n_embd=9, n_layer=2, n_head=3, n_inner=13,
                          layer_norm_epsilon=1e-6), Batch(2, 7, "ends"), seed=2),
    HarnessCase("3 layers, 4 heads, B=2", GPTConfig(vocab_size=11, n_positions=16, n_embd=8, n_layer=3, n_head=4),
                Batch(2, 5), seed=3),
)  # fmt: skip


@dataclass(frozen=True)
class Failure:
    """One disagreement: in `case`, `check` of `tensor` gave `error`, over `tolerance`."""

    case: str
    check: str  # autograd, directional, zero gradient, engine, loss_and_grad, merge, unmerge
    tensor: str
    error: float
    tolerance: float

    def __str__(self) -> str:
        if math.isinf(self.error):  # not a number to compare: something missing, or an exception
            return f"[{self.case}] {self.check}: {self.tensor}"
        return f"[{self.case}] {self.check} of {self.tensor}: {self.error:.3g} > {self.tolerance:.0e}"


@dataclass
class CaseReport:
    """What one case measured. `gradients`: public tensor name -> {"autograd": .., "directional": ..};
    `merge` is None for a method with no merge (or the base model itself); `zero_gradients`: the trainable
    tensors whose gradient is exactly zero here (a dead ReLU, say), which this case therefore does not
    check (the method report fails a tensor that no case checks)."""

    case: HarnessCase
    gradients: dict[str, dict[str, float]]
    directional_all: float
    loss_and_grad: float
    merge: float | None
    zero_gradients: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


@dataclass
class MethodReport:
    """Every case's report for one method, with the worst error of each check across them."""

    method: str
    cases: list[CaseReport]
    error_cases: list[str] = field(default_factory=list)  # the spec's ErrorCases checked, by `when`
    error_failures: list[Failure] = field(default_factory=list)

    @property
    def failures(self) -> list[Failure]:
        """Every case's failures, and each trainable tensor whose gradient is zero in every case: a check
        of a zero gradient proves nothing (LoRA's B = 0 makes dA zero), so no case checked it."""
        unchecked = {name for c in self.cases for name in c.gradients}
        for c in self.cases:
            unchecked -= set(c.gradients) - set(c.zero_gradients)
        never = [Failure("every case", "zero gradient", name, 0.0, 0.0) for name in sorted(unchecked)]
        return [f for case in self.cases for f in case.failures] + never + self.error_failures

    @property
    def ok(self) -> bool:
        return not self.failures

    def max_error(self, check: str) -> float | None:
        """The largest "autograd", "directional", "loss_and_grad" or "merge" error over the cases (None:
        no merge was checked)."""
        if check in ("autograd", "directional"):
            values = [e[check] for c in self.cases for e in c.gradients.values()]
            values += [c.directional_all for c in self.cases] if check == "directional" else []
        else:
            values = [getattr(c, check) for c in self.cases if getattr(c, check) is not None]
        return max(values) if values else None

    def table(self) -> str:
        """Per case and tensor, the errors, as a plain-text table a script prints."""
        lines = [f"method {self.method}: {'ok' if self.ok else f'{len(self.failures)} FAILED'}"]
        for c in self.cases:
            merge = "no merge" if c.merge is None else f"{c.merge:.2e}"
            lines.append(f"  case {c.case.name}: loss_and_grad {c.loss_and_grad:.2e}, merge {merge}")
            lines.append(f"    {'tensor':<58} {'autograd':>10} {'directional':>12}")
            for name, e in sorted(c.gradients.items()):
                zero = "  (zero here: not checked)" if name in c.zero_gradients else ""
                lines.append(f"    {name:<58} {e['autograd']:>10.2e} {e['directional']:>12.2e}{zero}")
            lines.append(f"    {'(all tensors along one direction)':<58} {'':>10} {c.directional_all:>12.2e}")
        if self.error_cases:
            lines.append(f"  error cases: {len(self.error_cases)} checked, {len(self.error_failures)} failed")
        lines += [f"  FAILED {f}" for f in self.failures]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if self.failures:
            raise HarnessError(self)


class HarnessError(AssertionError):
    """A method failed the harness; the message lists every failure, and `.report` holds the numbers."""

    def __init__(self, report: MethodReport) -> None:
        self.report = report
        listed = "\n  ".join(str(f) for f in report.failures)
        super().__init__(f"method {report.method} failed {len(report.failures)} check(s):\n  {listed}")


# ------------------------------------------------------------------ the entry points
def check_method(
    method_or_factory: str | MethodSpec | ConfigFactory,
    cases: Sequence[HarnessCase] = DEFAULT_CASES,
    *,
    tolerances: Tolerances = Tolerances(),
    raise_on_failure: bool = True,
) -> MethodReport:
    """Run every check on every case. `method_or_factory`: a registered method's name, its MethodSpec
    (its `example` config is checked, and its error cases), or a config factory. Raises HarnessError on
    any failure unless raise_on_failure=False; returns the report either way."""
    name, factory, spec = _resolve(method_or_factory)
    report = MethodReport(name, [check_case(factory, case, tolerances) for case in cases])
    if spec is not None:
        report.error_cases = [c.when for c in spec.error_cases()]
        report.error_failures = check_error_cases(spec)
    if raise_on_failure:
        report.raise_if_failed()
    return report


def _resolve(method_or_factory: str | MethodSpec | ConfigFactory) -> tuple[str, ConfigFactory, MethodSpec | None]:
    if isinstance(method_or_factory, str):
        method_or_factory = method(method_or_factory)
    if isinstance(method_or_factory, MethodSpec):
        return method_or_factory.name, method_or_factory.example, method_or_factory
    if not callable(method_or_factory):
        raise TypeError(
            f"check_method needs a method name, a MethodSpec or a config factory; got {method_or_factory!r}"
        )
    return getattr(method_or_factory, "__name__", repr(method_or_factory)), method_or_factory, None


def check_error_cases(spec: MethodSpec) -> list[Failure]:
    """Each of the spec's ErrorCases, as the error catalogue checks them: on a GPT of the shape ERROR_MODEL
    (seed 0), wrapped with `case.config()` if given, `case.call` raises exactly `case.error`, with every
    string of `case.says` in a one-line message. Returns the cases that do not."""
    failures = []
    for case in spec.error_cases():
        try:
            model = GPT(GPTConfig(**ERROR_MODEL), seed=0, device="cpu")
            case.call(model if case.config is None else get_peft_model(model, case.config()))
            found = "raised nothing"
        except Exception as e:
            message = str(e)
            missing = [s for s in case.says if s not in message]
            found = f"raised {type(e).__name__}: {message}"
            if type(e) is case.error and not missing and "\n" not in message:
                continue
            found += f" (missing {missing})" if missing else ""
        failures.append(Failure("error cases", case.when, f"expected {case.error.__name__}, {found}", math.inf, 0))
    return failures


def check_case(factory: ConfigFactory, case: HarnessCase, tolerances: Tolerances = Tolerances()) -> CaseReport:
    """Every check on one case: gradients three ways, the engine, and the merge (if the adapter has one)."""
    model = build_model(factory, case)
    ids, labels, mask = make_batch(case.batch, case.model.vocab_size, np.random.default_rng((case.seed, 11)))
    failures: list[Failure] = []
    args = (model, ids, labels, mask, case, tolerances, failures)
    gradients, directional_all = _guarded("gradients", _gradients, args, ({}, math.inf))
    api_error, zero = _guarded("engine", _engine, args, (math.inf, []))
    merge_error = _guarded("merge", _merge, args, math.inf)
    return CaseReport(case, gradients, directional_all, api_error, merge_error, zero, failures)


def _guarded(check: str, run: Callable[..., Any], args: tuple, failed: Any) -> Any:
    """run(*args), or, if it raises, a failure saying what it raised (an exception in a method's code is a
    finding like any other: the harness goes on to the next check)."""
    try:
        return run(*args)
    except Exception as e:
        case, failures = args[4], args[6]
        failures.append(Failure(case.name, check, f"raised {type(e).__name__}: {e}", math.inf, 0.0))
        return failed


# ------------------------------------------------------------------ models and batches
def build_model(factory: ConfigFactory, case: HarnessCase, perturbation: float = PERTURBATION) -> Model:
    """A float64 CPU base with every weight moved off its init, wrapped with factory(config) if that is
    not None, and every adapter tensor moved off its init too."""
    config = dataclasses.replace(case.model, dtype="float64")
    rng = np.random.default_rng((case.seed, 7))
    base = GPT(config, seed=case.seed, device="cpu")
    base.params = {k: v + perturbation * rng.standard_normal(v.shape) for k, v in base.params.items()}
    method_config = factory(config)
    if method_config is None:
        return base
    model = get_peft_model(base, method_config, seed=case.seed)
    adapter = model.active  # the same dict, updated: the adapter's sites read the tensors from it
    adapter.params.update({k: v + perturbation * rng.standard_normal(v.shape) for k, v in adapter.params.items()})
    return model


def make_batch(batch: Batch, vocab_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Any]:
    """(input_ids, labels, attention_mask or None) for a Batch. padding "mixed": rows 1, 4, ... padded at
    the right (3 tokens), rows 2, 5, ... at the left (2: their first queries see no key); "ends": rows
    1, 3, ... one token at the left and two at the right. Labels are the ids, -100 at padding; with no
    padding one label is -100 so that ignoring is exercised everywhere."""
    B, T = batch.B, batch.T
    if T < 2 or batch.padding not in ("none", "mixed", "ends"):
        raise ValueError(f"a harness batch needs T >= 2 (a target to predict) and padding none/mixed/ends; got {batch}")
    ids = rng.integers(0, vocab_size, size=(B, T))
    mask = np.ones((B, T), dtype=np.int64)
    for b in range(B):
        if batch.padding == "mixed" and b % 3 == 1:
            mask[b, max(T - 3, 1) :] = 0
        elif batch.padding == "mixed" and b % 3 == 2:
            mask[b, : min(2, T - 1)] = 0
        elif batch.padding == "ends" and b % 2 == 1:
            mask[b, :1] = 0
            mask[b, max(T - 2, 2) :] = 0
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    if batch.padding == "none":
        if T > 2:
            labels[0, T // 2] = IGNORE_INDEX
        return ids, labels, None
    return ids, labels, mask


# ------------------------------------------------------------------ the checks
def _gradients(model, ids, labels, mask, case, tol, failures) -> tuple[dict[str, dict[str, float]], float]:
    """Hand vs autograd vs central differences, per tensor."""
    with warnings.catch_warnings():
        # autograd's tanh rule divides by cosh(x)² which overflows past |x| ~ 355 (a GELU of a large
        # pre-activation): the quotient is then 0, the right limit. A real overflow shows as a NaN error.
        warnings.filterwarnings("ignore", "overflow encountered", RuntimeWarning, module=r"autograd\.")
        report = check_gradients(model, ids, labels=labels, attention_mask=mask, seed=case.seed)
        held = _held_view(model.view())
        if held is not None:  # a stopped quantity (DoRA's norm): finite differences of the forward with it held
            directional = check_gradients(_Fixed(held), ids, labels=labels, attention_mask=mask, seed=case.seed)
            for name, errors in report.items():
                errors["directional"] = directional[name]["directional"]
    all_directional = report.pop("__all__")["directional"]
    for name, errors in sorted(report.items()):
        for check in ("autograd", "directional"):
            if not errors[check] <= getattr(tol, check):
                failures.append(Failure(case.name, check, name, errors[check], getattr(tol, check)))
    if not all_directional <= tol.directional:
        failures.append(Failure(case.name, "directional", "(all tensors at once)", all_directional, tol.directional))
    return report, all_directional


def _engine(model, ids, labels, mask, case, tol, failures) -> tuple[float, list[str]]:
    """engine.backward == gpt.backward bitwise over the trainable tensors; loss_and_grad == engine to 1e-12.
    Returns loss_and_grad's error and the tensors whose gradient is zero."""
    view = model.view()
    ids_x, mask_x = view.check_inputs(ids, mask)
    leading = 0 if view.sites.embedding is None else view.sites.embedding.positions(view.params)
    logits, cache = gpt.forward(view.params, view.config, ids_x, mask_x, view.sites)
    dlogits = causal_lm_loss_backward(1.0, causal_lm_loss_forward(logits, engine.pad_labels(labels, leading))[1])
    reference = gpt.backward(dlogits, cache, view.trainable)
    fast = engine.backward(dlogits, cache, view)
    sides = {
        "computed, but frozen": set(reference) - set(view.trainable),
        "trainable, but no gradient": set(view.trainable) - set(reference),
        "computed by one side only": set(reference) ^ set(fast),
    }
    for what, names in sides.items():
        failures += [Failure(case.name, "engine", f"{name} ({what})", math.inf, 0.0) for name in sorted(names)]
    for name in sorted(set(reference) & set(fast)):
        if not np.array_equal(reference[name], fast[name]):
            failures.append(Failure(case.name, "engine", name, relative_error(fast[name], reference[name]), 0.0))
    _, public = model.loss_and_grad(ids, labels, mask)
    expected = view.public(engine.add_grads(reference, engine.loss_terms(view)[1]))  # and any regulariser's
    zero = sorted(name for name, g in expected.items() if not np.any(g))
    if set(public) != set(expected):
        failures.append(
            Failure(case.name, "loss_and_grad", f"names {sorted(set(public) ^ set(expected))}", math.inf, 0)
        )
        return math.inf, zero
    errors = {name: relative_error(public[name], g) for name, g in expected.items()}
    for name, error in sorted(errors.items()):
        if not error <= tol.loss_and_grad:
            failures.append(Failure(case.name, "loss_and_grad", name, error, tol.loss_and_grad))
    return max(errors.values(), default=0.0), zero


def _merge(model, ids, labels, mask, case, tol, failures) -> float | None:
    """merge_and_unload and merge_adapter give the unmerged logits (unless the adapter says why not: its
    `merge_caveat`); unmerge_adapter restores the exact base."""
    if not isinstance(model, PeftModel) or not model.active.can_merge():
        return None
    base = model.base_model
    originals = dict(base.params)
    snapshot = {k: v.copy() for k, v in base.params.items()}
    unmerged = np.asarray(model(ids, mask))
    merged_logits = np.asarray(model.merge_and_unload()(ids, mask))
    error = relative_error(merged_logits, unmerged)
    _unchanged(base.params, snapshot, originals, case, "merge_and_unload changed the base", failures)
    model.merge_adapter()
    error = max(error, relative_error(np.asarray(model(ids, mask)), unmerged))
    model.unmerge_adapter()
    _unchanged(base.params, snapshot, originals, case, "unmerge", failures)
    after = np.asarray(model(ids, mask))
    if not np.array_equal(after, unmerged):
        failures.append(Failure(case.name, "unmerge", "logits", relative_error(after, unmerged), 0.0))
    if model.active.merge_caveat():  # merged logits differ by design; the method's tests pin what merge does
        return None
    if not error <= tol.merge:
        failures.append(Failure(case.name, "merge", "logits", error, tol.merge))
    return error


def _unchanged(params, snapshot, originals, case, check, failures) -> None:
    """The base holds its original arrays (the same objects, or equal copies), with their original values."""
    for name in sorted(set(params) | set(snapshot)):
        if name not in params or name not in snapshot:
            failures.append(Failure(case.name, check, f"{name} (added or removed)", math.inf, 0.0))
        elif params[name] is not originals[name] and not np.array_equal(params[name], snapshot[name]):
            failures.append(Failure(case.name, check, name, relative_error(params[name], snapshot[name]), 0.0))
        elif not np.array_equal(snapshot[name], originals[name]):
            failures.append(Failure(case.name, check, f"{name} (written in place)", math.inf, 0.0))


# ------------------------------------------------------------------ stopped quantities
def _held_view(view: engine.ComputeView) -> engine.ComputeView | None:
    """The view with every linear site that holds a stopped quantity replaced by its `holding_norms`
    version (DoRA: the weight norm is a constant to the backward, as in PEFT, so the hand gradient is the
    derivative of the forward with the norm held, which finite differences can check). None when no
    site has one."""
    linear = view.sites.linear
    holding = {id(site): site for site in linear.values() if hasattr(site, "holding_norms")}
    if not holding:
        return None
    held_sites = {key: site.holding_norms(view.params) for key, site in holding.items()}  # one per site
    held = {module: held_sites[id(site)] for module, site in linear.items() if id(site) in held_sites}
    return dataclasses.replace(view, sites=dataclasses.replace(view.sites, linear={**linear, **held}))


@dataclass(frozen=True)
class _Fixed:
    """A model-like object whose view() is a given view (what check_gradients needs)."""

    fixed: engine.ComputeView

    def view(self) -> engine.ComputeView:
        return self.fixed


__all__ = [
    "DEFAULT_CASES",
    "PERTURBATION",
    "CaseReport",
    "Failure",
    "HarnessCase",
    "HarnessError",
    "MethodReport",
    "Tolerances",
    "build_model",
    "check_case",
    "check_error_cases",
    "check_method",
    "make_batch",
]
