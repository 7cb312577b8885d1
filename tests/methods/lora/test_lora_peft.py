"""LoRA, rsLoRA, DoRA and PiSSA against Hugging Face PEFT on the transformers twin of the same GPT-2, in
float64: the same LoraConfig, our adapter tensors copied into PEFT's model by name
(`peft.set_peft_model_state_dict`), then logits, the loss and every adapter tensor's gradient agree to
<= 1e-10 relative (measured ~1e-15), and the merged weights equal PEFT's `merge_and_unload` to <= 1e-12.
Dropout runs with the same masks on both sides. Adapters saved by either library load in the other.

PiSSA: PEFT refuses to initialise it in float64 (its SVD runs in float32), so its init is compared in
float32, and the float64 comparison gives PEFT our residual weights in place of its base weights.
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from hf_utils import hf_causal_lm_loss, hf_twin
from hypothesis import given, settings
from lora_strategies import lora_cases, lora_model, perturb_adapter
from strategies import perturbed_model

import tinypeft as tp
from tinypeft import engine
from tinypeft.gradcheck import relative_error

TOL = 1e-10  # the same float64 formulas on both sides; measured differences are ~1e-15
MERGE_TOL = 1e-12
# PEFT's PiSSA SVD runs in float32 and ours in float64: measured 3.5e-6 (singular vectors amplify float32's
# rounding by the inverse gaps between singular values)
PISSA_FLOAT32_TOL = 3e-5


def peft_config(config: tp.LoraConfig, **changes) -> peft.LoraConfig:
    """PEFT's LoraConfig from our adapter_config.json dict."""
    d = config.to_dict() | changes
    return peft.LoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "base_model_name_or_path")})


def peft_twin(model: tp.PeftModel) -> peft.PeftModel:
    """PEFT's model of `model`'s base and active adapter, holding exactly our tensors: float64, eval mode.

    A PiSSA adapter is built as plain LoRA (PEFT's PiSSA init refuses float64), then our residual weights
    replace PEFT's base weights, which is where PEFT's PiSSA keeps them."""
    adapter = model.active
    config = adapter.config
    pissa = config.init_lora_weights == "pissa"
    twin = peft.get_peft_model(hf_twin(model.base_model), peft_config(config, init_lora_weights=not pissa))
    state = {k: torch.tensor(np.asarray(v)) for k, v in model.adapter_state_dict().items()}
    result = peft.set_peft_model_state_dict(twin, state)
    assert not result.unexpected_keys, result.unexpected_keys
    with torch.no_grad():
        for module, residual in adapter.residual_weights.items():
            twin.base_model.model.get_submodule(module).base_layer.weight.copy_(torch.tensor(residual))
    return twin.eval()


class FixedDropout(torch.nn.Module):
    """Dropout with a given mask (0 or 1/(1-p)), standing in for PEFT's torch.nn.Dropout."""

    def __init__(self, keep: np.ndarray) -> None:
        super().__init__()
        self.keep = torch.tensor(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


def our_file_name(peft_name: str) -> str:
    """PEFT's in-memory parameter name -> the name it saves (and we use): no adapter name, and DoRA's
    magnitude without ".weight"."""
    name = peft_name.replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


def visible_rows(mask, shape):
    """Positions whose query sees at least one key (see test_hf_gpt2: a query that sees nothing differs
    between the libraries by design)."""
    return np.ones(shape, dtype=bool) if mask is None else np.cumsum(mask, axis=1) > 0


@settings(max_examples=20)
@given(lora_cases(case_kwargs={"min_len": 2}, inits=(False, "pissa")))
def test_logits_loss_gradients_and_merge_match_peft(args):
    case, config = args
    model = lora_model(case, config, train=True)
    twin = peft_twin(model)
    view = model.view()  # one draw of dropout masks, for both libraries
    rows = visible_rows(case.mask, case.ids.shape)
    labels = case.labels.copy()
    labels[:, 1:][~rows[:, :-1]] = -100  # nothing is predicted from a position that sees nothing
    if not (labels[:, 1:] != -100).any():
        return
    if config.lora_dropout > 0:
        twin.train()  # GPT-2's own dropouts are 0 in the twin; only the LoRA branch drops
        for layer in model.active.layers:
            module = twin.base_model.model.get_submodule(layer.module)
            shape = (*case.ids.shape, layer.in_features)
            module.lora_dropout["default"] = FixedDropout(
                view.sites.linear[layer.module].keep_mask(layer.module, shape)
            )

    ids = torch.tensor(case.ids)
    mask = None if case.mask is None else torch.tensor(case.mask)
    out = twin(input_ids=ids, attention_mask=mask)
    logits = engine.logits(view, case.ids, case.mask)
    assert relative_error(logits[rows], out.logits.detach().numpy()[rows]) <= TOL

    loss_ref = hf_causal_lm_loss(out.logits, torch.tensor(labels))
    loss_ref.backward()
    loss, grads = engine.loss_and_grad(view, case.ids, labels, case.mask)
    grads = view.public(grads)
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    peft_grads = {our_file_name(n): p.grad.numpy() for n, p in twin.named_parameters() if p.requires_grad}
    assert set(grads) == set(peft_grads)
    for name, g in grads.items():
        assert relative_error(g, peft_grads[name]) <= TOL, name

    ours = model.merge_and_unload().params
    theirs = twin.eval().merge_and_unload().state_dict()
    for name, value in ours.items():
        assert relative_error(value, theirs[name].numpy()) <= MERGE_TOL, name


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_matches_peft_in_float32(use_rslora):
    """PEFT runs PiSSA's SVD in float32; ours runs in float64, so they agree to float32 precision. The
    singular vectors' signs are arbitrary, so compare what does not depend on them: s B A and the residual."""
    base = perturbed_model(tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2), 0)
    config = tp.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights="pissa", use_rslora=use_rslora
    )
    model = tp.get_peft_model(base, config)
    twin = peft.get_peft_model(hf_twin(base).float(), peft_config(config))
    s = config.scaling
    for layer in model.active.layers:
        theirs = twin.base_model.model.get_submodule(layer.module)
        A, B = model.active.params[layer.lora_A], model.active.params[layer.lora_B]
        A_ref, B_ref = (
            theirs.lora_A["default"].weight.detach().numpy(),
            theirs.lora_B["default"].weight.detach().numpy(),
        )
        assert relative_error(s * B @ A, s * B_ref @ A_ref) <= PISSA_FLOAT32_TOL, layer.module
        assert np.allclose(np.abs(A), np.abs(A_ref), atol=1e-4 * np.abs(A).max()), layer.module  # up to signs
        residual_ref = theirs.base_layer.weight.detach().numpy()
        assert relative_error(model.active.residual_weights[layer.module], residual_ref) <= PISSA_FLOAT32_TOL, (
            layer.module
        )


LOADABLE = [
    {},
    {"use_rslora": True, "target_modules": ["c_attn", "mlp.c_fc"]},
    {"use_dora": True, "target_modules": ["c_proj"]},
    {"bias": "all", "use_dora": True},
    {"bias": "lora_only", "target_modules": r"transformer\.h\.0\.(attn\.c_attn|mlp\.c_proj)"},
]


def interchange_model(dtype: str = "float64") -> tp.GPT:
    return perturbed_model(tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype=dtype), 3)


@pytest.mark.parametrize("config", LOADABLE)
def test_our_adapter_loads_in_peft(tmp_path, config):
    base = interchange_model()
    model = tp.get_peft_model(base, tp.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, **config))
    perturb_adapter(model, 0)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf_twin(base), tmp_path).eval()
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 9))
    ref = loaded(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert relative_error(model(ids), ref) <= TOL


@pytest.mark.parametrize("config", LOADABLE)
def test_a_peft_adapter_loads_here(tmp_path, config):
    base = interchange_model()
    torch.manual_seed(0)
    trained = peft.get_peft_model(hf_twin(base), peft_config(tp.LoraConfig(r=3, lora_alpha=5, **config)))
    with torch.no_grad():  # move every adapter tensor off its init, as training would
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trained.save_pretrained(tmp_path)
    model = tp.PeftModel.from_pretrained(base, tmp_path)
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 9))
    ref = trained.eval()(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert relative_error(model(ids), ref) <= TOL


def test_pissa_adapters_interchange_in_float32(tmp_path):
    """A saved PiSSA adapter is A and B; the loader (ours or PEFT's) redoes the SVD on the original base
    to recreate the residual. PEFT's SVD is float32 and ours float64, hence a float32 tolerance."""
    base = interchange_model("float32")
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 9))
    model = tp.get_peft_model(base, tp.LoraConfig(r=3, init_lora_weights="pissa", target_modules=["c_attn", "c_fc"]))
    perturb_adapter(model, 0, scale=0.1)
    model.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(hf_twin(base).float(), tmp_path / "ours").eval()
    assert relative_error(model(ids), loaded(input_ids=torch.tensor(ids)).logits.detach().numpy()) <= PISSA_FLOAT32_TOL

    trained = peft.get_peft_model(hf_twin(base).float(), peft_config(model.active.config))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.mul_(1.1)
    trained.save_pretrained(tmp_path / "peft")
    ours = tp.PeftModel.from_pretrained(base, tmp_path / "peft")
    ref = trained.eval()(input_ids=torch.tensor(ids)).logits.detach().numpy()
    assert relative_error(ours(ids), ref) <= PISSA_FLOAT32_TOL


@pytest.mark.parametrize("config", [{}, {"use_dora": True, "target_modules": ["c_proj"]}, {"bias": "all"}])
def test_trainable_parameter_count_matches_peft(config, capsys):
    base = interchange_model()
    model = tp.get_peft_model(base, tp.LoraConfig(r=4, **config))
    twin = peft.get_peft_model(hf_twin(base), peft_config(model.active.config))
    twin.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs
