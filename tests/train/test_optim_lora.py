"""LoRA+ and LoRA-FA (tinypeft/optim_lora.py) against PEFT 0.21.2's optimizers, and LoRA-FA's projected gradient
against its definition.

- Trajectories: the same model and adapter in tinypeft and in PEFT (float64), ten steps of each library's
  optimizer on the same batches, every trainable tensor equal after every step to <= 1e-10 relative.
- LoRA-FA's projected B gradient (1/s²) dB (A Aᵀ + δI)⁻¹ is the ridge least-squares B step whose s ΔB A is
  closest to a full fine-tune's gradient of W, which the test computes by autograd and NumPy's lstsq, apart from
  the hand-written backward (<= 1e-10); and finite differences of the loss along B confirm dB = s² P (A Aᵀ + δI).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_utils import hf_causal_lm_loss
from multi_adapters import peft_twin, small_base, with_adapters
from peft.optimizers import create_lorafa_optimizer as peft_lorafa
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import tinypeft as tp
from tinypeft.errors import ConfigError
from tinypeft.gradcheck import autograd_grads, model_loss_fn, relative_error
from tinypeft.optim import SGD, AdamW
from tinypeft.optim_lora import LoraFA, create_loraplus_optimizer, loraplus_group, projected_b_gradient

TOL = 1e-10
STEPS = 10


def our_name(peft_name: str) -> str:
    name = peft_name.replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


def key_bias_rows(name: str, n_embd: int) -> slice | None:
    """The key part of c_attn's bias. Its exact gradient is 0 (adding a constant to every key shifts each query's
    scores by one constant, which softmax ignores), so both libraries compute rounding noise there, ~1e-17, and
    Adam divides it by its own size: a step of ±lr from noise. Those entries are left out of the comparison."""
    key_bias = name.endswith(("attn.c_attn.bias", "attn.c_attn.base_layer.bias"))
    return slice(n_embd, 2 * n_embd) if key_bias else None


def trajectories(config: tp.LoraConfig, ours_factory, peft_factory) -> float:
    """Ten steps in each library from the same adapter; the largest relative difference over tensors and steps."""
    model = with_adapters(small_base(), {"default": config})
    twin = peft_twin(model).train()
    ours, theirs = ours_factory(model), peft_factory(twin)
    params = model.trainable_parameters()
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(STEPS):
        ids = rng.integers(0, 31, size=(3, 8))
        _, grads = model.loss_and_grad(ids, ids)
        ours.step(params, grads)
        theirs.zero_grad()
        hf_causal_lm_loss(twin(input_ids=torch.tensor(ids)).logits, torch.tensor(ids)).backward()
        theirs.step()
        now = {our_name(n): p.detach().numpy() for n, p in twin.named_parameters()}
        for name, value in params.items():
            rows = key_bias_rows(name, 8)
            a, b = value.copy(), now[name].copy()
            if rows is not None:
                a[rows] = b[rows] = 0.0
            worst = max(worst, relative_error(a, b))
    return worst


CONFIGS = {
    "lora": tp.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["c_attn", "mlp.c_proj"]),
    "bias_all": tp.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["c_proj"], bias="all"),
    "dora_rslora": tp.LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=False, use_dora=True, use_rslora=True, target_modules=["c_attn", "c_fc"]
    ),
    "rslora_bias": tp.LoraConfig(
        r=3, lora_alpha=2, use_rslora=True, init_lora_weights=False, target_modules=["c_proj", "c_fc"], bias="lora_only"
    ),
}


@pytest.mark.parametrize("config", ["lora", "bias_all", "dora_rslora"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_loraplus_trajectory_matches_peft(config, optimizer):
    """B at 16 (AdamW) or 4 (SGD, momentum) times A's rate; bias="all" puts the LayerNorm and linear biases in the
    undecayed B group, DoRA's magnitude in the decayed one. Measured: <= 2e-13."""
    if optimizer == "adamw":
        kwargs = {"lr": 1e-2, "loraplus_lr_ratio": 16, "loraplus_weight_decay": 0.05, "betas": (0.8, 0.99)}
        ours_cls, peft_cls = AdamW, torch.optim.AdamW
    else:
        kwargs = {"lr": 1e-2, "loraplus_lr_ratio": 4, "loraplus_weight_decay": 0.05, "momentum": 0.9}
        ours_cls, peft_cls = SGD, torch.optim.SGD
    worst = trajectories(
        CONFIGS[config],
        lambda m: create_loraplus_optimizer(m, ours_cls, **kwargs),
        lambda t: peft_loraplus(t, peft_cls, **kwargs),
    )
    assert worst <= TOL


def test_loraplus_groups_are_peft_s():
    """Each tensor's learning rate and weight decay, tinypeft's groups against PEFT's param_groups."""
    model = with_adapters(small_base(), {"default": CONFIGS["bias_all"]})
    twin = peft_twin(model)
    ours = create_loraplus_optimizer(model, AdamW, lr=1e-3, loraplus_lr_ratio=8, loraplus_weight_decay=0.1)
    theirs = peft_loraplus(twin, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8, loraplus_weight_decay=0.1)
    names = {id(p): our_name(n) for n, p in twin.named_parameters()}
    peft_settings = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in theirs.param_groups for p in g["params"]}
    our_settings = {
        n: (ours.inner[ours.group_of(n)].lr, ours.inner[ours.group_of(n)].weight_decay) for n in peft_settings
    }
    assert our_settings == peft_settings
    assert set(peft_settings) == set(model.trainable_parameters())
    assert {ours.group_of(n) for n in peft_settings} == {"A", "B", "B_no_decay"}
    ln_weight = "base_model.model.transformer.h.0.ln_1.weight"  # LN tuning's: not decayed (transformers' rule)
    assert loraplus_group(ln_weight, np.ones(8)) == "B_no_decay"


def test_loraplus_weight_decay_alone_decays_nothing():
    """PEFT passes weight_decay to the optimizer, but every group sets its own (loraplus_weight_decay, 0 by
    default), so weight_decay=0.5 alone changes nothing, in PEFT and here."""
    config = CONFIGS["lora"]
    plain = trajectories(
        config,
        lambda m: create_loraplus_optimizer(m, AdamW, lr=1e-2, loraplus_lr_ratio=4, weight_decay=0.5),
        lambda t: peft_loraplus(t, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4),
    )
    assert plain <= TOL


@pytest.mark.parametrize("config", ["lora", "rslora_bias"])
def test_lorafa_trajectory_matches_peft(config):
    """A frozen, B projected, Hugging Face's AdamW with its decay after the step; trained biases take plain AdamW.
    Measured: <= 4e-14."""
    cfg = CONFIGS[config]
    worst = trajectories(
        cfg,
        lambda m: LoraFA(m, lr=1e-2, weight_decay=0.1),
        lambda t: peft_lorafa(t, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=1e-2, weight_decay=0.1),
    )
    assert worst <= TOL


def test_lorafa_leaves_a_as_it_was():
    model = with_adapters(small_base(), {"default": CONFIGS["lora"]})
    A = {k: v.copy() for k, v in model.active.params.items() if "lora_A" in k}
    optimizer = LoraFA(model, lr=1e-2)
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 8))
    for _ in range(3):
        optimizer.step(model.trainable_parameters(), model.loss_and_grad(ids, ids)[1])
    assert all(np.array_equal(model.active.params[k], v) for k, v in A.items())
    assert set(optimizer.state) == {k for k in model.active.params if "lora_B" in k}


def test_lorafa_with_several_active_adapters_pairs_each_b_with_its_own_a():
    """tinypeft pairs each B with its layer's A by name. (PEFT pairs consecutive "lora" tensors of
    named_parameters, which for two adapters on a layer are lora_A.x, lora_A.y: its LoRA-FA step fails.)"""
    configs = {"x": CONFIGS["lora"], "y": tp.LoraConfig(r=1, init_lora_weights=False, target_modules=["c_attn"])}
    model = with_adapters(small_base(), configs)
    model.set_adapter(["x", "y"])
    optimizer = LoraFA(model, lr=1e-2)
    b = "base_model.model.transformer.h.0.attn.c_attn.lora_B.y.weight"
    assert optimizer.pairs[b] == ("base_model.model.transformer.h.0.attn.c_attn.lora_A.y.weight", 8.0)
    twin = peft_twin(model)
    theirs = peft_lorafa(twin, r=2, lora_alpha=3, lr=1e-2)
    ids = torch.tensor(np.random.default_rng(0).integers(0, 31, size=(2, 8)))
    twin.base_model.set_adapter(["x", "y"])
    hf_causal_lm_loss(twin(input_ids=ids).logits, ids).backward()
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # A.x @ A.y's "gradient"
        theirs.step()


def test_peft_s_lorafa_in_float32_projects_in_bfloat16():
    """On a CPU, PEFT computes the projected gradient under torch.autocast(bfloat16) (accelerate reports bfloat16
    available), which casts a float32 matmul to bfloat16 (float64 is never autocast). Five float32 steps: our B
    is 1e-7 from the float64 trajectory (float32 rounding), PEFT's 1e-4 (measured 1.0e-4 and 1.6e-4)."""
    cfg = CONFIGS["lora"]
    steps = {}
    for dtype in ("float64", "float32"):
        model = with_adapters(small_base(dtype=dtype), {"default": cfg})
        twin = peft_twin(model).train().to(getattr(torch, dtype))
        ours, theirs = LoraFA(model, lr=1e-2), peft_lorafa(twin, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=1e-2)
        params, rng = model.trainable_parameters(), np.random.default_rng(0)
        for _ in range(5):
            ids = rng.integers(0, 31, size=(3, 8))
            ours.step(params, model.loss_and_grad(ids, ids)[1])
            theirs.zero_grad()
            hf_causal_lm_loss(twin(input_ids=torch.tensor(ids)).logits.double(), torch.tensor(ids)).backward()
            theirs.step()
        now = {our_name(n): p.detach().double().numpy() for n, p in twin.named_parameters()}
        steps[dtype] = ({k: v.astype(np.float64) for k, v in params.items()}, now)
    truth = steps["float64"][0]
    for name in (n for n in truth if "lora_B" in n):
        assert relative_error(steps["float32"][0][name], truth[name]) < 1e-6, name
        assert relative_error(steps["float32"][1][name], truth[name]) > 3e-5, name


def test_the_projected_gradient_is_the_least_squares_step_of_the_full_gradient():
    """Hand: dB from the hand-written backward, projected. Definition: G = ∂L/∂W_eff by autograd on the merged
    model, then the ridge least-squares X minimising ‖s X A − Gᵀ‖² + δ s²‖X‖² by lstsq: the B step whose weight
    step s X A is closest to a full fine-tune's gradient. And finite differences
    of L(B + tU) along random U equal ⟨s² P (A Aᵀ + δI), U⟩, the directional derivative P implies."""
    model = with_adapters(small_base(), {"default": CONFIGS["rslora_bias"]})
    ids = np.random.default_rng(3).integers(0, 31, size=(3, 9))
    _, grads = model.loss_and_grad(ids, ids)
    merged = model.merge_and_unload()
    view = merged.view()
    loss_fn, _ = model_loss_fn(view, ids, ids)
    s, delta = model.active.config.scaling, 1e-8
    rng = np.random.default_rng(0)
    for layer in model.active.layers:
        A, B = model.active.params[layer.lora_A], model.active.params[layer.lora_B]
        P = projected_b_gradient(grads[layer.lora_B], A, s)
        G = autograd_grads(loss_fn, view.params, [layer.weight])[layer.weight]  # (in, out)
        r = A.shape[0]
        lhs = np.concatenate([s * A.T, np.sqrt(delta) * s * np.eye(r)])  # [in + r, r]
        rhs = np.concatenate([G, np.zeros((r, G.shape[1]))])  # [in + r, out]
        X = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T  # (out, r): ridge least squares, s X A ≈ Gᵀ
        assert relative_error(P, X) <= TOL, layer.module

        U = rng.standard_normal(B.shape)
        model_loss = model_loss_fn(model.view(), ids, ids)[0]

        def f(t, name=layer.lora_B, U=U, B=B, loss=model_loss):
            return float(loss({**model.view().params, name: B + t * U}))

        h = 1e-4
        numeric = (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)
        analytic = float(np.sum(s**2 * P @ (A @ A.T + delta * np.eye(r)) * U))
        assert abs(numeric - analytic) <= 1e-6 * np.linalg.norm(grads[layer.lora_B]) * np.linalg.norm(U)


def test_refusals():
    dora = with_adapters(small_base(), {"default": CONFIGS["dora_rslora"]})
    with pytest.raises(ConfigError, match="adapter 'default' is DoRA"):
        LoraFA(dora)
    with pytest.raises(ConfigError, match="optimizer_cls must be a tinypeft optimizer class"):
        create_loraplus_optimizer(dora, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(dora, AdamW, lr=1e-3, loraplus_lr_ratio=-1)


def test_a_grouped_optimizer_resumes_exactly():
    """Its state saves and loads as one optimizer's: two steps, save, two more, equals four in a row."""
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 8))

    def run(split: bool):
        model = with_adapters(small_base(), {"default": CONFIGS["bias_all"]})
        params = model.trainable_parameters()
        opt = create_loraplus_optimizer(model, AdamW, lr=1e-2, loraplus_lr_ratio=4, loraplus_weight_decay=0.1)
        for step in range(4):
            if split and step == 2:
                state = opt.state_dict()
                opt = create_loraplus_optimizer(model, AdamW, lr=1e-2, loraplus_lr_ratio=4, loraplus_weight_decay=0.1)
                opt.load_state_dict(state, params)
            opt.step(params, model.loss_and_grad(ids, ids)[1])
        return params

    straight, resumed = run(False), run(True)
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
