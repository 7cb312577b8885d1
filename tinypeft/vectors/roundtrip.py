"""Adapter round trips: a port writes a case's adapter as PEFT does (adapter_model.safetensors, adapter_config.json,
PEFT's tensor names and shapes), tinypeft reads the folder back onto the case's base, and the logits are the case's.
Nothing new is stored: index.json lists the cases whose adapter makes the trip. A port opts in with
`save_adapter(input, folder)`; VECTORS.md says what the files hold.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import gpt
from ..backend import to_numpy
from ..io import load_safetensors
from ..model import GPT, GPTConfig, parameter_shapes
from ..peft_model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PeftModel, read_adapter
from .checker import CaseReport, TensorCheck, _raised, build_model, check_array
from .format import Case, listed

# one case of each way the file's names or shapes differ from the vectors': the trained biases of LoRA's bias="all"
# (`base_layer.bias`), IA3's (n, 1) and (1, n) vectors, the table prefix tuning's projection and P-tuning's encoder
# compute (the only tensor saved), VeRA's shared projections (saved though never trained)
CASES = ("lora-padded", "ia3-odd", "prefix_tuning-projection", "ptuning-mlp", "vera-odd")


@dataclass
class RoundTrip:
    name: str
    case: Case

    def port_input(self) -> dict[str, Any]:
        """What `save_adapter` gets (with the folder to write): the case's input, named after the round trip."""
        return {**self.case.port_input(), "name": self.name, "case": self.case.name}


def save_adapter(case: dict[str, Any], folder: str) -> None:
    """tinypeft itself behind the interface a port implements: save_pretrained of the case's adapter."""
    model, _ = build_model(case)
    model.save_pretrained(folder)


def export_round_trips(cases: Sequence[Case]) -> list[str]:
    """The names of the cases among `cases` whose adapters make the trip (what index.json lists)."""
    return [c.name for c in cases if c.name.removesuffix("-" + c.dtype) in CASES]


def load_round_trips(
    folder: str | os.PathLike, cases: Sequence[Case], patterns: Sequence[str] = ("*",)
) -> list[RoundTrip]:
    """The round trips index.json lists whose case is among `cases` (a listed case that is not is skipped)."""
    by_name = {c.name: c for c in cases}
    names = listed(os.fspath(folder), "round_trips")
    return [RoundTrip(f"{n.removesuffix('-' + by_name[n].dtype)}-roundtrip-{by_name[n].dtype}", by_name[n])
            for n in names if n in by_name]  # fmt: skip


def reference_files(t: RoundTrip) -> dict[str, np.ndarray]:
    """The tensors tinypeft's own save_pretrained writes for the case: the names and shapes a port's file must have."""
    model, _ = build_model(t.port_input(), device="cpu")
    return model.active.state_dict()


def compare_round_trip(t: RoundTrip, folder: str) -> CaseReport:
    """The port's folder read by tinypeft: every tensor of tinypeft's own file, under its name, of its shape, in
    the case's dtype, and nothing else; then the case's logits from the case's base and the folder's adapter."""
    case = t.case
    report = CaseReport(t.name, case.method, case.dtype)
    try:
        config, _ = read_adapter(folder)
    except Exception as e:
        report.failure = f"tinypeft could not read the folder save_adapter wrote {_raised(e)}"
        return report
    if config.peft_type != (case.method_config or {}).get("peft_type"):
        report.failure = f"{ADAPTER_CONFIG_NAME} says peft_type {config.peft_type!r}; the case is {case.method_config}"
        return report
    written = load_safetensors(os.path.join(folder, ADAPTER_WEIGHTS_NAME))
    want = reference_files(t)
    for name, value in want.items():
        got = written.get(name)
        note = (
            "missing" if got is None
            else f"shape {got.shape}, expected {value.shape}" if got.shape != value.shape
            else f"{got.dtype}, a {case.dtype} case's file holds {case.dtype}" if got.dtype != np.dtype(case.dtype)
            else ""
        )  # fmt: skip
        report.checks.append(TensorCheck(f"file {name}", math.inf if note else 0.0, 0.0, not note, note))
    for name in sorted(set(written) - set(want)):
        report.checks.append(TensorCheck(f"file {name}", math.inf, 0.0, False, "a tensor PEFT's file does not hold"))
    if not report.passed:
        return report
    config_of_model = GPTConfig(**case.model_config, dtype=case.dtype)
    base = GPT(config_of_model, device="cpu")
    base.load_state_dict({n: case.weights[n] for n in parameter_shapes(config_of_model)})
    try:
        model = PeftModel.from_pretrained(base, folder)  # as a user loads an adapter from PEFT
    except Exception as e:
        report.failure = f"tinypeft could not load the adapter save_adapter wrote {_raised(e)}"
        return report
    view = model.view()
    logits = gpt.forward(view.params, view.config, *view.check_inputs(case.input_ids, case.attention_mask), view.sites)
    report.checks.append(check_array("logits", to_numpy(logits[0]), case.logits, case.tolerances["logits"], case.dtype))
    return report


def check_round_trips(vectors: Sequence[RoundTrip], save: Callable[[dict[str, Any], str], Any]) -> list[CaseReport]:
    """Run a port's save_adapter on every round trip into a fresh folder and read it back; what it raises fails it."""
    reports = []
    for t in vectors:
        with tempfile.TemporaryDirectory() as folder:
            try:
                with np.errstate(all="ignore"):
                    save(t.port_input(), folder)
                    report = compare_round_trip(t, folder)
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                report = CaseReport(t.name, t.case.method, t.case.dtype, failure=f"save_adapter {_raised(e)}")
        reports.append(report)
    return reports
