"""The PyTorch port in examples/port_torch, written from docs/ alone, passes freshly exported golden vectors
at their tolerances; it imports neither tinypeft nor transformers nor peft; and breaking any one of its
formulas makes the cases that formula serves fail. Run with -rP to see the port's measured errors."""

from __future__ import annotations

import ast
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tinypeft.cli import main
from tinypeft.vectors import DTYPES, SPECS, Case, check_vectors, load_impl

PORT = Path(__file__).resolve().parents[2] / "examples" / "port_torch" / "port.py"
ALLOWED_IMPORTS = {"__future__", "math", "re", "collections.abc", "typing", "numpy", "torch"}


def test_the_port_passes_every_case_at_the_stated_tolerances(vectors, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = main(["check-vectors", str(vectors), "--impl", str(PORT), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    cases = json.loads(report.read_text())["cases"]
    assert len(cases) == len(SPECS) * len(DTYPES) and all(c["passed"] for c in cases)
    assert all(t["passed"] is True for c in cases for t in c["tensors"]), "every derived tensor is checked too"
    worst: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for case in cases:
        for t in case["tensors"]:
            kind = t["tensor"] if t["tensor"] in ("loss", "logits") else "derived" if " " in t["tensor"] else "grads"
            cell = worst[(case["method"], case["dtype"])]
            cell[kind] = max(cell.get(kind, 0.0), t["error"])
    print(f"{'method':20s}{'dtype':9s}{'loss':>10s}{'logits':>10s}{'grads':>10s}{'derived':>10s}")
    for (method, dtype), cell in sorted(worst.items()):
        row = "".join(f"{cell[k]:10.1e}" if k in cell else f"{'':10s}" for k in ("loss", "logits", "grads", "derived"))
        print(f"{method:20s}{dtype:9s}{row}")


def test_the_port_imports_no_tinypeft_transformers_or_peft():
    """Only the standard library, NumPy and PyTorch: what it knows of tinypeft comes from docs/."""
    imported = set()
    for node in ast.walk(ast.parse(PORT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS


# ------------------------------------------------------------------ break one formula, see the vectors fail
@dataclass(frozen=True)
class Mutation:
    """A wrong formula: `old` (which must occur exactly once in the port) replaced by `new`, and the cases
    it must make fail."""

    old: str
    new: str
    breaks: Callable[[Case], bool]


def everything(case: Case) -> bool:
    return True


def lora_scaling(case: Case) -> float:
    cfg = case.method_config
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])


def is_lora(case: Case, **fields: object) -> bool:
    cfg = case.method_config or {}
    return cfg.get("peft_type") == "LORA" and all(cfg.get(k) == v for k, v in fields.items())


def loss_reads_a_query_that_sees_nothing(case: Case) -> bool:
    """A left-padded row whose last pad predicts its first token, with no virtual token in front to see."""
    virtual = "num_virtual_tokens" in (case.method_config or {})
    return case.attention_mask is not None and not case.attention_mask[:, 0].all() and not virtual


MUTATIONS = {
    "LayerNorm with the unbiased variance": Mutation(
        "((x - mean) ** 2).mean(-1, keepdim=True)", "((x - mean) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)",
        everything),
    "LayerNorm ignores the config's epsilon": Mutation(
        "torch.sqrt(var + eps)", "torch.sqrt(var + 1e-5)", lambda c: c.model_config["layer_norm_epsilon"] != 1e-5),
    "GELU in its erf form": Mutation(
        "0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))",
        "0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))", everything),
    "scores scaled by 1/sqrt(C), not 1/sqrt(head size)": Mutation(
        "/ math.sqrt(C // n_head)", "/ math.sqrt(C)", lambda c: c.model_config["n_head"] > 1),
    "q, k, v split in another order": Mutation(
        "heads(qkv[..., :C]), heads(qkv[..., C : 2 * C])", "heads(qkv[..., C : 2 * C]), heads(qkv[..., :C])",
        everything),
    "causal mask off by one": Mutation(
        "torch.arange(P + T)[None, :] <= (P + torch.arange(T))", "torch.arange(P + T)[None, :] < (P + torch.arange(T))",
        everything),
    "padding mask ignored": Mutation(
        "(mask[:, None, None, :] != 0)", "(mask[:, None, None, :] != 2)", lambda c: c.attention_mask is not None),
    "hidden scores added to, as transformers does, not replaced": Mutation(
        "torch.where(visible, scores, torch.finfo(scores.dtype).min)",
        "scores + torch.where(visible, torch.zeros_like(scores), torch.finfo(scores.dtype).min)",
        loss_reads_a_query_that_sees_nothing),
    "final LayerNorm skipped": Mutation(
        'return self.ln("transformer.ln_f", x) @', "return x @", everything),
    "ignored labels counted in the loss": Mutation(
        "labels[:, 1:].reshape(-1), ignore_index=-100", "labels[:, 1:].reshape(-1).clamp(min=0)", everything),
    "rsLoRA scaled by alpha / r": Mutation(
        'cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])', 'cfg["lora_alpha"] / cfg["r"]',
        lambda c: is_lora(c, use_rslora=True) and c.method_config["r"] > 1),
    # issue 17: DoRA with rsLoRA was tested at r = 1 only, where this port passed every case
    "rsLoRA ignored under DoRA": Mutation(
        'if cfg["use_rslora"] else', 'if cfg["use_rslora"] and not cfg["use_dora"] else',
        lambda c: is_lora(c, use_rslora=True, use_dora=True) and c.method_config["r"] > 1),
    "IA3's feed-forward entries matched with a '.' boundary": Mutation(
        "module.endswith(tuple(ff))", 'any(module == f or module.endswith("." + f) for f in ff)',
        lambda c: c.method == "ia3" and c.method_config["feedforward_modules"] == ["_proj"]),
    "LoRA without its scaling": Mutation(
        "x @ W + b + s * (x @ A.T) @ B.T", "x @ W + b + (x @ A.T) @ B.T",
        lambda c: is_lora(c, use_dora=False) and lora_scaling(c) != 1),
    "DoRA's norm not detached": Mutation(
        ".norm(dim=0).detach()", ".norm(dim=0)", lambda c: is_lora(c, use_dora=True)),
    "DoRA rescales the bias too": Mutation(
        "(m / norm) * (x @ W + s * (x @ A.T) @ B.T) + b", "(m / norm) * (x @ W + s * (x @ A.T) @ B.T + b)",
        lambda c: is_lora(c, use_dora=True)),
    "PiSSA's residual from the trained factors, not the SVD": Mutation(
        "W = pissa_residual(W, r, s)",
        'W = W - s * (p[f"{PEFT}{module}.lora_B.weight"] @ p[f"{PEFT}{module}.lora_A.weight"]).T.detach()',
        lambda c: is_lora(c, init_lora_weights="pissa")),
    "virtual tokens appended instead of prepended": Mutation(
        "torch.cat([table.expand(B, -1, -1), x], 1)", "torch.cat([x, table.expand(B, -1, -1)], 1)",
        lambda c: c.method == "prompt_tuning"),
    "prefix table laid out [key/value][layer]": Mutation(
        "(kv[2 * i].expand(shape), kv[2 * i + 1].expand(shape))", "(kv[i].expand(shape), kv[L + i].expand(shape))",
        lambda c: c.method == "prefix_tuning"),
    "prefix: real tokens keep positions from 0": Mutation(
        'p["transformer.wpe.weight"][P : P + T]', 'p["transformer.wpe.weight"][:T]',
        lambda c: c.method == "prefix_tuning"),
    "prefix projection without its tanh": Mutation(
        "hidden = torch.tanh(E @", "hidden = (E @", lambda c: c.method == "prefix_tuning"
        and c.method_config["prefix_projection"]),
    "IA3 leaves the bias unscaled": Mutation(
        "(x @ W + b) * l", "(x @ W) * l + b", lambda c: c.method == "ia3"),
    "bottleneck adapter without its residual": Mutation(
        "return h + g @", "return g @", lambda c: c.method == "bottleneck_adapter"),
}  # fmt: skip


@pytest.mark.parametrize("name", MUTATIONS)
def test_breaking_one_formula_fails_the_cases_it_serves(name, cases, vectors, tmp_path):
    mutation = MUTATIONS[name]
    source = PORT.read_text()
    assert source.count(mutation.old) == 1, f"the port no longer holds {mutation.old!r} exactly once"
    broken = tmp_path / "broken_port.py"
    broken.write_text(source.replace(mutation.old, mutation.new))
    # float64 only, to keep the suite quick: its tolerance is the one that tells a wrong formula from rounding
    expected_to_fail = [c.name for c in cases if mutation.breaks(c) and c.dtype == "float64"]
    assert expected_to_fail, "the mutation must break some case"
    reports = check_vectors(vectors, load_impl(str(broken)), expected_to_fail)
    survivors = [r.name for r in reports if r.passed]
    assert not survivors, f"{name}: these cases still pass: {survivors}"
