"""How close a port must come: one tolerance per tensor, by dtype and kind, written into every case
(and their reasons into index.json)."""

from __future__ import annotations

from typing import Any

from .format import Case

FLOAT64_TOLERANCE = 1e-10
# float32, per kind of tensor: the unit roundoff is 6e-8, and what a correct float32 implementation loses
# grows with the depth of the computation and with sums of many terms that cancel. What tinypeft in float32 and
# the torch port reach on these cases is measured by tests/vectors/vectors_page.py and printed in VECTORS.md
# (the tolerances are many times that). Telling a wrong formula from rounding is the float64 cases' job.
FLOAT32_TOLERANCES = {
    "loss": 1e-5,  # a mean of log-softmax terms: rounding of the logits, barely amplified
    "logits": 1e-5,  # two blocks of matmuls, LayerNorms and softmaxes
    "gradient": 1e-4,  # the backward is twice as deep as the forward, and differences of softmax terms
    "layernorm_weight": 3e-4,  # sum over B*T rows of dy * xhat, whose terms cancel (llm.c #228)
    "derived": 1e-4,  # PiSSA's residual, with room for an SVD in float32 as PEFT computes it
}
TOLERANCE_NOTES = {
    "metric": "error = ||got - want||_2 / ||want||_2 over all elements (|got - want| / |want| for the loss); "
    "a tensor passes when error <= its tolerance",
    "float64": "1e-10 for everything: tinypeft, autograd and PEFT agree to ~1e-14 on these computations, so a "
    "correct float64 port lands near 1e-14; 1e-10 leaves room for another order of summation and nothing else",
    "float32": "the expected values are exact (float64) for the stored float32 weights, so the error is the "
    "port's own float32 rounding: logits and loss 1e-5, gradients 1e-4, LayerNorm weight gradients 3e-4 (a "
    "sum over every position of terms that cancel: the most fragile tensor in float32), PiSSA's residual 1e-4",
}


def tolerance_for(dtype: str, kind: str, name: str = "") -> float:
    """The tolerance of a tensor: kind is "loss", "logits", "gradient" or "derived"."""
    if dtype == "float64":
        return FLOAT64_TOLERANCE
    if kind == "gradient" and name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return FLOAT32_TOLERANCES["layernorm_weight"]
    return FLOAT32_TOLERANCES[kind]


def tolerances(case: Case) -> dict[str, Any]:
    """The tolerances of every tensor of a computed case, as case.json holds them."""
    return {
        "loss": tolerance_for(case.dtype, "loss"),
        "logits": tolerance_for(case.dtype, "logits"),
        "grads": {n: tolerance_for(case.dtype, "gradient", n) for n in case.grads},
        "derived": {n: tolerance_for(case.dtype, "derived", n) for n in case.derived},
    }
