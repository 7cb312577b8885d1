"""The largest relative errors docs/loha.md and docs/lokr.md report, over N hypothesis-drawn cases of each kind:
hand vs autograd and the directional check (the harness in eval mode; check_gradients in training mode with
dropout), merged vs unmerged, and tinypeft vs PEFT on the nn.Linear twin (logits, loss, gradients; eval and
training mode). The tests assert the tolerances; this prints the figures.

    python tests/hf/measure_lycoris.py loha 200      # from the repository root; minutes on 2 busy cores
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "hf")]

import lycoris_strategies as ls  # noqa: E402
import test_lycoris_peft as hf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from strategies import cases, gpt_configs  # noqa: E402

import tinypeft as tp  # noqa: E402
from tinypeft.gradcheck import check_gradients  # noqa: E402
from tinypeft.harness import Batch, HarnessCase, check_case  # noqa: E402


def measure(method: str, n: int) -> dict[str, float]:
    configs = getattr(ls, f"{method}_configs")
    worst: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    drawn = settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)

    @drawn
    @given(gpt_configs(max_layers=2, min_embd=3), st.integers(1, 3), st.integers(2, 9),
           st.sampled_from(["none", "mixed", "ends"]), st.integers(0, 2**16), configs())  # fmt: skip
    def harness(cfg, B, T, padding, seed, config):
        report = check_case(lambda _: config, HarnessCase("m", cfg, Batch(B, T, padding), seed))
        assert not report.failures, report.failures
        note("autograd (eval)", max(e["autograd"] for e in report.gradients.values()))
        directional = [e["directional"] for e in report.gradients.values()]
        note("directional (eval)", max([*directional, report.directional_all]))
        note("merged vs unmerged", report.merge)

    @drawn
    @given(cases(min_len=2, min_embd=3), configs(dropout=True))
    def training(case, config):
        model = tp.get_peft_model(case.model, config, seed=case.seed).train()
        ls.perturb_adapter(model, case.seed)
        report = check_gradients(model, case.ids, labels=case.labels, attention_mask=case.mask)
        note("autograd (training, dropout)", max(e["autograd"] for e in report.values()))
        note("directional (training, dropout)", max(e["directional"] for e in report.values()))

    @drawn
    @given(cases(min_len=2, min_embd=3), configs(dropout=True), st.booleans())
    def peft(case, config, training):
        labels = hf.visible_labels(case.labels, case.mask)
        if not (labels[:, 1:] != -100).any():
            return
        model = tp.get_peft_model(case.model, config, seed=case.seed).train(training)
        ls.perturb_adapter(model, case.seed)
        diffs = hf.compare(model, hf.peft_twin(model), case.ids, labels, case.mask)
        mode = "training, dropout" if training else "eval"
        note(f"PEFT logits ({mode})", diffs.pop("logits"))
        note(f"PEFT loss ({mode})", diffs.pop("loss"))
        note(f"PEFT gradients ({mode})", max(diffs.values()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in (harness, training, peft):
            run()
    return worst


if __name__ == "__main__":
    name, count = sys.argv[1], int(sys.argv[2])
    for key, value in measure(name, count).items():
        print(f"{name} {key}: {value:.2e}")
