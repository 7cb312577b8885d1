"""Weighted combination of LoRA adapters (`PeftModel.add_weighted_adapter`, tinypeft/methods/lora_combine.py).

Each combined update ΔW = s (B A)ᵀ is checked against its definition, computed here independently of the code:
- `cat`: the weighted sum Σ w_i ΔW_i of the adapters' updates;
- the svd types: a best rank-k approximation of the merged task vectors (Eckart–Young: its error is the norm of
  the dropped singular values, its rank is k), and the merge itself at full rank;
- TIES, DARE and magnitude pruning: the steps (trim, elect sign, disjoint mean; drop and rescale) written out
  entry by entry; DARE's drop under a fixed seed exactly, and its expectation over many seeds;
- the factor types (`linear`, ...): the merge of the A's and of the B's apart, whose product has cross terms.
Then against PEFT 0.21.2 in float64, every type (DARE with PEFT's draws replaced by ours), and where PEFT is
wrong a test shows its result beside the right one: rsLoRA (√r too large), DoRA and lora_bias (dropped), all
huggingface/peft #3761; `linear`'s cross terms (#3004). PEFT holds the weights as a float32 tensor, so the
comparisons use weights (and, for the factor types, √|w s|) that float32 holds exactly; a test shows that
rounding apart.
"""

from __future__ import annotations

import itertools

import numpy as np
import peft
import peft.utils.merge_utils as peft_merge_utils
import pytest
import torch
from hf_utils import hf_twin
from hypothesis import given, settings
from hypothesis import strategies as st
from multi_adapters import peft_config, peft_delta, peft_twin, small_base, with_adapters

import tinypeft as tp
from tinypeft.config import linear_module_names
from tinypeft.errors import ConfigError
from tinypeft.gradcheck import relative_error
from tinypeft.methods.lora_combine import COMBINATIONS, lora_delta, merge_task_tensors

TOL = 1e-12  # float64, the same formulas or their definitions; measured <= 4e-15
IDS = np.random.default_rng(0).integers(0, 31, size=(2, 7))
ALL_TYPES = list(COMBINATIONS)
PRUNED = [t for t in ALL_TYPES if COMBINATIONS[t][0] not in ("task_arithmetic", "cat")]
SVD_TYPES = [t for t in ALL_TYPES if COMBINATIONS[t][1] == "delta"]


def two_adapters(r_b: int = 2, alpha_b: float = 8) -> tp.PeftModel:
    """Adapters t1 (r 2, s 1, on c_attn and c_proj) and t2 (s alpha_b / r_b, on c_attn and mlp.c_fc): they overlap
    on c_attn."""
    configs = {
        "t1": tp.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["c_attn", "c_proj"]),
        "t2": tp.LoraConfig(r=r_b, lora_alpha=alpha_b, init_lora_weights=False, target_modules=["c_attn", "mlp.c_fc"]),
    }
    return with_adapters(small_base(), configs)


def deltas(model: tp.PeftModel, name: str) -> dict[str, np.ndarray]:
    """Adapter `name`'s update of every linear module (0 where it does not target it)."""
    adapter = model.adapters[name]
    out = {
        m: np.zeros(model.base_model.params[m + ".weight"].shape) for m in linear_module_names(model.base_model.config)
    }
    for layer in adapter.layers:
        out[layer.module] = lora_delta(adapter, layer)
    return out


def factors(model: tp.PeftModel, name: str, module: str) -> tuple[np.ndarray, np.ndarray, float]:
    adapter = model.adapters[name]
    layer = next(lay for lay in adapter.layers if lay.module == module)
    return adapter.params[layer.lora_A], adapter.params[layer.lora_B], adapter.config.scaling


def fix_peft_svd_signs(monkeypatch) -> None:
    """Give PEFT's SVD tinypeft's sign convention (the largest |entry| of each left singular vector positive). The
    product U S Vᵀ is the same either way; svd_clamp's signed quantile is not, and LAPACK's sign choice differs
    between torch and NumPy (seen: an (8, 24) matrix)."""
    svd = torch.linalg.svd

    def flipped(M, full_matrices=True, driver=None):
        U, S, Vh = svd(M, full_matrices=full_matrices, driver=driver)
        k = S.shape[0]
        largest = U[:, :k].gather(0, U[:, :k].abs().argmax(dim=0, keepdim=True))[0]
        signs = torch.where(largest < 0, -1.0, 1.0).to(U.dtype)
        return torch.cat([U[:, :k] * signs, U[:, k:]], dim=1), S, torch.cat([Vh[:k] * signs[:, None], Vh[k:]])

    monkeypatch.setattr(torch.linalg, "svd", flipped)


def replay_peft_draws(monkeypatch, seed: int) -> None:
    """Make PEFT's DARE drop draw its masks as tinypeft documents (rng.random(shape) < density, one generator,
    one draw per tensor): if both libraries draw in the same order, they drop the same entries."""
    rng = np.random.default_rng(seed)

    def random_pruning(tensor, density, rescale):
        keep = torch.tensor(rng.random(tuple(tensor.shape)) < density)
        return tensor * keep / density if rescale else tensor * keep

    monkeypatch.setattr(peft_merge_utils, "random_pruning", random_pruning)


# ------------------------------------------------------------------ against PEFT
OPTIONS = [(t, {"density": 0.5} if t in PRUNED else {}) for t in ALL_TYPES] + [
    ("svd", {"svd_rank": 1}),
    ("svd", {"svd_rank": 2, "svd_clamp": 0.8}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("dare_ties_svd", {"density": 0.3, "majority_sign_method": "frequency", "svd_clamp": 0.95}),
    ("magnitude_prune_svd", {"density": 1.0}),
]


@pytest.mark.parametrize(
    ("kind", "options"), OPTIONS, ids=[f"{k}-{'-'.join(map(str, o.values()))}" for k, o in OPTIONS]
)
def test_every_combination_type_matches_peft(monkeypatch, kind, options):
    """Weights 0.25 and -0.5625 with scalings 1 and 4: c = w s is ±(a square of a float32 number), so PEFT's
    float32 weight tensors hold them exactly. Measured: <= 3.4e-15 (svd types), <= 1.2e-16 (the others)."""
    model = two_adapters()
    twin = peft_twin(model)
    model.add_weighted_adapter(["t1", "t2"], [0.25, -0.5625], "c", combination_type=kind, seed=3, **options)
    replay_peft_draws(monkeypatch, 3)
    fix_peft_svd_signs(monkeypatch)
    twin.add_weighted_adapter(["t1", "t2"], [0.25, -0.5625], "c", combination_type=kind, **options)
    ours = model.adapters["c"]
    assert ours.config.r == twin.peft_config["c"].r
    expected_targets = {
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert {layer.module for layer in ours.layers} == expected_targets
    for layer in ours.layers:
        assert relative_error(lora_delta(ours, layer), peft_delta(twin, layer.module, "c")) <= TOL, layer.module
    model.set_adapter("c")
    twin.set_adapter("c")
    assert relative_error(model(IDS), twin(input_ids=torch.tensor(IDS)).logits.detach().numpy()) <= TOL


@pytest.mark.parametrize("kind", ["svd", "linear"])
def test_peft_rounds_the_weights_to_float32(kind):
    """PEFT makes its weights a float32 tensor (`torch.tensor(valid_weights)`): with w = 0.7 its update differs
    from ours by ~1e-8, and equals ours computed with float32(0.7) to 1e-12 for the svd types (whose weights
    multiply ΔW); for `linear` the rounded numbers are √|w s| (measured 7e-8 apart). tinypeft keeps float64."""
    model = two_adapters(alpha_b=5)
    twin = peft_twin(model)
    model.add_weighted_adapter(["t1", "t2"], [0.7, -1.3], "c", combination_type=kind)
    rounded = [float(np.float32(0.7)), float(np.float32(-1.3))]
    model.add_weighted_adapter(["t1", "t2"], rounded, "rounded", combination_type=kind)
    twin.add_weighted_adapter(["t1", "t2"], [0.7, -1.3], "c", combination_type=kind)
    module = "transformer.h.0.attn.c_attn"
    theirs = peft_delta(twin, module, "c")
    assert 1e-9 < relative_error(deltas(model, "c")[module], theirs) < 1e-6
    if kind == "svd":
        assert relative_error(deltas(model, "rounded")[module], theirs) <= TOL


def test_a_combined_adapter_loads_in_peft_and_back(tmp_path):
    model = two_adapters(r_b=3)
    model.add_weighted_adapter(["t1", "t2"], [0.8, -0.4], "c", combination_type="cat")
    model.save_pretrained(tmp_path, adapter_name="c")
    loaded = peft.PeftModel.from_pretrained(hf_twin(model.base_model), tmp_path).eval()
    model.set_adapter("c")
    assert relative_error(model(IDS), loaded(input_ids=torch.tensor(IDS)).logits.detach().numpy()) <= TOL
    back = tp.PeftModel.from_pretrained(model.base_model, tmp_path)
    assert relative_error(back(IDS), model(IDS)) == 0.0


# ------------------------------------------------------------------ against the definitions
weights_st = st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 1e-3), min_size=2, max_size=2)


@settings(max_examples=10)
@given(weights=weights_st, r_b=st.integers(1, 4))
def test_cat_is_the_weighted_sum_of_the_updates(weights, r_b):
    """cat: ΔW_c = Σ w_i ΔW_i on every layer (adapters of different ranks and targets), and the model with it
    computes what the base with W + Σ w_i ΔW_i computes."""
    model = two_adapters(r_b=r_b, alpha_b=3)
    model.add_weighted_adapter(["t1", "t2"], weights, "c", combination_type="cat")
    assert model.adapters["c"].config.r == 2 + r_b
    da, db, dc = deltas(model, "t1"), deltas(model, "t2"), deltas(model, "c")
    params = dict(model.base_model.params)
    for m in da:
        expected = weights[0] * da[m] + weights[1] * db[m]
        assert relative_error(dc[m], expected, floor=1e-300) <= TOL, m
        params[m + ".weight"] = params[m + ".weight"] + expected
    model.set_adapter("c")
    base_with_sum = tp.GPT.with_params(model.base_model.config, np, params)
    assert relative_error(model(IDS), base_with_sum(IDS)) <= TOL


def best_rank_k_error(M: np.ndarray, k: int) -> float:
    return float(np.sqrt((np.linalg.svd(M, compute_uv=False)[k:] ** 2).sum()))


@settings(max_examples=10)
@given(weights=weights_st, svd_rank=st.integers(1, 5))
def test_svd_is_the_best_rank_k_approximation_of_the_weighted_sum(weights, svd_rank):
    """svd: ΔW_c has rank <= k and ‖Σ w_i ΔW_i − ΔW_c‖_F equals the norm of the singular values past k, which
    only a best rank-k approximation achieves (Eckart–Young). Past the sum's own rank, A's rows and B's columns
    are 0 (LAPACK's basis of the null space would be arbitrary, and svd_clamp's quantile would see it)."""
    model = two_adapters(r_b=3, alpha_b=3)
    model.add_weighted_adapter(["t1", "t2"], weights, "c", combination_type="svd", svd_rank=svd_rank)
    da, db, dc = deltas(model, "t1"), deltas(model, "t2"), deltas(model, "c")
    for m in da:
        target = weights[0] * da[m] + weights[1] * db[m]
        if not target.any():
            continue
        scale = np.linalg.norm(target)
        assert np.linalg.svd(dc[m], compute_uv=False)[svd_rank:].max(initial=0) <= 1e-12 * scale, m
        assert abs(np.linalg.norm(target - dc[m]) - best_rank_k_error(target, svd_rank)) <= TOL * scale, m
        A, B, _ = factors(model, "c", m)
        beyond = slice(np.linalg.matrix_rank(target), None)  # the null space's basis is arbitrary: zeros instead
        assert not A[beyond].any() and not B[:, beyond].any(), m


def ties_reference(tensors, weights, density, method):
    """TIES entry by entry, as Yadav et al. 2023 describe it (PEFT: the sign is elected on the unweighted,
    trimmed tensors; the weights apply in the disjoint mean)."""
    trimmed = [magnitude_reference(t, density) for t in tensors]
    out = np.zeros(tensors[0].shape)
    for idx in np.ndindex(out.shape):
        values = [t[idx] for t in trimmed]
        vote = sum(values) if method == "total" else sum(np.sign(v) for v in values)
        sign = 1.0 if vote >= 0 else -1.0
        agreeing = [w * v for w, v in zip(weights, values, strict=True) if np.sign(v) == sign]
        out[idx] = sum(agreeing) / max(len(agreeing), 1)
    return out


def magnitude_reference(t, density):
    """Keep the ⌊density · size⌋ entries of largest magnitude (the test's tensors have no equal magnitudes)."""
    k = int(density * t.size)
    flat = np.abs(t).ravel()
    threshold = np.sort(flat)[::-1][k - 1] if k else np.inf
    return np.where(np.abs(t) >= threshold, t, 0.0)


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.6, 1.0])
def test_ties_and_magnitude_prune_follow_their_steps(method, density):
    """At full rank (svd_rank = min(in, out)) an svd type's update is its merge of the task vectors itself; the
    factor types apply the same steps to A (weights sgn(c)√|c|) and to B (weights √|c|), c = w s."""
    model = two_adapters(alpha_b=3)
    w = [0.9, -1.4]
    full = {"svd_rank": 8}
    model.add_weighted_adapter(["t1", "t2"], w, "ts", "ties_svd", density=density, majority_sign_method=method, **full)
    model.add_weighted_adapter(["t1", "t2"], w, "ms", "magnitude_prune_svd", density=density, **full)
    model.add_weighted_adapter(["t1", "t2"], w, "t", "ties", density=density, majority_sign_method=method)
    m = "transformer.h.1.attn.c_attn"  # both adapters target it
    da, db = deltas(model, "t1")[m], deltas(model, "t2")[m]
    assert relative_error(deltas(model, "ts")[m], ties_reference([da, db], w, density, method)) <= TOL
    pruned = w[0] * magnitude_reference(da, density) + w[1] * magnitude_reference(db, density)
    assert relative_error(deltas(model, "ms")[m], pruned) <= TOL
    (Aa, Ba, sa), (Ab, Bb, sb) = factors(model, "t1", m), factors(model, "t2", m)
    c = [w[0] * sa, w[1] * sb]
    A_ref = ties_reference([Aa, Ab], [np.sign(ci) * np.sqrt(abs(ci)) for ci in c], density, method)
    B_ref = ties_reference([Ba, Bb], [np.sqrt(abs(ci)) for ci in c], density, method)
    A, B, s = factors(model, "t", m)
    assert s == 1.0
    assert relative_error(A, A_ref) <= TOL and relative_error(B, B_ref) <= TOL
    assert relative_error(deltas(model, "t")[m], (B_ref @ A_ref).T) <= TOL


def drop(t, density, rng):
    return np.where(rng.random(t.shape) < density, t / density, 0.0)


def dare_reference(model, names, weights, density, seed, kind):
    """DARE as documented: one generator, one draw per tensor, layers in model order, the adapters in the order
    given, their A's then their B's (factor types) or their updates (svd types)."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in linear_module_names(model.base_model.config):
        present = [
            (n, w)
            for n, w in zip(names, weights, strict=True)
            if any(lay.module == m for lay in model.adapters[n].layers)
        ]
        if not present:
            continue
        if kind == "svd":
            out[m] = sum(w * drop(deltas(model, n)[m], density, rng) for n, w in present)
            continue
        As, Bs = zip(*[factors(model, n, m)[:2] for n, _ in present], strict=True)
        c = [w * factors(model, n, m)[2] for n, w in present]
        A = sum(np.sign(ci) * np.sqrt(abs(ci)) * drop(Ai, density, rng) for ci, Ai in zip(c, As, strict=True))
        B = sum(np.sqrt(abs(ci)) * drop(Bi, density, rng) for ci, Bi in zip(c, Bs, strict=True))
        out[m] = (B @ A).T
    return out


@pytest.mark.parametrize("kind", ["svd", "factors"])
def test_dare_drops_exactly_what_its_documented_generator_draws(kind):
    model = two_adapters(alpha_b=3)
    w, density, seed = [0.9, -1.4], 0.4, 11
    combination = "dare_linear_svd" if kind == "svd" else "dare_linear"
    model.add_weighted_adapter(
        ["t1", "t2"], w, "d", combination, density=density, seed=seed, **({"svd_rank": 8} if kind == "svd" else {})
    )
    expected = dare_reference(model, ["t1", "t2"], w, density, seed, kind)
    got = deltas(model, "d")
    assert set(expected) == {layer.module for layer in model.adapters["d"].layers}
    for m, value in expected.items():
        assert relative_error(got[m], value) <= TOL, m
    model.add_weighted_adapter(
        ["t1", "t2"],
        w,
        "other_seed",
        combination,
        density=density,
        seed=seed + 1,
        **({"svd_rank": 8} if kind == "svd" else {}),
    )
    assert (
        relative_error(deltas(model, "other_seed")["transformer.h.0.attn.c_attn"], got["transformer.h.0.attn.c_attn"])
        > 0.01
    )


def test_dare_is_unbiased():
    """E[drop(t)/density] = t, so the mean over N seeds of DARE's merge tends to Σ w_i t_i (here the two adapters'
    updates of one layer, as dare_linear_svd merges them). Each entry's variance is Σ_i w_i² t_i² (1 − d)/d; the
    mean's squared Frobenius error has expectation V/N (V: the sum of those variances), and the test allows
    3 √(V/N) (measured: 0.99 √(V/N)). A drop that forgot to rescale would miss by (1 − d)‖Σ w_i t_i‖, 10.6 times
    that bound."""
    model = two_adapters(alpha_b=3)
    w, density, N = [0.9, -1.4], 0.6, 4000
    m = "transformer.h.0.attn.c_attn"
    t = [deltas(model, "t1")[m], deltas(model, "t2")[m]]
    mean = (
        sum(merge_task_tensors("dare_linear", t, w, density, "total", np.random.default_rng(seed)) for seed in range(N))
        / N
    )
    expected = w[0] * t[0] + w[1] * t[1]
    variance = ((w[0] * t[0]) ** 2 + (w[1] * t[1]) ** 2).sum() * (1 - density) / density
    bound = 3 * np.sqrt(variance / N)
    assert np.linalg.norm(mean - expected) <= bound, (np.linalg.norm(mean - expected), bound)
    assert (1 - density) * np.linalg.norm(expected) > 10 * bound


def test_linear_is_the_sum_of_the_factors_with_its_cross_terms():
    """linear: B_c A_c = (Σ_i √|c_i| B_i)(Σ_j sgn(c_j)√|c_j| A_j), the weighted sum Σ c_i B_i A_i plus cross
    terms B_i A_j (huggingface/peft #3004), as PEFT computes it. `cat` gives the weighted sum exactly. For one
    adapter there is no cross term: weight −1 gives −ΔW exactly (#3004's report, fixed in PEFT 0.21.2 too)."""
    model = two_adapters()  # scalings 1 and 4: PEFT's float32 weights hold √|w s| exactly
    w = [1.0, -1.0]
    model.add_weighted_adapter(["t1", "t2"], w, "lin", combination_type="linear")
    model.add_weighted_adapter(["t1", "t2"], w, "cat", combination_type="cat")
    model.add_weighted_adapter(["t1"], [-1.0], "minus_a", combination_type="linear")
    m = "transformer.h.0.attn.c_attn"
    (Aa, Ba, sa), (Ab, Bb, sb) = factors(model, "t1", m), factors(model, "t2", m)
    c = [w[0] * sa, w[1] * sb]
    A, B = [Aa, Ab], [Ba, Bb]
    double_sum = sum(
        np.sqrt(abs(c[i])) * np.sqrt(abs(c[j])) * np.sign(c[j]) * B[i] @ A[j]
        for i, j in itertools.product(range(2), repeat=2)
    )
    right = c[0] * Ba @ Aa + c[1] * Bb @ Ab
    assert relative_error(deltas(model, "lin")[m], double_sum.T) <= TOL
    assert relative_error(deltas(model, "cat")[m], right.T) <= TOL
    assert relative_error(deltas(model, "lin")[m], right.T) > 0.1  # the cross terms are not small
    assert relative_error(deltas(model, "minus_a")[m], -deltas(model, "t1")[m]) <= TOL
    twin = peft_twin(model, ["t1", "t2"])
    twin.add_weighted_adapter(["t1", "t2"], w, "lin", combination_type="linear")
    assert relative_error(peft_delta(twin, m, "lin"), double_sum.T) <= TOL  # PEFT computes the same


# ------------------------------------------------------------------ where PEFT is wrong (#3761)
@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_rslora_adapters_combine_to_their_update_where_peft_scales_it_by_sqrt_r(kind):
    """An rsLoRA adapter (s = alpha/√r) combined alone with weight 1 is itself again: our logits equal its own.
    PEFT copies use_rslora to the combined adapter, whose scaling becomes r/√r = √r instead of 1: its update
    is √r times ours (here r = 4: twice)."""
    configs = {
        "t1": tp.LoraConfig(r=4, lora_alpha=2, use_rslora=True, init_lora_weights=False, target_modules=["c_attn"])
    }
    model = with_adapters(small_base(), configs)
    twin = peft_twin(model)
    alone = model(IDS)
    model.add_weighted_adapter(["t1"], [1.0], "c", combination_type=kind)
    twin.add_weighted_adapter(["t1"], [1.0], "c", combination_type=kind)
    model.set_adapter("c")
    assert relative_error(model(IDS), alone) <= TOL
    m = "transformer.h.0.attn.c_attn"
    assert relative_error(peft_delta(twin, m, "c"), 2.0 * deltas(model, "c")[m]) <= TOL
    twin.set_adapter("c")
    assert relative_error(twin(input_ids=torch.tensor(IDS)).logits.detach().numpy(), alone) > 0.05


def test_dora_is_refused_where_peft_drops_the_magnitudes():
    """A DoRA adapter's update (m/‖W + sBA‖)(W + sBA) − W is not s·BA: combining its A and B loses m. PEFT does,
    silently: one DoRA adapter combined alone with weight 1 gives other logits than the adapter (measured 0.37
    relative). tinypeft refuses."""
    configs = {
        "t1": tp.LoraConfig(r=2, lora_alpha=2, use_dora=True, init_lora_weights=False, target_modules=["c_attn"])
    }
    model = with_adapters(small_base(), configs)
    twin = peft_twin(model)
    alone = twin(input_ids=torch.tensor(IDS)).logits.detach().numpy()
    assert relative_error(model(IDS), alone) <= TOL
    with pytest.raises(ConfigError, match=r"DoRA.*not a low-rank product.*3761"):
        model.add_weighted_adapter(["t1"], [1.0], "c", combination_type="linear")
    twin.add_weighted_adapter(["t1"], [1.0], "c", combination_type="linear")
    twin.set_adapter("c")
    assert relative_error(twin(input_ids=torch.tensor(IDS)).logits.detach().numpy(), alone) > 0.05


def test_peft_drops_lora_bias_which_tinypeft_does_not_take():
    """PEFT's lora_bias (a bias on lora_B) is not carried into the combination (#3761): one adapter combined
    alone with weight 1 changes the logits. tinypeft has no lora_bias: LoraConfig refuses it."""
    base = small_base()
    torch.manual_seed(0)
    config = peft_config(tp.LoraConfig(r=2, target_modules=["c_attn"]), lora_bias=True, init_lora_weights=False)
    twin = peft.get_peft_model(hf_twin(base), config, adapter_name="t1").eval()
    with torch.no_grad():
        twin.base_model.model.transformer.h[0].attn.c_attn.lora_B["t1"].bias.normal_()
    alone = twin(input_ids=torch.tensor(IDS)).logits.detach().numpy()
    twin.add_weighted_adapter(["t1"], [1.0], "c", combination_type="linear")
    twin.set_adapter("c")
    assert relative_error(twin(input_ids=torch.tensor(IDS)).logits.detach().numpy(), alone) > 0.05
    with pytest.raises(ConfigError, match="lora_bias"):
        tp.LoraConfig(lora_bias=True)


@pytest.mark.parametrize(
    ("changes", "says"),
    [({"init_lora_weights": "pissa"}, "PiSSA"), ({"bias": "all"}, "trains biases too")],
)
def test_adapters_whose_update_is_more_than_sBA_are_refused(changes, says):
    configs = {"t1": tp.LoraConfig(r=2, target_modules=["c_attn"], **changes)}
    model = with_adapters(small_base(), configs)
    with pytest.raises(ConfigError, match=says):
        model.add_weighted_adapter(["t1"], [1.0], "c")
    assert set(model.adapters) == {"t1"}
