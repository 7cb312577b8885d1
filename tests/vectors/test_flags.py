"""Every config field is pinned by the golden vectors: flip a field of a case's config (to another value
tinypeft accepts), compute the case from its own weights under the flipped config, and some case of the
method must come out different. A field no case pins is one a port could ignore and still pass every case
(issue 17: DoRA with rsLoRA was only tested at r = 1, where alpha / r = alpha / sqrt(r)).

Each method's registry entry lists its inert fields (`MethodSpec.inert_fields`: dropout in eval, names PEFT
writes, inits the vectors store the result of), each with its reason; the test checks that they are inert
indeed. Methods are read from the registry, so a new method's fields are flipped with no change here.

What "different" means, from the strongest to the weakest:
- numbers: the same tensors, and some loss, logits, gradient or derived tensor moves past its float32
  tolerance (so both dtypes' cases see it);
- derived: the flipped config derives other tensors (PiSSA's residual, a TEXT init) or none;
- tensors: the flipped config needs tensors the case does not hold (another rank, other targets): a port
  that read the field so would look for tensors that are not there;
- trainable: the same numbers, but another set of tensors trains (LoRA's bias): the case's gradients differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tinypeft import engine
from tinypeft.errors import TinyPeftError
from tinypeft.methods import METHODS, PeftConfig
from tinypeft.methods.base import CONFIG_TYPES
from tinypeft.model import GPT, GPTConfig, parameter_shapes
from tinypeft.peft_model import get_peft_model
from tinypeft.vectors import Case, compute_case, error_vs_expected, tolerance_for

ROOT = Path(__file__).resolve().parents[2]

# written by PeftConfig.to_dict for every method (PEFT's bookkeeping), never read by a computation
COMMON_INERT = {
    "task_type": "PEFT's task label, written for PEFT; tinypeft computes a causal LM whatever it says",
    "base_model_name_or_path": "where PEFT finds the base model, not how it computes",
}
CHANGED = ("numbers", "derived", "tensors", "trainable")


def key_of(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def flips(value: Any, seen: list[Any]) -> list[Any]:
    """Other values for a field: the neighbours of a number, the negation of a bool, a list less one entry,
    a string reversed, and every value the method's other cases or the config's default give it. Those
    tinypeft refuses are skipped by `effect`."""
    out: list[Any] = []
    if isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int):
        out += [value + 1, value - 1]
    elif isinstance(value, float):
        out += [value * 2, value / 2, value + 0.25]
    elif isinstance(value, str):
        out.append(value[::-1])
    elif isinstance(value, list):
        out += [value[:i] + value[i + 1 :] for i in range(len(value))]
    elif isinstance(value, dict) and value:
        out.append({})
    out += seen
    unique: dict[str, Any] = {}
    for v in out:
        unique.setdefault(key_of(v), v)
    unique.pop(key_of(value), None)
    return list(unique.values())


def effect(case: Case, method_config: dict[str, Any]) -> str:
    """What computing `case` from its weights under `method_config` gives: "refused" (not a config
    tinypeft takes for this model), "same", or one of CHANGED (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out=False: PEFT's warning, and it is set back to True
            config = PeftConfig.from_dict(method_config)
        base = GPT(GPTConfig(**case.model_config, dtype="float64"), device="cpu")
        weights = dict(case.weights)
        base.load_state_dict({n: weights.pop(n) for n in parameter_shapes(base.config)})
        model = get_peft_model(base, config)
    except TinyPeftError:
        return "refused"
    adapter = model.active
    stands_in_for = {v: k for k, v in adapter.overrides.items()}
    state = {}
    for name, value in adapter.params.items():
        if name in stands_in_for:
            state[name] = base.params[stands_in_for[name]]
        elif name in weights and weights[name].shape == value.shape:
            state[name] = weights.pop(name)
        else:
            return "tensors"
    if weights:
        return "tensors"
    derived = adapter.derived()
    try:
        adapter.load_state_dict(state)
    except TinyPeftError:  # a state that must hold derived tensors too (VeRA's saved projections)
        try:
            adapter.load_state_dict(state | {n: np.asarray(v) for n, v in case.derived.items()})
        except TinyPeftError:  # the flipped config wants other tensors than the case holds
            return "tensors"
    view = model.view()
    if set(view.trainable) != set(case.trainable):
        return "trainable"
    if set(derived) != set(case.derived):
        return "derived"
    ids, labels, mask = case.input_ids, case.labels, case.attention_mask
    loss, grads = engine.loss_and_grad(view, ids, labels, mask)
    pairs = [("loss", "", loss, case.loss), ("logits", "", engine.logits(view, ids, mask), case.logits)]
    pairs += [("gradient", n, grads[n], case.grads[n]) for n in case.grads]
    pairs += [("derived", n, derived[n], case.derived[n]) for n in case.derived]
    moved = any(
        error_vs_expected(got, np.asarray(want)) > tolerance_for("float32", kind, n) for kind, n, got, want in pairs
    )
    return "numbers" if moved else "same"


# ------------------------------------------------------------------ what the registry declares
def spec_cases() -> dict[str, list[str]]:
    """Each method with golden cases -> its cases' names (float64)."""
    return {
        name: [f"{c.name}-float64" for c in spec.golden_cases] for name, spec in METHODS.items() if spec.golden_cases
    }


def fields_of(spec_name: str) -> list[str]:
    """The keys of the method's configs as a case holds them (the dataclass fields and what to_dict adds)."""
    keys: set[str] = set()
    for golden in METHODS[spec_name].golden_cases:
        config = golden.config()
        if config is not None:
            keys |= set(config.to_dict()) - {"peft_type"}
    return sorted(keys)


def inert(spec_name: str) -> dict[str, str]:
    return {**COMMON_INERT, **METHODS[spec_name].inert_fields}


FIELDS = [(name, key) for name in spec_cases() for key in fields_of(name)]


# ------------------------------------------------------------------ the flips
@dataclasses.dataclass
class Flips:
    """For each float64 case with a method config and each of its config keys: (value, effect) per flip."""

    cases: dict[str, Case]
    spec_of: dict[str, str]  # case name -> method (registry) name
    label_of: dict[str, str]  # case name -> its label (a method's variant, like rslora, has its own)
    table: dict[tuple[str, str], list[tuple[Any, str]]]

    def changed(self, case: str, key: str) -> list[tuple[Any, str]]:
        return [(v, e) for v, e in self.table[(case, key)] if e in CHANGED]


def flip_all(cases: list[Case]) -> Flips:
    """Flip every key of every float64 case with a method config, to every value `flips` proposes."""
    spec_of, label_of = {}, {}
    for name, spec in METHODS.items():
        for golden in spec.golden_cases:
            spec_of[f"{golden.name}-float64"], label_of[f"{golden.name}-float64"] = name, golden.label
    mine = {c.name: c for c in cases if c.dtype == "float64" and c.method_config is not None}
    seen: dict[tuple[str, str], list[Any]] = defaultdict(list)  # (method, key) -> the values it takes
    for case in mine.values():
        spec = spec_of[case.name]
        config_cls = CONFIG_TYPES[case.method_config["peft_type"]]
        defaults = {f.name: f.default for f in dataclasses.fields(config_cls) if f.default is not dataclasses.MISSING}
        for key, value in case.method_config.items():
            for v in (value, *([defaults[key]] if key in defaults else [])):
                if key_of(v) not in map(key_of, seen[(spec, key)]):
                    seen[(spec, key)].append(v)
    table = {}
    for case in mine.values():
        for key in set(case.method_config) - {"peft_type"}:
            candidates = flips(case.method_config[key], seen[(spec_of[case.name], key)])
            table[(case.name, key)] = [(v, effect(case, {**case.method_config, key: v})) for v in candidates]
    return Flips(mine, spec_of, label_of, table)


@pytest.fixture(scope="module")
def flipped(cases) -> Flips:
    return flip_all(cases)


def field_problem(flipped: Flips, method: str, key: str) -> str:
    """Why the method's field is not pinned, or is declared inert wrongly; "" when all is well."""
    effects = {(n, key_of(v)): e for n in spec_cases()[method] for v, e in flipped.table[(n, key)]}
    changed = {k: e for k, e in effects.items() if e in CHANGED}
    if key in inert(method):
        return f"{method}.{key} is declared inert ({inert(method)[key]}), yet it changes {changed}" if changed else ""
    if not changed:
        return (
            f"{method}.{key}: no golden case changes when it is flipped ({effects}); add a case where it matters, "
            "or declare it in the method's MethodSpec.inert_fields with the reason"
        )
    return ""


def unpinned_values(flipped: Flips, case_names: list[str]) -> list[tuple[str, str, str]]:
    """(label, key, value) for every value a label's cases give a non-inert field that no case of that label
    holding it pins: flipping the field away from it changes none of them. A flag combination a variant
    uses only where it cannot show (rsLoRA at r = 1 in DoRA) is one."""
    holders: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for name in case_names:
        case, spec = flipped.cases[name], flipped.spec_of[name]
        for key, value in case.method_config.items():
            declared = inert(spec)
            if key == "peft_type" or key in declared or f"{key}={key_of(value)}" in declared:
                continue
            holders[(flipped.label_of[name], key, key_of(value))].append(name)
    return sorted(k for k, names in holders.items() if not any(flipped.changed(n, k[1]) for n in names))


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize(("method", "key"), FIELDS, ids=[f"{m}.{k}" for m, k in FIELDS])
def test_flipping_a_field_changes_some_case_of_the_method(flipped, method, key):
    """The field of the method's config, flipped in each case to each other accepted value: some case's
    numbers, derived tensors, tensors or trainable set must change, unless the field is declared inert (and
    then none may)."""
    assert field_problem(flipped, method, key) == ""


def test_every_value_of_every_variant_is_pinned(flipped):
    """For each variant's label (lora, rslora, dora, pissa, ...), each value its cases give a field is held by
    a case where flipping it shows: each flag combination the cases use is tested where it matters."""
    assert unpinned_values(flipped, list(flipped.cases)) == []


def test_the_value_rule_finds_dora_with_rslora_at_rank_one(flipped):
    """Without the r >= 2 cases added for issue 17, the rule above names the hole the issue found: a port
    that ignores use_rslora in DoRA passed dora-rank1 (r = 1: both scalings equal)."""
    added = ("dora-rslora", "pissa-rslora", "pissa-dora")
    before = [n for n in flipped.cases if not n.startswith(added)]
    assert ("dora", "use_rslora", "true") in unpinned_values(flipped, before)
    assert flipped.changed("dora-rslora-float64", "use_rslora") == [(False, "numbers")]
    assert not flipped.changed("dora-rank1-float64", "use_rslora")


def test_inert_values_are_values_the_cases_hold(flipped):
    """An entry "field=value" of inert_fields names a value some case of the method holds, and flipping it
    there changes nothing: a stale or wrong entry fails here."""
    for method, spec in METHODS.items():
        for entry, reason in spec.inert_fields.items():
            assert reason.strip(), f"{method}: inert field {entry} needs its reason"
            key, sep, value = entry.partition("=")
            if not sep:
                assert key in fields_of(method), f"{method}: inert field {key!r} is no field of its config"
                continue
            holders = [n for n in spec_cases()[method] if key_of(flipped.cases[n].method_config.get(key)) == value]
            assert holders, f"{method}: no case holds {entry}"
            assert not any(flipped.changed(n, key) for n in holders), f"{method}: {entry} is not inert"


def test_methods_without_cases_of_their_own_only_choose_what_trains():
    """A method without golden cases (golden_cases_of) trains copies of base parameters and nothing else:
    its numbers are full fine-tuning's, with the case's trainable list choosing the gradients."""
    for name, spec in METHODS.items():
        if spec.golden_cases:
            continue
        assert spec.golden_cases_of in spec_cases(), name
        base = GPT(GPTConfig(vocab_size=19, n_positions=11, n_embd=9, n_layer=2, n_head=3), device="cpu")
        adapter = get_peft_model(base, spec.example(base.config)).active
        assert set(adapter.params) == set(adapter.overrides.values()), f"{name} has tensors of its own"


@contextlib.contextmanager
def toy_method() -> Iterator[ModuleType]:
    """examples/own_method/ssf.py registered for the block; the registry is as it was afterwards."""
    methods, config_types, saved = dict(METHODS), dict(CONFIG_TYPES), sys.modules.get("ssf")
    spec = importlib.util.spec_from_file_location("ssf", ROOT / "examples" / "own_method" / "ssf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ssf"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        METHODS.clear()
        METHODS.update(methods)
        CONFIG_TYPES.clear()
        CONFIG_TYPES.update(config_types)
        if saved is None:
            sys.modules.pop("ssf", None)
        else:
            sys.modules["ssf"] = saved


def test_a_method_defined_outside_tinypeft_is_flipped_too():
    """The toy method of docs/write_a_method.md, registered in one line, is flipped with no change here: its
    target_modules are pinned, its init_ssf_weights is declared inert; without the declaration, it is named."""
    with toy_method() as ssf:
        cases = [compute_case(golden, "float64") for golden in ssf.SPEC.golden_cases]
        toy = flip_all(cases)
        assert [field_problem(toy, "ssf", key) for key in fields_of("ssf")] == [""] * len(fields_of("ssf"))
        assert unpinned_values(toy, list(toy.cases)) == []
        METHODS["ssf"] = dataclasses.replace(ssf.SPEC, inert_fields={})
        assert "ssf.init_ssf_weights: no golden case changes" in field_problem(toy, "ssf", "init_ssf_weights")
