"""AdaLoRA against Hugging Face PEFT 0.21.2 on the transformers twin of the same GPT-2 (GPT-2's Conv1D, which PEFT's
AdaLoRA accepts directly), in float64.

- The same config, our A, E and B copied into PEFT's model: logits, the loss with the orthogonality regulariser
  (PEFT's AdaLoraModel.forward adds it), the regulariser alone, and every trained tensor's gradient agree to
  <= 1e-10 relative, dropout with the same masks on both sides; the merged weights equal PEFT's
  `merge_and_unload` to <= 1e-12.
- The rank allocator: fed the same parameters and gradients step after step, ours and PEFT's
  `update_and_allocate` keep the same importance statistics (bitwise: the same elementwise float64 formulas), mask
  the same triplets, leave the same E, and set the same rank_pattern, through the warm-up, the cubic pruning, the
  final mask and the steps after it.
- Training: tinypeft's `train` loop (SGD, clipping off) against the same loop written in torch over PEFT's model
  (loss.backward, optimizer.step, update_and_allocate): every step's loss and the final tensors agree.
- Adapters saved by either library load in the other with equal logits, pruned by a rank_pattern or not.
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from hf_utils import hf_causal_lm_loss, hf_twin
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_strategies import well_conditioned_cases
from strategies import perturbed_model
from test_adalora import adalora_configs, perturb

import tinypeft as tp
from tinypeft import engine
from tinypeft.gradcheck import relative_error
from tinypeft.methods.adalora import AdaLoraAdapter

TOL = 1e-10  # the same float64 formulas on both sides; measured differences are ~1e-15
MERGE_TOL = 1e-12


def peft_config(config: tp.AdaLoraConfig, **changes) -> peft.AdaLoraConfig:
    """PEFT's AdaLoraConfig from our adapter_config.json dict."""
    d = config.to_dict() | changes
    return peft.AdaLoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "base_model_name_or_path")})


def our_name(peft_name: str) -> str:
    """PEFT's in-memory parameter name -> the name it saves (and we use): no adapter name."""
    return peft_name.replace(".default", "")


def peft_twin(model: tp.PeftModel) -> peft.PeftModel:
    """PEFT's model of `model`'s base and adapter in float64, eval mode, holding exactly our A, E and B."""
    twin = peft.get_peft_model(hf_twin(model.base_model), peft_config(model.active.config))
    state = {k: torch.tensor(v) for k, v in model.adapter_state_dict().items()}
    result = peft.set_peft_model_state_dict(twin, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return twin.eval()


def float64_loss(twin: peft.PeftModel, labels: torch.Tensor) -> None:
    """Make the wrapped transformers model report the float64 shifted cross-entropy as its loss (transformers' own
    casts the logits to float32): AdaLoraModel.forward then adds its regulariser to that, as it does in training."""
    inner = twin.base_model.model
    forward = type(inner).forward.__get__(inner)

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.loss = hf_causal_lm_loss(out.logits, labels)
        return out

    inner.forward = patched


def peft_regulariser(twin: peft.PeftModel) -> float:
    """PEFT's regulariser alone: its loss with a zero cross-entropy."""
    inner = twin.base_model.model
    forward = type(inner).forward.__get__(inner)

    def zero_loss(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.loss = out.logits.sum() * 0.0
        return out

    inner.forward = zero_loss
    try:
        with torch.no_grad():
            return twin(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss.item()
    finally:
        del inner.forward


class FixedDropout(torch.nn.Module):
    """Dropout with a given mask (0 or 1/(1-p)), standing in for PEFT's torch.nn.Dropout."""

    def __init__(self, keep: np.ndarray) -> None:
        super().__init__()
        self.keep = torch.tensor(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


def visible_rows(mask, shape):
    """Positions whose query sees at least one key (a query that sees nothing differs between the libraries by
    design: tests/hf/test_hf_gpt2.py)."""
    return np.ones(shape, dtype=bool) if mask is None else np.cumsum(mask, axis=1) > 0


def peft_trainable(twin: peft.PeftModel) -> dict[str, torch.nn.Parameter]:
    """PEFT's trained tensors, by our names. PEFT 0.21.2 also leaves requires_grad on each layer's ranknum (a
    constant it never saves); tinypeft holds ranknum as a constant, so it is left out here."""
    return {our_name(n): p for n, p in twin.named_parameters() if p.requires_grad and ".ranknum." not in n}


# ------------------------------------------------------------------ one forward and backward
@settings(max_examples=25)
@given(well_conditioned_cases(min_len=2), st.data())
def test_logits_loss_gradients_and_merge_match_peft(case, data):
    config = data.draw(adalora_configs())
    model = perturb(tp.get_peft_model(case.model, config, seed=case.seed), case.seed).train()
    twin = peft_twin(model)
    view = model.view()  # one draw of dropout masks, for both libraries
    rows = visible_rows(case.mask, case.ids.shape)
    labels = case.labels.copy()
    labels[:, 1:][~rows[:, :-1]] = -100  # nothing is predicted from a position that sees nothing
    if not (labels[:, 1:] != -100).any():
        return
    if config.lora_dropout > 0:
        twin.train()  # GPT-2's own dropouts are 0 in the twin; only the AdaLoRA branch drops
        for layer in model.active.layers:
            keep = view.sites.linear[layer.module].keep_mask(layer.module, (*case.ids.shape, layer.in_features))
            twin.base_model.model.get_submodule(layer.module).lora_dropout["default"] = FixedDropout(keep)

    float64_loss(twin, torch.tensor(labels))
    mask = None if case.mask is None else torch.tensor(case.mask)
    out = twin(input_ids=torch.tensor(case.ids), attention_mask=mask, labels=torch.tensor(labels))
    logits = engine.logits(view, case.ids, case.mask)
    assert relative_error(logits[rows], out.logits.detach().numpy()[rows]) <= TOL

    out.loss.backward()
    loss, grads = engine.loss_and_grad(view, case.ids, labels, case.mask)
    grads = view.public(grads)
    assert abs(loss - out.loss.item()) <= TOL * abs(out.loss.item())
    peft_grads = {name: p.grad.numpy() for name, p in peft_trainable(twin).items()}
    assert set(grads) == set(peft_grads)
    for name, g in grads.items():
        assert relative_error(g, peft_grads[name]) <= TOL, name

    ours = model.merge_and_unload().params
    theirs = twin.eval().merge_and_unload().state_dict()
    for name, value in ours.items():
        assert relative_error(value, theirs[name].numpy()) <= MERGE_TOL, name


@pytest.mark.parametrize("weight", [0.0, 0.5, 3.0])
def test_the_regulariser_is_peft_s(weight):
    config = tp.AdaLoraConfig(init_r=4, target_r=2, total_step=10, orth_reg_weight=weight, init_lora_weights=False,
                              target_modules=["c_attn", "mlp.c_proj"])  # fmt: skip
    model = perturb(tp.get_peft_model(interchange_model(), config), 1)
    ours = sum(float(term.forward(model.view().params)[0]) for term in model.view().sites.loss_terms)
    theirs = peft_regulariser(peft_twin(model))
    assert abs(ours - theirs) <= TOL * max(abs(theirs), 1e-300)
    assert (ours > 0) == (weight > 0)


def test_init_is_peft_s():
    """E = 0 (the identity at the start), A and B ~ N(0, 0.02²) in PEFT's shapes and names, ranknum init_r."""
    base = interchange_model()
    config = tp.AdaLoraConfig(init_r=5, target_r=2, total_step=10, target_modules=["c_attn", "c_fc"])
    ours = tp.get_peft_model(base, config)
    twin = peft.get_peft_model(hf_twin(base), peft_config(config))
    theirs = {our_name(k): v.numpy() for k, v in peft.get_peft_model_state_dict(twin).items()}
    state = ours.adapter_state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in theirs.items()}
    for name, value in state.items():
        if name.endswith("lora_E"):
            assert not value.any() and not theirs[name].any()
        else:
            assert 0.01 < value.std() < 0.03 and 0.01 < theirs[name].std() < 0.03, name  # 60+ draws of N(0, 0.02²)
    for layer in ours.active.layers:
        module = twin.base_model.model.get_submodule(layer.module)
        assert module.ranknum["default"].item() == config.init_r
        assert config.scale == module.scaling["default"] / (module.ranknum["default"].item() + 1e-5)
    np.testing.assert_array_equal(ours(IDS), base(IDS))


# ------------------------------------------------------------------ the rank allocator, step for step
SCHEDULES = [
    {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 14},
    {"init_r": 3, "target_r": 1, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 7, "beta1": 0.5, "beta2": 0.9},
    {"init_r": 6, "target_r": 0, "tinit": 1, "tfinal": 2, "deltaT": 3, "total_step": 11, "beta1": 0.95},
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_allocator_matches_peft_step_for_step(schedule):
    """The same parameters and gradients each step (random, the parameters after the masking the last step left),
    so any difference is the allocator's."""
    config = tp.AdaLoraConfig(target_modules=["c_attn", "attn.c_proj", "mlp.c_fc"], init_lora_weights=False,
                              **schedule)  # fmt: skip
    model = tp.get_peft_model(interchange_model(), config)
    adapter: AdaLoraAdapter = model.active
    twin = peft_twin(model)
    theirs = peft_trainable(twin)
    rng = np.random.default_rng(5)
    total, masked_ever = config.total_step, False
    for step in range(total + 2):  # past total_step: the final pattern keeps being applied
        grads = {}
        for name, p in adapter.params.items():
            update = rng.standard_normal(p.shape)
            p[...] = p + 0.1 * update  # in place, as an optimizer does (the allocator masks the same arrays)
            grads[name] = rng.standard_normal(p.shape)
            with torch.no_grad():
                theirs[name].copy_(torch.tensor(p))
            theirs[name].grad = torch.tensor(grads[name])
        twin.base_model.update_and_allocate(step)
        model.after_step(grads, step)
        for name, p in theirs.items():
            np.testing.assert_array_equal(adapter.params[name], p.detach().numpy(), err_msg=f"{name}, step {step}")
        allocator, peft_allocator = adapter.allocator, twin.base_model.rankallocator
        assert set(allocator.exp_avg_ipt) == {our_name(k).removeprefix("") for k in (
            "base_model.model." + n for n in peft_allocator.exp_avg_ipt)}  # fmt: skip
        for n in peft_allocator.exp_avg_ipt:
            ours_n = "base_model.model." + our_name(n)
            for what in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                np.testing.assert_array_equal(
                    getattr(allocator, what)[ours_n], getattr(peft_allocator, what)[n].numpy()
                )
        peft_pattern = twin.peft_config["default"].rank_pattern
        ours_pattern = adapter.config.rank_pattern
        if peft_pattern is None:
            assert ours_pattern is None, step
        else:
            assert {our_name(k): v for k, v in peft_pattern.items()} == ours_pattern, step
            masked_ever = True
    assert masked_ever
    kept = sum(sum(v) for v in adapter.config.rank_pattern.values())
    assert kept <= config.target_r * len(adapter.layers)  # ties may mask more


def test_triplet_scores_match_peft():
    """The score of each triplet (from the same statistics) to rounding: both take means, in their own order."""
    config = tp.AdaLoraConfig(init_r=5, target_r=2, total_step=10, target_modules=["c_attn", "c_fc"],
                              init_lora_weights=False)  # fmt: skip
    model = tp.get_peft_model(interchange_model(), config)
    twin = peft_twin(model)
    rng = np.random.default_rng(2)
    theirs = peft_trainable(twin)
    for p in theirs.values():
        p.grad = torch.tensor(rng.standard_normal(tuple(p.shape)))
    grads = {name: p.grad.numpy() for name, p in theirs.items()}
    peft_allocator = twin.base_model.rankallocator
    peft_allocator.update_ipt(twin.base_model.model)
    model.active.allocator.update_ipt(model.active.params, grads)
    scores = model.active.allocator.triplet_scores()
    for layer in model.active.layers:
        n = layer.module + ".lora_%s.default"
        s_E = peft_allocator._element_score(n % "E")
        s_A = torch.mean(peft_allocator._element_score(n % "A"), dim=1, keepdim=True)
        s_B = torch.mean(peft_allocator._element_score(n % "B"), dim=0, keepdim=False).view(-1, 1)
        expected = peft_allocator._combine_ipt(s_E, torch.cat([s_A, s_B], dim=1)).numpy()
        assert relative_error(scores[layer.lora_E], expected) <= 1e-14


# ------------------------------------------------------------------ training, step for step
def test_training_matches_peft_step_for_step():
    """tinypeft's train loop (SGD, no clipping, no warm-up, constant rate) against the loop PEFT's docs write."""
    base = interchange_model()
    steps = 9
    config = tp.AdaLoraConfig(init_r=3, target_r=1, tinit=1, tfinal=2, deltaT=2, total_step=steps, lora_alpha=4,
                              target_modules=["c_attn", "mlp.c_fc"])  # fmt: skip
    model = perturb(tp.get_peft_model(base, config), 3, scale=0.1)  # E != 0, the loss near ln(vocab)
    twin = peft_twin(model).train()
    data = np.random.default_rng(4).integers(0, 31, size=400).astype(np.uint16)
    train_config = tp.TrainConfig(steps=steps, batch_size=2, seq_len=8, lr=0.05, warmup_steps=0, min_lr_ratio=1.0,
                                  grad_clip=0.0, optimizer="sgd", momentum=0.0, eval_every=0)  # fmt: skip
    batches = _batches(data, train_config)
    params = peft_trainable(twin)
    optimizer = torch.optim.SGD(params.values(), lr=train_config.lr)
    peft_losses = []
    for step, batch in enumerate(batches):
        labels = torch.tensor(batch)
        float64_loss(twin, labels)
        loss = twin(input_ids=labels, labels=labels).loss
        loss.backward()
        optimizer.step()
        twin.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        peft_losses.append(loss.item())
    result = tp.train(model, data, train_config, progress=False, log=lambda _: None)
    ours = [row["loss"] for row in result.train_losses]
    assert relative_error(np.array(ours), np.array(peft_losses)) <= TOL
    for name, p in params.items():
        assert relative_error(model.active.params[name], p.detach().numpy()) <= 1e-9, name
    assert {our_name(k): v for k, v in twin.peft_config["default"].rank_pattern.items()} == config.rank_pattern


def _batches(data: np.ndarray, config: tp.TrainConfig) -> list[np.ndarray]:
    """The batches tinypeft's train loop draws, in order (the same generator, the same calls)."""
    from tinypeft.data import random_batch

    rng = np.random.default_rng(config.seed)
    return [random_batch(data, config.batch_size, config.seq_len, rng) for _ in range(config.steps)]


# ------------------------------------------------------------------ files, both ways
def interchange_model() -> tp.GPT:
    return perturbed_model(
        tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 3
    )


IDS = np.random.default_rng(0).integers(0, 31, size=(2, 9))
PATTERN = {
    "transformer.h.0.attn.c_attn.lora_E": [True, False, True, False],
    "transformer.h.1.attn.c_attn.lora_E": [False, False, False, True],
    "transformer.h.0.mlp.c_fc.lora_E": [True, True, True, True],
    "transformer.h.1.mlp.c_fc.lora_E": [False, False, False, False],
}
LOADABLE = [
    {},
    {"init_r": 4, "target_r": 1, "target_modules": ["c_attn", "mlp.c_fc"], "lora_alpha": 3},
    {"init_r": 4, "target_r": 1, "target_modules": ["c_attn", "mlp.c_fc"], "rank_pattern": PATTERN},
]


def peft_logits(pm: peft.PeftModel) -> np.ndarray:
    with torch.no_grad():
        return pm.eval()(input_ids=torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("config", LOADABLE)
def test_our_adapter_loads_in_peft(tmp_path, config):
    base = interchange_model()
    model = tp.get_peft_model(
        base,
        tp.AdaLoraConfig(
            total_step=10, init_lora_weights=False, **{k: v for k, v in config.items() if k != "rank_pattern"}
        ),
    )
    perturb(model, 0)
    if "rank_pattern" in config:  # as the allocator leaves it: E masked, the pattern on the config
        model.active.config.rank_pattern = config["rank_pattern"]
        model.active.allocator.mask_using_rank_pattern(model.active.params)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf_twin(base), tmp_path)
    assert relative_error(model(IDS), peft_logits(loaded)) <= TOL
    saved = peft.get_peft_model_state_dict(loaded)
    for layer in model.active.layers:
        kept = sum(config["rank_pattern"][layer.pattern_key]) if "rank_pattern" in config else layer.rank
        assert tuple(saved[layer.lora_A].shape) == (kept, layer.in_features)


@pytest.mark.parametrize("config", LOADABLE)
def test_a_peft_adapter_loads_here(tmp_path, config):
    base = interchange_model()
    torch.manual_seed(0)
    trained = peft.get_peft_model(hf_twin(base), peft_config(tp.AdaLoraConfig(total_step=10, **config)))
    with torch.no_grad():  # move every trained tensor off its init (E = 0), as training would
        for p in peft_trainable(trained).values():
            p.add_(0.3 * torch.randn_like(p))
    if "rank_pattern" in config:
        trained.base_model.rankallocator.mask_using_rank_pattern(trained.base_model.model, config["rank_pattern"])
    trained.save_pretrained(tmp_path)
    model = tp.PeftModel.from_pretrained(base, tmp_path)
    assert relative_error(model(IDS), peft_logits(trained)) <= TOL
    if "rank_pattern" in config:
        assert [layer.rank for layer in model.active.layers] == [2, 4, 1, 0]  # model order
    # and PEFT's in-memory state dict, as it is
    again = tp.get_peft_model(base, model.active.config)
    again.load_adapter_state_dict(peft.get_peft_model_state_dict(trained))
    assert relative_error(again(IDS), peft_logits(trained)) <= TOL
