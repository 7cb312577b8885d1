"""The method registry: one `MethodSpec` per `tinypeft finetune --method` choice, which the rest of
the program iterates. The CLI builds its flags and defaults from it, the golden vectors take their
cases from it, the error catalogue its cases, and the shared gradient harness its example configs;
none of them names a method.

A method's file ends with `register_method(MethodSpec(...))`; `tinypeft/methods/__init__.py` imports
each file once, and the order it imports them in is the order the program lists the methods in (the
golden vectors' index, the CLI's method options). A method defined outside the package (see
docs/write_a_method.md) registers itself the same way, in one line.

The model shapes the built-in golden cases use are here too, and the one every error case is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import GPTConfig
    from ..errors import TinyPeftError
    from .base import PeftConfig

# reasons MethodSpec.inert_fields gives again and again
UNIMPLEMENTED = "a PEFT option tinypeft does not implement: any value but the default is refused"
EVAL_DROPOUT = "a dropout, off in eval: the vectors are eval-mode numbers"
DRAWN_INIT = "an init: the vectors store the tensors it drew (or made)"
ALWAYS_LINEAR = "always True for GPT-2's Conv1D layers: tinypeft, as PEFT, sets False back to True"
NOT_IN_FILES = "PEFT's bookkeeping of its files, not how it computes"
UNIMPLEMENTED_FIELDS = ("exclude_modules", "layers_pattern", "layers_to_transform", "modules_to_save")


def inert(
    unimplemented: Sequence[str] = UNIMPLEMENTED_FIELDS,
    also_unimplemented: Sequence[str] = (),
    dropout: Sequence[str] = (),
    init: Sequence[str] = (),
    linear: bool = False,
    **reasons: str,
) -> dict[str, str]:
    """A MethodSpec.inert_fields of the usual kinds: PEFT options refused but at their default, dropouts,
    inits, fan_in_fan_out; then `reasons` (a "field=value" entry as {"field=value": reason})."""
    fields = {f: UNIMPLEMENTED for f in (*unimplemented, *also_unimplemented)} | {f: EVAL_DROPOUT for f in dropout}
    fields |= {f: DRAWN_INIT for f in init} | ({"fan_in_fan_out": ALWAYS_LINEAR} if linear else {})
    return fields | reasons


# model shapes (GPTConfig keyword arguments) of the built-in golden cases
ODD = {"vocab_size": 19, "n_positions": 11, "n_embd": 9, "n_layer": 2, "n_head": 3, "n_inner": 13}
ODD_EPS = {**ODD, "layer_norm_epsilon": 1e-6}  # a config that is not GPT-2's default anywhere it can be
SMALL = {"vocab_size": 23, "n_positions": 12, "n_embd": 8, "n_layer": 2, "n_head": 2}
BYTES = {"vocab_size": 128, "n_positions": 12, "n_embd": 8, "n_layer": 2, "n_head": 2}  # room for ASCII text
# the base model every ErrorCase is given (seed 0, float32): the messages it expects name these sizes
ERROR_MODEL = {"vocab_size": 32, "n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2}


@dataclass(frozen=True)
class Flag:
    """One `tinypeft finetune` option a method reads: argparse's option strings and keyword arguments.
    The help says what the option does; --help shows it after the method's name ("lora: rank r"). Two
    methods may declare the same option (lora and ia3 both read --target_modules) if they agree on
    everything but the help: it is listed once, after both names ("lora/ia3: ...")."""

    names: tuple[str, ...]  # ("--rank", "-r")
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest", self.names[0].lstrip("-").replace("-", "_"))


@dataclass(frozen=True)
class Batch:
    """B rows of T tokens. padding: "none", "mixed" (a full row, a right-padded row and a left-padded
    row) or "ends" (a full row, and a row padded one token at the left and two at the right)."""

    B: int
    T: int
    padding: str = "none"


@dataclass(frozen=True)
class GoldenCase:
    """One golden-vector case of a method before it is computed: its label in the vector files (the
    method's name unless a variant of it, like rslora, is labelled apart), a variant, the model
    shape, the config (a factory: configs are mutable), the batch, and whether the adapter's tensors
    are moved off their init."""

    label: str
    variant: str
    description: str
    model: Mapping[str, Any]
    config: Callable[[], PeftConfig | None]
    batch: Batch
    perturb_adapter: bool = True
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.label}-{self.variant}"


@dataclass(frozen=True)
class ErrorCase:
    """One misuse a method refuses: `call(model)` must raise `error` with every string of `says` in its
    one-line message. `model` is a GPT of the shape ERROR_MODEL or, when `config` is given, that GPT
    wrapped by `get_peft_model(model, config())`, which the catalogue makes inside the check (a config
    may fail as it is made or wrapped; and a method file does not import the PEFT model, DESIGN.md
    principle 8). The error catalogue (tests/errors, docs/errors.md) lists every method's."""

    when: str
    call: Callable[[Any], object]
    error: type[TinyPeftError]
    says: tuple[str, ...]
    config: Callable[[], PeftConfig] | None = None


def as_is(model: Any) -> Any:
    """The call of an ErrorCase whose `config` is the whole misuse: making and wrapping it must fail."""
    return model


@dataclass(frozen=True)
class MethodSpec:
    """Everything the program needs to know about a method besides its math.

    name: the `--method` choice; help: one line for --help; default_lr: the learning rate
    `finetune` uses unless told (each chosen by a measured sweep, see docs/experiments.md);
    build: the config from the parsed flags (None: train the base model itself);
    flags: the options it reads; example: a config for a small model with every tensor off its
    identity init, which the shared gradient harness checks three ways (and its merge);
    golden_cases, error_cases: see above; peft_files: how its files map to PEFT's (or that PEFT
    has no such method, and what to use instead); loads_in_peft: whether PEFT reads its adapter;
    default: the method a bare `tinypeft finetune` uses (exactly one says so); golden_cases_of: for a
    method with no golden cases of its own, the method whose cases compute its numbers too (training
    a subset of the base's parameters is full fine-tuning with fewer gradients); inert_fields: the config
    fields (or "field=value", a JSON value) that cannot change a golden case's numbers, each with the
    reason: tests/vectors/test_flags.py flips every other field of every case and asserts that some case
    of the method changes, so a field a port could ignore and still pass is caught.
    """

    name: str
    help: str
    default_lr: float
    build: Callable[[argparse.Namespace], PeftConfig | None]
    example: Callable[[GPTConfig], PeftConfig | None]
    flags: Sequence[Flag] = ()
    golden_cases: Sequence[GoldenCase] = ()
    error_cases: Callable[[], Sequence[ErrorCase]] = tuple
    peft_files: str = ""
    loads_in_peft: bool = False
    default: bool = False
    golden_cases_of: str = ""
    inert_fields: Mapping[str, str] = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (a name may be registered once)."""
    if not isinstance(spec, MethodSpec):
        raise ConfigError(f"register_method needs a MethodSpec; got {type(spec).__name__}")
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise ConfigError(f"a method named {spec.name!r} is registered already; the methods are {sorted(METHODS)}")
    METHODS[spec.name] = spec
    return spec


def method(name: str) -> MethodSpec:
    """The registered method `name`, or a ConfigError listing the choices."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def default_method() -> str:
    """The --method a bare `tinypeft finetune` uses: the one registered method with default=True."""
    defaults = [name for name, spec in METHODS.items() if spec.default]
    if len(defaults) != 1:
        raise ConfigError(f"exactly one registered method must be the default; {defaults or 'none'} say so")
    return defaults[0]


def golden_cases() -> list[GoldenCase]:
    """Every registered method's golden cases, in registration order."""
    return [case for spec in METHODS.values() for case in spec.golden_cases]


def peft_table() -> str:
    """The README's table of which adapters PEFT reads, from every registered method's spec."""
    rows = [
        "| `--method` | what trains | loads in PEFT | its files, or what to use instead |",
        "|---|---|---|---|",
    ]
    for name, spec in METHODS.items():
        files = spec.peft_files.replace("<", "&lt;").replace(">", "&gt;")  # <module> is no HTML tag
        rows.append(f"| `{name}` | {spec.help} | {'yes' if spec.loads_in_peft else 'no'} | {files} |")
    return "\n".join(rows)
