"""VeRA against Hugging Face PEFT on the transformers twin of the same GPT-2 (GPT-2's Conv1D, which PEFT's VeRA
accepts directly), in float64.

- The shared projections: `torch_kaiming_uniform` (NumPy) equals PEFT's `_kaiming_init` on a torch.Generator bit
  for bit, and the A and B PEFT's VeraModel holds equal ours for the same config.
- The same config, our λ_d, λ_b (and trained biases) copied into PEFT's model, and our A and B into its buffers:
  logits, the loss and every trained tensor's gradient agree to <= 1e-10 relative (measured ~1e-15), dropout
  with the same masks on both sides; the merged weights equal PEFT's `merge_and_unload` to <= 1e-12.
- Adapters saved by either library load in the other with equal logits, with save_projection True and False
  (False: each side redraws A and B from projection_prng_key), and `peft.get_peft_model_state_dict` loads as is.
"""

from __future__ import annotations

import math

import numpy as np
import peft
import pytest
import torch
from hf_utils import hf_causal_lm_loss, hf_twin
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_strategies import well_conditioned_cases
from peft.tuners.vera.model import _kaiming_init
from strategies import perturbed_model
from test_vera import perturb, vera_configs

import tinypeft as tp
from tinypeft import engine
from tinypeft.gradcheck import relative_error
from tinypeft.methods.vera import torch_kaiming_uniform

TOL = 1e-10  # the same float64 formulas on both sides; measured differences are ~1e-15
MERGE_TOL = 1e-12


def peft_config(config: tp.VeraConfig, **changes) -> peft.VeraConfig:
    """PEFT's VeraConfig from our adapter_config.json dict."""
    d = config.to_dict() | changes
    return peft.VeraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "base_model_name_or_path")})


def peft_projections(pm: peft.PeftModel) -> tuple[torch.Tensor, torch.Tensor]:
    return pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]


def peft_twin(model: tp.PeftModel) -> peft.PeftModel:
    """PEFT's model of `model`'s base and adapter in float64, eval mode, holding exactly our tensors: λ_d, λ_b and
    trained biases by name, and our A and B in its shared buffers (whatever save_projection says)."""
    twin = peft.get_peft_model(hf_twin(model.base_model), peft_config(model.active.config))
    state = {k: torch.tensor(v) for k, v in model.adapter_state_dict().items()}  # A and B with save_projection
    result = peft.set_peft_model_state_dict(twin, state)
    assert not result.unexpected_keys, result.unexpected_keys
    with torch.no_grad():
        for theirs, ours in zip(peft_projections(twin), (model.active.vera_A, model.active.vera_B), strict=True):
            theirs.copy_(torch.tensor(ours))
    return twin.eval()


class FixedDropout(torch.nn.Module):
    """Dropout with a given mask (0 or 1/(1-p)), standing in for PEFT's torch.nn.Dropout."""

    def __init__(self, keep: np.ndarray) -> None:
        super().__init__()
        self.keep = torch.tensor(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


def our_name(peft_name: str) -> str:
    """PEFT's in-memory parameter name -> the name it saves (and we use): no adapter name."""
    return peft_name.replace(".default", "")


# ------------------------------------------------------------------ the shared projections
@pytest.mark.parametrize("key", [0, 1, 7, 42, 2**32 + 5, 2**40 + 3, 2**63, 2**64 - 1, -1, -(2**63)])
def test_projections_are_torch_s_draw_bit_for_bit(key):
    shapes = [(256, 128), (384, 256), (5, 13), (1, 9), (40, 1)]
    generator = torch.Generator(device="cpu").manual_seed(key)
    theirs = [_kaiming_init(shape, generator=generator).numpy() for shape in shapes]
    ours = torch_kaiming_uniform(key, shapes)
    for shape, a, b in zip(shapes, ours, theirs, strict=True):
        assert a.dtype == np.float32 and a.shape == shape
        np.testing.assert_array_equal(a, b, err_msg=f"key {key}, shape {shape}")


@pytest.mark.parametrize(
    "config",
    [
        {},  # PEFT's defaults: r = 256 on c_attn
        {"r": 3, "target_modules": ["c_attn", "mlp.c_proj"], "projection_prng_key": 9},
        {"r": 7, "target_modules": ["attn.c_proj"], "d_initial": 0.5},
        {"r": 2, "target_modules": r".*\.h\.1\.mlp\.c_fc", "projection_prng_key": 2**33},
    ],
)
def test_peft_builds_the_same_projections_and_init(config):
    base = interchange_model()
    ours = tp.get_peft_model(base, tp.VeraConfig(**config))
    twin = peft.get_peft_model(hf_twin(base), peft_config(ours.active.config))
    A, B = peft_projections(twin)
    np.testing.assert_array_equal(ours.active.vera_A, A.numpy())
    np.testing.assert_array_equal(ours.active.vera_B, B.numpy())
    theirs = {our_name(k): v for k, v in peft.get_peft_model_state_dict(twin).items()}
    state = ours.adapter_state_dict()
    assert set(state) == set(theirs)
    for name, value in state.items():  # PEFT fills λ_d in float32 before the float64 cast: 0.1 -> 0.10000000149
        expected = value.astype(np.float32) if name.endswith("vera_lambda_d") else value
        np.testing.assert_array_equal(expected, theirs[name].numpy(), err_msg=name)


# ------------------------------------------------------------------ one forward and backward
def visible_rows(mask, shape):
    """Positions whose query sees at least one key (a query that sees nothing differs between the libraries by
    design: tests/hf/test_hf_gpt2.py)."""
    return np.ones(shape, dtype=bool) if mask is None else np.cumsum(mask, axis=1) > 0


@settings(max_examples=25)
@given(well_conditioned_cases(min_len=2), st.data())
def test_logits_loss_gradients_and_merge_match_peft(case, data):
    config = data.draw(vera_configs())
    model = perturb(tp.get_peft_model(case.model, config, seed=case.seed), case.seed).train()
    twin = peft_twin(model)
    view = model.view()  # one draw of dropout masks, for both libraries
    rows = visible_rows(case.mask, case.ids.shape)
    labels = case.labels.copy()
    labels[:, 1:][~rows[:, :-1]] = -100  # nothing is predicted from a position that sees nothing
    if not (labels[:, 1:] != -100).any():
        return
    if config.vera_dropout > 0:
        twin.train()  # GPT-2's own dropouts are 0 in the twin; only the VeRA branch drops
        for layer in model.active.layers:
            keep = view.sites.linear[layer.module].keep_mask(layer.module, (*case.ids.shape, layer.in_features))
            twin.base_model.model.get_submodule(layer.module).vera_dropout["default"] = FixedDropout(keep)

    mask = None if case.mask is None else torch.tensor(case.mask)
    out = twin(input_ids=torch.tensor(case.ids), attention_mask=mask)
    logits = engine.logits(view, case.ids, case.mask)
    assert relative_error(logits[rows], out.logits.detach().numpy()[rows]) <= TOL

    loss_ref = hf_causal_lm_loss(out.logits, torch.tensor(labels))
    loss_ref.backward()
    loss, grads = engine.loss_and_grad(view, case.ids, labels, case.mask)
    grads = view.public(grads)
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    peft_grads = {our_name(n): p.grad.numpy() for n, p in twin.named_parameters() if p.requires_grad}
    assert set(grads) == set(peft_grads)
    for name, g in grads.items():
        assert relative_error(g, peft_grads[name]) <= TOL, name

    ours = model.merge_and_unload().params
    theirs = twin.eval().merge_and_unload().state_dict()
    for name, value in ours.items():
        assert relative_error(value, theirs[name].numpy()) <= MERGE_TOL, name


@pytest.mark.parametrize("config", [{}, {"bias": "all", "r": 9}, {"target_modules": ["c_proj", "c_fc"], "r": 2}])
def test_trainable_parameter_count_matches_peft(config, capsys):
    base = interchange_model()
    model = tp.get_peft_model(base, tp.VeraConfig(**config))
    twin = peft.get_peft_model(hf_twin(base), peft_config(model.active.config))
    twin.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs


# ------------------------------------------------------------------ files, both ways
LOADABLE = [
    {},
    {"save_projection": False},
    {"r": 5, "target_modules": ["c_attn", "mlp.c_fc"], "projection_prng_key": 3, "bias": "vera_only"},
    {"r": 2, "target_modules": ["c_proj"], "save_projection": False, "bias": "all", "projection_prng_key": 2**35},
]


def interchange_model() -> tp.GPT:
    return perturbed_model(
        tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 3
    )


IDS = np.random.default_rng(0).integers(0, 31, size=(2, 9))


def peft_logits(pm: peft.PeftModel) -> np.ndarray:
    with torch.no_grad():
        return pm.eval()(input_ids=torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("config", LOADABLE)
def test_our_adapter_loads_in_peft(tmp_path, config):
    base = interchange_model()
    model = perturb(tp.get_peft_model(base, tp.VeraConfig(init_weights=False, **config)), 0)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf_twin(base), tmp_path)  # save_projection=False: PEFT redraws A and B
    assert relative_error(model(IDS), peft_logits(loaded)) <= TOL


@pytest.mark.parametrize("config", LOADABLE)
def test_a_peft_adapter_loads_here(tmp_path, config):
    base = interchange_model()
    torch.manual_seed(0)
    trained = peft.get_peft_model(hf_twin(base), peft_config(tp.VeraConfig(**config)))
    with torch.no_grad():  # move every trained tensor off its init (λ_b = 0), as training would
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trained.save_pretrained(tmp_path)
    model = tp.PeftModel.from_pretrained(base, tmp_path)
    assert model.active.config.save_projection is config.get("save_projection", True)
    assert relative_error(model(IDS), peft_logits(trained)) <= TOL
    # and PEFT's in-memory state dict, as it is
    again = tp.get_peft_model(base, model.active.config)
    again.load_adapter_state_dict(peft.get_peft_model_state_dict(trained))
    assert relative_error(again(IDS), peft_logits(trained)) <= TOL


def test_projections_saved_by_peft_are_used_here(tmp_path):
    """save_projection=True: the file's A and B are what both sides compute with, even when they are not the
    key's (a file from a machine whose torch draws otherwise)."""
    base = interchange_model()
    trained = peft.get_peft_model(hf_twin(base), peft_config(tp.VeraConfig(r=4)))
    with torch.no_grad():
        for buffer in peft_projections(trained):
            buffer.mul_(-1.25)
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)
    trained.save_pretrained(tmp_path)
    model = tp.PeftModel.from_pretrained(base, tmp_path)
    np.testing.assert_array_equal(model.active.vera_A, peft_projections(trained)[0].numpy())
    assert relative_error(model(IDS), peft_logits(trained)) <= TOL


def test_the_kaiming_bound_is_peft_s():
    """sqrt(3) * gain / sqrt(fan_in) with gain sqrt(2): the largest |entry| of a big draw approaches it."""
    (A,) = torch_kaiming_uniform(0, [(64, 100)])
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(100)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.99 * bound
