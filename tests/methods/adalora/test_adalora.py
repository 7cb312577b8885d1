"""AdaLoRA on its own (the comparisons with PEFT are in test_adalora_peft.py).

- Gradients three ways over random models and random AdaLoRA configs (init_r, targets, alpha, dropout, the
  regulariser's weight, a rank_pattern), always with E != 0 (at E = 0, dA vanishes and a check proves nothing):
  hand-written == autograd of the shipped forward (<= 1e-10 relative) and == a fourth-order finite difference along
  random directions (<= 1e-6), the regulariser included; the shared harness (engine, public API, merge, unmerge)
  over hypothesis-drawn cases. A backward off by 0.1%, in the layer or in the regulariser, is caught.
- The regulariser alone: its value is w · the mean of the 2L Frobenius norms, its hand gradient autograd's.
- The allocator: the budget schedule's three phases, the mask of exactly init_bgt − budget triplets, E of the pruned
  triplets zero after every step of the final phase; after_step is a no-op for every other method.
"""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import assert_checks_catch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_strategies import well_conditioned_cases
from strategies import gpt_configs, perturbed_model

import tinypeft as tp
import tinypeft.methods.adalora as adalora_module
import tinypeft.methods.adalora_training as training_module
from tinypeft.gradcheck import autograd_grads, check_gradients, relative_error
from tinypeft.harness import Batch, HarnessCase, check_case
from tinypeft.methods.adalora_training import orthogonality_backward, orthogonality_forward

AUTOGRAD_TOL = 1e-10
DIRECTIONAL_TOL = 1e-6
MERGE_TOL = 1e-12
TARGET_CHOICES = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "c_proj")


@st.composite
def adalora_configs(draw, dropout: bool = True) -> tp.AdaLoraConfig:
    """A random AdaLoraConfig: init_r 1..5 (AdaLoRA's r is not bounded by the layer sizes), a target subset, alpha,
    sometimes dropout, a regulariser weight (0 included); A, E, B all ~ N(0, 1)."""
    init_r = draw(st.integers(1, 5))
    return tp.AdaLoraConfig(
        init_r=init_r,
        target_r=draw(st.integers(0, init_r - 1)),
        total_step=10,
        lora_alpha=draw(st.sampled_from([1, 4, 8, 0.5])),
        orth_reg_weight=draw(st.sampled_from([0.0, 0.5, 0.5, 2.0])),
        target_modules=draw(st.lists(st.sampled_from(TARGET_CHOICES), min_size=1, max_size=3, unique=True)),
        lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.25])) if dropout else 0.0,
        init_lora_weights=False,
    )


def perturb(model: tp.PeftModel, seed: int, scale: float = 0.3) -> tp.PeftModel:
    """Every trained tensor moved off its init, so no gradient vanishes by construction, then sized as a trained
    AdaLoRA's are: A's rows and B's columns of about unit length (the regulariser's aim: Gram matrices near I, so
    the regulariser does not dwarf the loss), and E such that the update c B (A ⊙ E) has entries about the size
    of W's (0.3). An update that dominates the layer saturates the attention and makes the loss so curved that
    finite differences err (lora_strategies scales LoRA's B for the same reason)."""
    rng = np.random.default_rng(seed)
    params = model.active.params
    c = model.active.config.scale
    for name, value in params.items():
        moved = value + scale * rng.standard_normal(value.shape)
        if name.endswith("lora_A"):
            moved = moved / moved.shape[1] ** 0.5  # rows of length about 1
        elif name.endswith("lora_B"):
            moved = moved / moved.shape[0] ** 0.5  # columns of length about 1
        else:  # E: entries of B (A ⊙ E) are about |E| √r / √(in · out)
            layer = next(lay for lay in model.active.layers if lay.lora_E == name)
            size = (layer.in_features * layer.out_features / max(1, len(value))) ** 0.5
            moved = moved * (0.3 * size / c)
        params[name] = moved
    return model


def small_model(dtype: str = "float64", seed: int = 0, **kw) -> tp.GPT:
    cfg = dict(vocab_size=29, n_positions=16, n_embd=8, n_layer=2, n_head=2, dtype=dtype) | kw
    return perturbed_model(tp.GPTConfig(**cfg), seed)


def random_adalora(base: tp.GPT, seed: int = 0, **config) -> tp.PeftModel:
    config = {"init_r": 3, "target_r": 1, "total_step": 10, "target_modules": ["c_attn", "c_proj", "c_fc"],
              "init_lora_weights": False} | config  # fmt: skip
    return perturb(tp.get_peft_model(base, tp.AdaLoraConfig(**config), seed=seed), seed)


def ids_for(vocab_size: int = 29, shape=(2, 9), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape)


def assert_report_ok(report: dict, model: tp.PeftModel) -> None:
    assert set(report) - {"__all__"} == set(model.trainable_parameters())
    assert max(e["autograd"] for e in report.values()) <= AUTOGRAD_TOL, report
    assert max(e["directional"] for e in report.values()) <= DIRECTIONAL_TOL, report


# ------------------------------------------------------------------ gradients
@settings(max_examples=30)
@given(well_conditioned_cases(min_len=2), st.data())
def test_gradients_three_ways(case, data):
    config = data.draw(adalora_configs())
    model = perturb(tp.get_peft_model(case.model, config, seed=case.seed), case.seed).train()  # dropout on
    report = check_gradients(model, case.ids, labels=case.labels, attention_mask=case.mask, seed=case.seed)
    assert_report_ok(report, model)


@settings(max_examples=15)
@given(well_conditioned_cases(min_len=2, padding=True), st.data())
def test_gradients_through_output_weights_with_padding(case, data):
    """The functional sum(logits * R) reaches every position, the last included (no regulariser: it is a loss's)."""
    config = data.draw(adalora_configs(dropout=False))
    model = perturb(tp.get_peft_model(case.model, config, seed=case.seed), case.seed)
    report = check_gradients(model, case.ids, attention_mask=case.mask, output_weights=case.output_weights)
    assert_report_ok(report, model)


@settings(max_examples=10)
@given(
    cfg=gpt_configs(max_layers=3, min_embd=3),
    B=st.integers(1, 3),
    T=st.integers(2, 8),
    padding=st.sampled_from(["none", "mixed", "ends"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_the_harness_passes_over_drawn_cases(cfg, B, T, padding, seed, data):
    """Gradients three ways, the engine bitwise, the public API, merged == unmerged, unmerge exact."""
    config = data.draw(adalora_configs(dropout=False))
    report = check_case(lambda _: config, HarnessCase("drawn", cfg, Batch(B, T, padding), seed))
    assert not report.failures, report.failures


def test_checks_catch_a_wrong_adalora_backward(monkeypatch):
    model = random_adalora(small_model())
    ids = ids_for()
    assert_checks_catch(monkeypatch, adalora_module, "adalora_backward", model, ids, ids)


def test_checks_catch_a_wrong_regulariser_gradient(monkeypatch):
    model = random_adalora(small_model(), orth_reg_weight=3.0)
    ids = ids_for()
    assert max(e["autograd"] for e in check_gradients(model, ids, labels=ids).values()) <= AUTOGRAD_TOL
    original = training_module.orthogonality_backward
    monkeypatch.setattr(training_module, "orthogonality_backward", lambda c: [(a * 1.001, b) for a, b in original(c)])
    broken = check_gradients(model, ids, labels=ids)
    assert max(e["autograd"] for e in broken.values()) > 1e-5
    assert max(e["directional"] for e in broken.values()) > 1e-5


# ------------------------------------------------------------------ the regulariser
@pytest.mark.parametrize("shapes", [[(3, 8, 24)], [(2, 5, 7), (4, 9, 3), (1, 6, 6)]])
def test_the_regulariser_and_its_gradient(shapes):
    """R = w/(2L) Σ (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F), its hand gradient autograd's, and 0 with its gradient at an
    exactly orthonormal pair (where the norm has no derivative; torch's gradient there is 0 too)."""
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))) for r, n_in, n_out in shapes]
    w = 0.7
    value, cache = orthogonality_forward(pairs, w)
    norms = [np.linalg.norm(A @ A.T - np.eye(len(A))) + np.linalg.norm(B.T @ B - np.eye(B.shape[1])) for A, B in pairs]
    assert abs(value - w * sum(norms) / (2 * len(pairs))) <= 1e-14 * value
    params = {f"{i}{k}": m for i, pair in enumerate(pairs) for k, m in zip("AB", pair, strict=True)}
    names = list(params)
    auto = autograd_grads(
        lambda p: orthogonality_forward([(p[f"{i}A"], p[f"{i}B"]) for i in range(len(pairs))], w)[0], params, names
    )
    hand = [g for pair in orthogonality_backward(cache) for g in pair]
    for name, g in zip(names, hand, strict=True):
        assert relative_error(g, auto[name]) <= 1e-13, name
    value, cache = orthogonality_forward([(np.eye(3, 6), np.eye(6, 3))], w)  # exactly orthonormal rows, columns
    assert value == 0.0
    ((dA, dB),) = orthogonality_backward(cache)
    assert not dA.any() and not dB.any()


def test_the_training_loss_includes_the_regulariser_and_evaluation_does_not():
    model = random_adalora(small_model(), orth_reg_weight=2.0)
    ids = ids_for()
    with_term, _ = model.loss_and_grad(ids, ids)
    evaluated = model.loss(ids, ids)
    model.active.config.orth_reg_weight = 0.0
    without, _ = model.loss_and_grad(ids, ids)
    A_B = [(model.active.params[lay.lora_A], model.active.params[lay.lora_B]) for lay in model.active.layers]
    assert abs(with_term - without - orthogonality_forward(A_B, 2.0)[0]) <= 1e-12 * with_term
    assert evaluated == without


# ------------------------------------------------------------------ init, merge
@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"], r".*\.h\.1\.mlp\..*"])
def test_the_default_init_is_the_base_model_bit_for_bit(targets):
    base = small_model()
    model = tp.get_peft_model(base, tp.AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=targets))
    for layer in model.active.layers:
        assert not model.active.params[layer.lora_E].any()
    ids = ids_for()
    np.testing.assert_array_equal(model(ids), base(ids))


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    base = small_model()
    originals = dict(base.params)
    model = random_adalora(base)
    ids = ids_for()
    unmerged = model(ids)
    assert relative_error(unmerged, base(ids)) > 1e-3  # the adapter does something
    merged = model.merge_and_unload()
    assert relative_error(merged(ids), unmerged) <= MERGE_TOL
    assert all(base.params[k] is v for k, v in originals.items())
    model.merge_adapter()
    assert relative_error(model(ids), unmerged) <= MERGE_TOL
    model.unmerge_adapter()
    assert all(base.params[k] is v for k, v in originals.items())  # the very arrays, bit for bit
    np.testing.assert_array_equal(model(ids), unmerged)


def test_the_merge_adds_the_delta_weight():
    base = small_model()
    model = random_adalora(base, target_modules=["c_fc"], lora_alpha=5)
    merged = model.merge_and_unload().params
    adapter = model.active
    for layer in adapter.layers:
        A, E, B = (adapter.params[n] for n in (layer.lora_A, layer.lora_E, layer.lora_B))
        delta = (B @ np.diag(E[:, 0]) @ A).T * 5 / (3 + 1e-5)  # c (P Λ Q)ᵀ, c = alpha / (ranknum + 1e-5)
        assert relative_error(merged[layer.weight], base.params[layer.weight] + delta) <= 1e-15


# ------------------------------------------------------------------ the allocator
def test_the_budget_schedule():
    """init_bgt through tinit, a cubic decay to target_bgt at T − tfinal (masking every deltaT steps), then
    target_bgt."""
    model = random_adalora(small_model(), init_r=6, target_r=2, tinit=3, tfinal=4, deltaT=2, total_step=20)
    allocator = model.active.allocator
    L = len(model.active.layers)
    assert (allocator.init_bgt, allocator.target_bgt) == (6 * L, 2 * L)
    schedule = [allocator.budget_schedule(t) for t in range(21)]
    assert all(b == 6 * L and not m for b, m in schedule[:4])
    budgets = [b for b, _ in schedule[4:17]]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 2 * L
    assert [m for _, m in schedule[4:16]] == [t % 2 == 0 for t in range(4, 16)]
    coeff = 1 - (5 - 3) / (20 - 4 - 3)
    assert schedule[5][0] == int(4 * L * coeff**3 + 2 * L)
    assert all(b == 2 * L and m for b, m in schedule[17:])


def test_a_mask_prunes_init_bgt_minus_budget_triplets_and_the_final_pattern_holds():
    model = random_adalora(small_model(), init_r=4, target_r=1, tinit=0, tfinal=2, total_step=6)
    adapter = model.active
    rng = np.random.default_rng(1)
    for step in range(9):
        grads = {k: rng.standard_normal(v.shape) for k, v in adapter.params.items()}
        for v in adapter.params.values():
            v += 0.01 * rng.standard_normal(v.shape)  # an optimizer's step: E's pruned entries move again
        model.after_step(grads, step)
        pattern = adapter.config.rank_pattern
        if step == 0:  # step <= tinit: no mask yet
            assert pattern is None
            continue
        zero = sum(int((adapter.params[lay.lora_E] == 0).sum()) for lay in adapter.layers)
        kept = sum(sum(v) for v in pattern.values())
        budget = adapter.allocator.budget_schedule(step)[0]
        assert kept == budget and zero == adapter.allocator.init_bgt - budget, step  # random scores: no ties
        for layer in adapter.layers:
            pruned = ~np.asarray(pattern[layer.pattern_key])
            assert not adapter.params[layer.lora_E][pruned].any()
    assert kept == 1 * len(adapter.layers)
    assert adapter.allocator.exp_avg_ipt == {}  # the statistics dropped at the final mask


def test_after_step_changes_nothing_for_other_methods():
    model = tp.get_peft_model(small_model(), tp.LoraConfig(r=2, init_lora_weights=False))
    before = {k: v.copy() for k, v in model.trainable_parameters().items()}
    model.after_step({k: np.ones_like(v) for k, v in before.items()}, 0)
    for k, v in model.trainable_parameters().items():
        np.testing.assert_array_equal(v, before[k])


def test_finetune_trains_and_prunes():
    """tinypeft's train loop calls the allocator: after the run, the kept triplets are target_r a layer on
    average, and the pruned E entries are zero."""
    base = small_model()
    config = tp.AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=12, target_modules=["c_attn"])
    model = tp.get_peft_model(base, config)
    data = np.random.default_rng(0).integers(0, 29, size=500).astype(np.uint16)
    tp.train(model, data, tp.TrainConfig(steps=12, batch_size=2, seq_len=8, lr=3e-2, eval_every=0), progress=False,
             log=lambda _: None)  # fmt: skip
    pattern = config.rank_pattern
    assert sum(sum(v) for v in pattern.values()) <= 2 * len(model.active.layers)
    for layer in model.active.layers:
        assert not model.active.params[layer.lora_E][~np.asarray(pattern[layer.pattern_key])].any()


@pytest.mark.parametrize("pattern", [[True, False, True], [False, False, False]])
def test_a_rank_pattern_builds_pruned_layers_with_ranknum_init_r(pattern):
    """A layer of rank k < init_r computes with c = alpha / (init_r + 1e-5), as PEFT's loader keeps ranknum."""
    base = small_model(n_layer=1)
    config = tp.AdaLoraConfig(init_r=3, target_r=1, total_step=5, target_modules=["c_fc"], init_lora_weights=False,
                              rank_pattern={"transformer.h.0.mlp.c_fc.lora_E": pattern})  # fmt: skip
    model = perturb(tp.get_peft_model(base, config), 0)
    (layer,) = model.active.layers
    assert layer.rank == sum(pattern)
    assert model.active.params[layer.lora_A].shape == (sum(pattern), 8)
    ids = ids_for()
    if sum(pattern):
        assert_report_ok(check_gradients(model, ids, labels=ids), model)
    merged = model.merge_and_unload()
    assert relative_error(merged(ids), model(ids)) <= MERGE_TOL
