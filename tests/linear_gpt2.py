"""A transformers GPT-2 whose Conv1D layers are nn.Linear layers, for the cross-checks of methods PEFT applies
to nn.Linear only (OFT, BOFT): PEFT 0.21.2 refuses GPT-2's Conv1D for them.

GPT-2's Conv1D computes y = x W + b with W stored (in, out); nn.Linear computes y = x Wᵀ + b with W stored
(out, in). `hf_utils.linear_twin` swaps every Conv1D of the transformers twin for an
nn.Linear holding the transposed weight and the same bias, so the model computes the same function, and
PEFT's OFT/BOFT can wrap its c_attn, c_proj and c_fc. The module names (transformer.h.0.attn.c_attn, ...)
do not change, so PEFT's tensor names are tinypeft's. Then the helpers of the comparisons: a PEFT model holding
a tinypeft adapter's tensors, and the float64 differences of logits, loss and every gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import peft
import torch
from hf_utils import hf_causal_lm_loss, linear_twin, torch_float64

import tinypeft as tp
from tinypeft.gradcheck import relative_error


def peft_name_to_ours(name: str) -> str:
    """PEFT's in-memory name of a trainable tensor -> tinypeft's (PEFT's file name): drop the adapter name,
    `...oft_R.default.weight` -> `...oft_R.weight`, `...boft_s.default` -> `...boft_s`."""
    return name.replace(".default.", ".").removesuffix(".default")


def peft_trainable(pm: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in pm.named_parameters() if p.requires_grad}


def peft_linear_twin(ours: tp.PeftModel, peft_config: Any) -> Any:
    """PEFT's model of `peft_config` on the nn.Linear twin of ours' base, in float64, holding ours' tensors."""
    with torch_float64():
        pm = peft.get_peft_model(linear_twin(ours.base_model), peft_config).double().eval()
    params = ours.trainable_parameters()
    copied = set()
    for name, p in peft_trainable(pm).items():
        with torch.no_grad():
            p.copy_(torch.tensor(np.asarray(params[peft_name_to_ours(name)])).reshape(p.shape))
        copied.add(peft_name_to_ours(name))
    assert copied == set(params)  # the same trainable tensors, one to one
    return pm


def compare_with_peft(ours: tp.PeftModel, pm: Any, ids: np.ndarray, labels: np.ndarray, mask: Any) -> dict:
    """Relative differences of logits, loss (the float64 shifted cross-entropy, hf_causal_lm_loss) and each
    trainable tensor's gradient, by tinypeft's name. A gradient under 1/1000 of the largest is compared on that
    scale (as tests/hf/test_hf_gpt2.py does)."""
    out = pm(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    diffs = {"logits": relative_error(ours(ids, mask), out.logits.detach().numpy())}
    reference_loss = hf_causal_lm_loss(out.logits, torch.tensor(labels))
    reference_loss.backward()
    loss, grads = ours.loss_and_grad(ids, labels, mask)
    diffs["loss"] = abs(loss - reference_loss.item()) / abs(reference_loss.item())
    reference = {peft_name_to_ours(n): p.grad.numpy() for n, p in peft_trainable(pm).items()}
    assert set(grads) == set(reference)
    floor = 1e-3 * max(np.linalg.norm(g) for g in grads.values())
    diffs |= {n: relative_error(g, reference[n].reshape(g.shape), floor) for n, g in grads.items()}
    return diffs


def without_unseen_predictions(labels: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Drop targets predicted from a query that sees no key (left padding, nothing in front): the two libraries'
    gradients differ there by design (tests/hf/test_hf_gpt2.py::test_a_query_that_sees_nothing)."""
    if mask is None:
        return labels
    sees_something = np.cumsum(mask, axis=1) > 0
    labels = labels.copy()
    labels[:, 1:][~sees_something[:, :-1]] = -100
    return labels
