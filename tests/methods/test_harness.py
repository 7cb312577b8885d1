"""The shared gradient harness (tinypeft/harness.py).

- Every registered method passes it: hand-written gradients = autograd's = finite differences, the engine
  = the reference GPT bitwise, the public loss_and_grad = the engine, and merged = unmerged.
- The toy method of examples/own_method (SSF, one file, registered by one line) passes it with no edit
  anywhere in tinypeft, and its config loads from adapter_config.json.
- It catches what it exists to catch: a backward off by 0.1%, a wrong merge, a merge that writes the base
  in place, an inexact unmerge, a site whose `owned` forgets its tensors, a backward that computes a frozen
  weight's gradient, a tensor no case checks (a zero gradient), and DoRA checked without its norm held.

The example is imported by path, and its registrations are taken back after each test: no other test sees
a method the package does not ship.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import gpt_configs

import tinypeft as tp
from tinypeft import harness
from tinypeft.harness import DEFAULT_CASES, HarnessCase, HarnessError, Tolerances, check_case, check_method
from tinypeft.methods.base import CONFIG_TYPES
from tinypeft.methods.registry import METHODS, Batch, ErrorCase, as_is

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_method"


@contextlib.contextmanager
def own_method() -> Iterator[ModuleType]:
    """examples/own_method/ssf.py, imported by path as the module `ssf` (as check.py imports it), for the
    duration of the block; then the method registry, the config types and sys.modules are as they were."""
    methods, config_types, saved = dict(METHODS), dict(CONFIG_TYPES), sys.modules.get("ssf")
    spec = importlib.util.spec_from_file_location("ssf", EXAMPLE / "ssf.py")
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


@pytest.fixture
def ssf() -> Iterator[ModuleType]:
    with own_method() as module:
        yield module


C_NOPE = (
    "target_modules entry 'c_nope' matches no module; the modules are ['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', "
    "'mlp.c_proj'] (full names like 'transformer.h.0.attn.c_attn')"
)
SSF_TARGETS = ("attn.c_attn", "mlp.c_proj")  # what the toy's example config targets


def failed(report: harness.MethodReport) -> set[tuple[str, str]]:
    """(check, tensor) of every failure, over the cases."""
    return {(f.check, f.tensor) for f in report.failures}


# ------------------------------------------------------------------ every method passes
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_passes_the_harness(name):
    report = check_method(name)  # raises HarnessError, naming case, check and tensor, on any failure
    assert report.ok and len(report.cases) == len(DEFAULT_CASES)
    assert report.max_error("autograd") <= 1e-10 and report.max_error("directional") <= 1e-6
    assert all(c.gradients for c in report.cases), "every case trains something"
    if METHODS[name].example(DEFAULT_CASES[0].model) is None:  # the base model itself: nothing to merge
        assert report.max_error("merge") is None


def test_the_toy_method_passes_with_no_edit_anywhere_else(ssf):
    assert METHODS["ssf"] is ssf.SPEC and CONFIG_TYPES["SSF"] is ssf.SSFConfig  # its one line, its decorator
    report = check_method("ssf")
    assert report.ok
    assert report.max_error("autograd") <= 1e-13  # measured ~1e-15
    assert report.max_error("directional") <= 1e-8  # measured ~1e-10
    assert report.max_error("loss_and_grad") <= 1e-12
    assert report.max_error("merge") <= 1e-14  # measured ~4e-16
    assert len(report.error_cases) == 2 and not report.error_failures  # its ErrorCases raise what they say
    names = {name for case in report.cases for name in case.gradients}
    assert {n.rsplit(".", 1)[1] for n in names} == {"ssf_scale", "ssf_shift"}
    for source in (ROOT / "tinypeft").rglob("*.py"):  # the package does not know the method
        assert not re.search(r"\b(?:ssf|SSF)", source.read_text()), source


def test_the_toy_method_starts_as_the_base_and_loads_from_its_files(ssf, tmp_path):
    base = tp.GPT(tp.GPTConfig(vocab_size=17, n_positions=16, n_embd=8, n_layer=2, n_head=2, dtype="float64"))
    ids = np.random.default_rng(0).integers(0, 17, size=(2, 6))
    model = tp.get_peft_model(base, ssf.SSFConfig())
    np.testing.assert_array_equal(model(ids), base(ids))  # γ = 1, β = 0: the base, bit for bit
    model = tp.get_peft_model(base, ssf.SSFConfig(target_modules=["c_fc"], init_ssf_weights=False), seed=1)
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(base, tmp_path)
    assert isinstance(loaded.active.config, ssf.SSFConfig) and loaded.active.config.target_modules == ["c_fc"]
    np.testing.assert_array_equal(loaded(ids), model(ids))


def test_the_toy_method_s_golden_case_exports_and_checks(tmp_path):
    """Imported before tinypeft.vectors (in a process of its own: the vectors read the registry once), the
    toy's golden case is exported like a built-in method's, and tinypeft, as a port, passes it."""
    script = (
        f"import sys; sys.path.insert(0, {str(EXAMPLE)!r}); import ssf\n"
        "from tinypeft.vectors import check_vectors, export_vectors, run_case\n"
        f"print(export_vectors({str(tmp_path)!r}, patterns=['ssf-*']))\n"
        f"assert all(r.passed for r in check_vectors({str(tmp_path)!r}, run_case))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['ssf-all-float64', 'ssf-all-float32']"


@settings(max_examples=10, deadline=None)
@given(
    cfg=gpt_configs(max_layers=3, min_embd=3),
    B=st.integers(1, 3),
    T=st.integers(2, 8),
    padding=st.sampled_from(["none", "mixed", "ends"]),
    seed=st.integers(0, 2**16),
)
def test_the_toy_method_passes_over_drawn_cases(cfg, B, T, padding, seed):
    """The harness driven by hypothesis: check_case on a drawn model shape and batch."""
    case = HarnessCase("drawn", cfg, Batch(B, T, padding), seed)
    with own_method() as ssf:
        report = check_case(ssf.SPEC.example, case)
    assert not report.failures, report.failures
    assert report.merge is not None and report.merge <= 1e-12


# ------------------------------------------------------------------ it catches what it must
def scaled(fn, index: int, factor: float = 1.001):
    """fn with its output number `index` multiplied by factor: a backward off by 0.1%."""

    def wrong(*args, **kwargs):
        out = list(fn(*args, **kwargs))
        out[index] = out[index] * factor
        return tuple(out)

    return wrong


@pytest.mark.parametrize(("output", "tensor"), [(1, "ssf_scale"), (2, "ssf_shift"), (0, "dx")])
def test_a_backward_off_by_a_tenth_of_a_percent_is_caught(ssf, monkeypatch, output, tensor):
    monkeypatch.setattr(ssf, "ssf_backward", scaled(ssf.ssf_backward, output))
    report = check_method("ssf", DEFAULT_CASES[:2], raise_on_failure=False)
    assert not report.ok
    checks = {check for check, _ in failed(report)}
    assert {"autograd", "directional"} <= checks  # autograd and finite differences each see it
    suffixes = {name.rsplit(".", 1)[-1] for _, name in failed(report)}
    if tensor == "dx":  # a wrong dx reaches every tensor below the layer: layer 0's c_attn, say
        assert any(".h.0.attn.c_attn.ssf_" in name for _, name in failed(report))
    else:
        assert tensor in suffixes
    with pytest.raises(HarnessError, match=r"\[1 layer, 1 head, B=1\] autograd of base_model\.model\..*ssf_"):
        check_method("ssf", DEFAULT_CASES[:1])


def merge_forgetting_the_shift(self, base_params):
    for module, (gamma, _beta) in self.tensors.items():
        w, b = module + ".weight", module + ".bias"
        base_params[w] = base_params[w] * self.params[gamma][None, :]
        base_params[b] = base_params[b] * self.params[gamma]


def merge_slightly_off(self, base_params):
    for module, (gamma, beta) in self.tensors.items():
        w, b = module + ".weight", module + ".bias"
        base_params[w] = base_params[w] * (self.params[gamma] * (1 + 1e-9))[None, :]
        base_params[b] = base_params[b] * self.params[gamma] + self.params[beta]


def merge_in_place(self, base_params):
    for module, (gamma, beta) in self.tensors.items():
        w, b = module + ".weight", module + ".bias"
        base_params[w] *= self.params[gamma][None, :]  # writes the base model's own array
        base_params[b] = base_params[b] * self.params[gamma] + self.params[beta]


def unmerge_by_dividing(self, base_params, originals):
    for module, (gamma, beta) in self.tensors.items():
        w, b = module + ".weight", module + ".bias"
        base_params[w] = base_params[w] / self.params[gamma][None, :]  # rounds: not the exact original
        base_params[b] = (base_params[b] - self.params[beta]) / self.params[gamma]


@pytest.mark.parametrize(
    ("method", "wrong", "expected"),
    [
        ("merge", merge_forgetting_the_shift, {("merge", "logits")}),
        ("merge", merge_slightly_off, {("merge", "logits")}),  # 1e-9: the tolerance is 1e-12
        ("merge", merge_in_place, {("merge_and_unload changed the base", "transformer.h.0.attn.c_attn.weight")}),
        ("unmerge", unmerge_by_dividing, {("unmerge", "logits"), ("unmerge", "transformer.h.0.attn.c_attn.weight")}),
    ],
    ids=["forgets_the_shift", "off_by_1e-9", "writes_the_base_in_place", "unmerges_by_dividing"],
)
def test_a_wrong_merge_is_caught(ssf, monkeypatch, method, wrong, expected):
    monkeypatch.setattr(ssf.SSFAdapter, method, wrong)
    report = check_method("ssf", DEFAULT_CASES[:1], raise_on_failure=False)
    assert expected <= {(check, tensor.split(" ")[0]) for check, tensor in failed(report)}, report.failures
    assert {check for check, _ in failed(report)} <= {"merge", "unmerge", "merge_and_unload changed the base"}


def test_a_site_that_misplaces_or_ignores_trainable_is_caught(ssf, monkeypatch):
    """`owned` forgetting the site's own tensors leaves the engine unable to place them (reported, not raised);
    a backward that computes a frozen weight's gradient anyway breaks "frozen means free"."""
    with monkeypatch.context() as m:
        m.setattr(ssf.SSFSite, "owned", lambda self, module: (module + ".weight", module + ".bias"))
        report = check_method("ssf", DEFAULT_CASES[:1], raise_on_failure=False)
    assert {check for check, _ in failed(report)} == {"gradients", "engine"}
    assert all(name.startswith("raised KeyError: 'base_model.model.") for _, name in failed(report))

    original = ssf.SSFSite.backward

    def computes_frozen_dW(self, dy, cache, trainable, need_dx=True):
        return original(self, dy, cache, {*trainable, cache[0] + ".weight"}, need_dx)  # dW, frozen or not

    monkeypatch.setattr(ssf.SSFSite, "backward", computes_frozen_dW)
    report = check_method("ssf", DEFAULT_CASES[:1], raise_on_failure=False)
    assert failed(report) == {("engine", f"transformer.h.0.{m}.weight (computed, but frozen)") for m in SSF_TARGETS}


def test_an_error_case_that_does_not_hold_is_caught(ssf):
    wrong = (
        ErrorCase("says what it does not", as_is, tp.ConfigError, ("c_nope", "no such words"),
                  config=lambda: ssf.SSFConfig(target_modules=["c_nope"])),
        ErrorCase("the wrong error type", as_is, tp.InputError, ("c_nope",),
                  config=lambda: ssf.SSFConfig(target_modules=["c_nope"])),
        ErrorCase("refuses nothing", lambda model: model, tp.ConfigError, ("anything",), config=ssf.SSFConfig),
    )  # fmt: skip
    spec = dataclasses.replace(ssf.SPEC, error_cases=lambda: wrong)
    failures = {f.check: f.tensor for f in harness.check_error_cases(spec)}
    assert failures == {
        "says what it does not": f"expected ConfigError, raised ConfigError: {C_NOPE} (missing ['no such words'])",
        "the wrong error type": f"expected InputError, raised ConfigError: {C_NOPE}",
        "refuses nothing": "expected ConfigError, raised nothing",
    }
    report = check_method(spec, DEFAULT_CASES[:1], raise_on_failure=False)
    assert {f.case for f in report.failures} == {"error cases"} and len(report.failures) == 3


def test_a_tensor_no_case_checks_is_a_failure():
    """LoRA's B = 0 at init makes dA zero: a gradient check there proves nothing about dA. The harness moves
    every adapter tensor off its init, so it takes a method that zeroes a gradient itself to show it."""
    report = check_method(lambda cfg: tp.LoraConfig(r=1, init_lora_weights=False), DEFAULT_CASES[:2])
    assert report.ok
    for case in report.cases:  # pretend every case found dA zero
        case.zero_gradients = [n for n in case.gradients if "lora_A" in n]
    assert not report.ok and {check for check, _ in failed(report)} == {"zero gradient"}
    assert {name for _, name in failed(report)} == {n for c in report.cases for n in c.gradients if "lora_A" in n}
    report.cases[0].zero_gradients = []  # the 1-layer case checks layer 0's: layer 1's stay unchecked
    assert {name for _, name in failed(report)} == {
        n for n in report.cases[1].gradients if ".h.1." in n and "lora_A" in n
    }
    report.cases[1].zero_gradients = []  # the 2-layer case checks them all: enough
    assert report.ok


def test_dora_is_checked_with_its_norm_held(monkeypatch):
    """DoRA's weight norm is a constant to its backward (as in PEFT), so finite differences of the plain
    forward disagree with the hand gradient of A and B; the harness differentiates the forward with the norm
    held at its value (the site's holding_norms), whose true derivative the hand gradient is."""
    dora = lambda cfg: tp.LoraConfig(r=2, use_dora=True, target_modules=["c_attn"], init_lora_weights=False)  # noqa: E731
    assert check_method(dora, DEFAULT_CASES[:2]).ok
    monkeypatch.setattr(harness, "_held_view", lambda view: None)
    report = check_method(dora, DEFAULT_CASES[:2], raise_on_failure=False)
    assert {check for check, _ in failed(report)} == {"directional"}
    assert all("lora_A" in name or "lora_B" in name or "all tensors" in name for _, name in failed(report))


def test_the_harness_refuses_what_it_cannot_check():
    with pytest.raises(tp.ConfigError, match="unknown method 'nope'"):
        check_method("nope")
    with pytest.raises(TypeError, match="a method name, a MethodSpec or a config factory"):
        check_method(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="T >= 2"):
        check_case(lambda cfg: None, HarnessCase("one token", DEFAULT_CASES[0].model, Batch(2, 1)))
    tight = Tolerances(autograd=0.0)  # nothing is exactly equal: every tensor fails, by name
    report = check_method(lambda cfg: tp.IA3Config(init_ia3_weights=False), DEFAULT_CASES[:1], tolerances=tight,
                          raise_on_failure=False)  # fmt: skip
    assert {check for check, _ in failed(report)} == {"autograd"}
    assert {name for _, name in failed(report)} == set(report.cases[0].gradients)


def test_the_check_script_exits_1_on_a_failure(ssf, monkeypatch, capsys):
    """examples/own_method/check.py as a user runs it, with the backward broken: exit status 1, and the failing
    tensors named (test_examples.py runs it unbroken, as a subprocess)."""
    monkeypatch.setattr(ssf, "ssf_backward", scaled(ssf.ssf_backward, 1))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("own_method_check", EXAMPLE / "check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)  # its `import ssf` finds the module above, broken
    assert check.main(["--quick"]) == 1
    out = capsys.readouterr()
    assert "FAILED [1 layer, 1 head, B=1] autograd of base_model.model.transformer.h.0" in out.out
    assert "ssf_scale" in out.out and "FAILED" in out.err
