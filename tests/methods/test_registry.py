"""The method registry (DESIGN.md principle 9): every registered method carries its whole spec (golden cases,
error cases, an example config, a default learning rate, a --help line, how its files map to PEFT's), and
the programs that iterate the registry (the command line and the golden vectors) name no method."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import tinypeft as tp
from tinypeft.cli_args import build_parser
from tinypeft.methods import METHODS
from tinypeft.methods.base import CONFIG_TYPES
from tinypeft.methods.registry import ODD_EPS, SMALL, default_method, golden_cases

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tinypeft"
# the programs that read the registry instead of naming methods
READERS = [PACKAGE / "cli.py", PACKAGE / "cli_args.py", *sorted((PACKAGE / "vectors").glob("*.py"))]


def finetune_help() -> str:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices["finetune"].format_help().split())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_carries_its_whole_spec(name):
    spec = METHODS[name]
    assert spec.name == name
    assert spec.default_lr > 0 and spec.help and spec.peft_files
    errors = spec.error_cases()
    assert errors and all(case.when and case.says for case in errors), f"{name}: no error cases"
    if spec.golden_cases:
        assert not spec.golden_cases_of
    else:  # no cases of its own: another method's compute its numbers
        assert METHODS[spec.golden_cases_of].golden_cases, f"{name}: no golden cases, and none of another method's"
    help_line = f"{name} {spec.help} (lr {spec.default_lr:g})"  # its line of --method's list
    assert " ".join(help_line.split()) in finetune_help(), f"{name}: no --help line"
    for flag in spec.flags:
        assert flag.names[0] in finetune_help(), f"{name}: {flag.names[0]} not in --help"


@pytest.mark.parametrize("shape", [ODD_EPS, SMALL], ids=["odd", "small"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_example_builds_on_a_small_model(name, shape):
    config = tp.GPTConfig(**shape, dtype="float64")
    example = METHODS[name].example(config)
    assert example is None or isinstance(example, tp.PeftConfig)
    if example is not None:
        model = tp.get_peft_model(tp.GPT(config, seed=0), example)
        assert model.trainable_parameters()


def test_one_default_method_and_distinct_cases():
    assert build_parser().parse_args(["finetune"]).method == default_method()
    names = [case.name for case in golden_cases()]
    assert len(names) == len(set(names))
    owners = {case.label: name for name, spec in METHODS.items() for case in spec.golden_cases}
    for name, spec in METHODS.items():  # a label belongs to one method
        assert all(owners[case.label] == name for case in spec.golden_cases)
    whens = [case.when for spec in METHODS.values() for case in spec.error_cases()]
    assert len(whens) == len(set(whens))


def test_the_methods_that_load_in_peft_say_how_their_files_map():
    for name, spec in METHODS.items():
        if spec.loads_in_peft:
            assert "PEFT's" in spec.peft_files, name
        else:  # what to use instead
            assert "PEFT has no" in spec.peft_files or "no adapter" in spec.peft_files, name


def method_names() -> dict[str, re.Pattern]:
    """What naming a method in code looks like: its name or golden label as a string, its config, adapter or
    module, or one of its options."""
    names = {*METHODS, *(case.label for case in golden_cases())}
    classes = {cls.__name__ for cls in CONFIG_TYPES.values()} | {
        name for path in (PACKAGE / "methods").glob("*.py") for name in re.findall(r"^class (\w+Adapter)\b",
                                                                                    path.read_text(), re.M)
    }  # fmt: skip
    modules = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base", "registry"}
    flags = {flag for spec in METHODS.values() for f in spec.flags for flag in f.names}
    dests = {f.dest for spec in METHODS.values() for f in spec.flags}
    return {
        **{f"the string {n!r}": re.compile(rf"""["']{re.escape(n)}["']""") for n in names},
        **{c: re.compile(rf"\b{c}\b") for c in classes},
        **{f"methods.{m}": re.compile(rf"methods\.{m}\b|from \.{m} import") for m in modules},
        **{f"option {f}": re.compile(rf"""["']{re.escape(f)}["']""") for f in flags},
        **{f"args.{d}": re.compile(rf"\bargs\.{d}\b") for d in dests},
    }


@pytest.mark.parametrize("path", READERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_command_line_and_the_vectors_name_no_method(path):
    text = path.read_text()
    named = [what for what, pattern in method_names().items() if pattern.search(text)]
    assert not named, f"{path.name} names {named}: read it from the registry (MethodSpec) instead"


def test_the_name_check_sees_a_method_named():
    patterns = method_names()
    assert patterns["the string 'lora'"].search("method = 'lora'")
    assert patterns["LoraConfig"].search("from .methods import LoraConfig")
    assert patterns["methods.lora"].search("from .methods.lora import LoraAdapter")
    assert patterns["option --rank"].search('g.add_argument("--rank", type=int)')
    assert patterns["args.rank"].search("r=args.rank")
