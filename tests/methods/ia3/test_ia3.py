"""(IA)^3: gradients three ways over random models, target sets and padding masks; ones init is the base
model bit for bit; merge equals the unmerged adapter and unmerge restores the base exactly; PEFT's target
and feedforward matching; PEFT's (out, 1) / (1, in) shapes on save and load; only the vectors train."""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import assert_checks_catch, assert_gradients_check, assert_only_adapter_changes
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import relative_error
from tinypeft.methods import ia3 as ia3_module

TARGETS = {
    "peft_gpt2_default": dict(),
    "every_linear": dict(
        target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], feedforward_modules=["c_fc", "mlp.c_proj"]
    ),
    "attention_only": dict(target_modules=["c_attn", "attn.c_proj"], feedforward_modules=[]),
    "feedforward_only": dict(target_modules=["c_fc", "mlp.c_proj"], feedforward_modules=["c_fc", "mlp.c_proj"]),
    "regexes": dict(target_modules=r"transformer\.h\.0\..*", feedforward_modules=r".*\.mlp\..*"),
}


def small(dtype="float64", **kw):
    cfg = dict(vocab_size=37, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype=dtype) | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


def random_ia3(base, targets="peft_gpt2_default", seed=0):
    return tp.get_peft_model(base, tp.IA3Config(init_ia3_weights=False, **TARGETS[targets]), seed=seed)


@settings(max_examples=20)
@given(cases(min_len=2), st.sampled_from(sorted(TARGETS)))
def test_gradients(case, targets):
    model = random_ia3(case.model, targets, case.seed)
    assert_gradients_check(model, case.ids, mask=case.mask, output_weights=case.output_weights)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


def test_checks_catch_a_wrong_ia3_backward(monkeypatch):
    model = random_ia3(small(), "every_linear")
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 6))
    assert_checks_catch(monkeypatch, ia3_module, "ia3_backward", model, ids, ids)


def test_ones_init_is_the_base_model_bit_for_bit():
    base = small()
    ids = np.random.default_rng(1).integers(0, 37, size=(3, 9))
    for targets in TARGETS:
        model = tp.get_peft_model(base, tp.IA3Config(**TARGETS[targets]))
        assert all(np.all(v == 1.0) for v in model.trainable_parameters().values())
        np.testing.assert_array_equal(model(ids), base(ids))


def test_vectors_scale_outputs_or_inputs():
    """c_attn's vector scales the layer's output, bias included; mlp.c_proj's scales its input."""
    base = small(n_layer=1)
    model = random_ia3(base)
    params = model.active.params
    l_attn = params["base_model.model.transformer.h.0.attn.c_attn.ia3_l"]
    l_mlp = params["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"]
    assert l_attn.shape == (36,) and l_mlp.shape == (48,)
    x = np.random.default_rng(0).standard_normal((2, 3, 12))
    W, b = base.params["transformer.h.0.attn.c_attn.weight"], base.params["transformer.h.0.attn.c_attn.bias"]
    sites = model.view().sites.linear
    y, _ = sites["transformer.h.0.attn.c_attn"].forward(model.view().params, "transformer.h.0.attn.c_attn", x)
    assert relative_error(y, (x @ W + b) * l_attn) <= 1e-15
    h = np.random.default_rng(1).standard_normal((2, 3, 48))
    W, b = base.params["transformer.h.0.mlp.c_proj.weight"], base.params["transformer.h.0.mlp.c_proj.bias"]
    y, _ = sites["transformer.h.0.mlp.c_proj"].forward(model.view().params, "transformer.h.0.mlp.c_proj", h)
    assert relative_error(y, (h * l_mlp) @ W + b) <= 1e-15


@pytest.mark.parametrize("targets", sorted(TARGETS))
def test_merge_equals_unmerged_and_unmerge_restores_the_base(targets):
    base = small()
    originals = {k: v.copy() for k, v in base.params.items()}
    model = random_ia3(base, targets)
    ids = np.random.default_rng(2).integers(0, 37, size=(2, 10))
    unmerged = model(ids)
    assert relative_error(unmerged, base(ids)) > 1e-3  # the adapter does something
    model.merge_adapter()
    assert relative_error(model(ids), unmerged) <= 1e-13
    changed = {k for k in base.params if not np.array_equal(base.params[k], originals[k])}
    assert changed and all(".c_" in k for k in changed)
    model.unmerge_adapter()
    for k, v in originals.items():
        np.testing.assert_array_equal(base.params[k], v, err_msg=k)  # exact, not divided back
    np.testing.assert_array_equal(model(ids), unmerged)
    merged = model.merge_and_unload()
    assert isinstance(merged, tp.GPT)
    assert relative_error(merged(ids), unmerged) <= 1e-13


def test_merge_scales_bias_only_for_output_targets():
    base = small(n_layer=1)
    model = random_ia3(base)
    merged = model.merge_and_unload().params
    l_attn = model.active.params["base_model.model.transformer.h.0.attn.c_attn.ia3_l"]
    l_mlp = model.active.params["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"]
    p = base.params
    np.testing.assert_array_equal(
        merged["transformer.h.0.attn.c_attn.weight"], p["transformer.h.0.attn.c_attn.weight"] * l_attn
    )
    np.testing.assert_array_equal(
        merged["transformer.h.0.attn.c_attn.bias"], p["transformer.h.0.attn.c_attn.bias"] * l_attn
    )
    np.testing.assert_array_equal(
        merged["transformer.h.0.mlp.c_proj.weight"], p["transformer.h.0.mlp.c_proj.weight"] * l_mlp[:, None]
    )
    assert merged["transformer.h.0.mlp.c_proj.bias"] is p["transformer.h.0.mlp.c_proj.bias"]


def test_safe_merge_refuses_non_finite_vectors():
    base = small()
    model = random_ia3(base)
    model.active.params["base_model.model.transformer.h.1.attn.c_attn.ia3_l"][0] = np.nan
    before = {k: v.copy() for k, v in base.params.items()}
    with pytest.raises(tp.MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    for k, v in before.items():
        np.testing.assert_array_equal(base.params[k], v)


def modules_of(model) -> dict[str, bool]:
    """module -> feedforward, from the adapter's vectors."""
    return {m: ff for m, (_, ff) in model.active.vectors.items()}


def test_target_and_feedforward_matching_follow_peft():
    base = small(n_layer=1)
    h = "transformer.h.0"
    default = tp.get_peft_model(base, tp.IA3Config())
    assert modules_of(default) == {f"{h}.attn.c_attn": False, f"{h}.mlp.c_proj": True}
    # a list entry matches a module that equals it or ends with "." + it: "c_proj" hits both projections
    both = tp.get_peft_model(base, tp.IA3Config(target_modules=["c_proj"], feedforward_modules=[]))
    assert modules_of(both) == {f"{h}.attn.c_proj": False, f"{h}.mlp.c_proj": False}
    # feedforward uses PEFT's plain endswith (no "." boundary): "proj" marks both projections
    config = tp.IA3Config(target_modules=r".*c_proj", feedforward_modules=["proj"])
    assert modules_of(tp.get_peft_model(base, config)) == {f"{h}.attn.c_proj": True, f"{h}.mlp.c_proj": True}
    # target given, feedforward not: PEFT's gpt2 default feedforward applies
    only_attn = tp.get_peft_model(base, tp.IA3Config(target_modules=["c_attn", "mlp.c_proj"]))
    assert modules_of(only_attn) == modules_of(default)
    regex = tp.get_peft_model(base, tp.IA3Config(target_modules=r".*c_fc", feedforward_modules=r".*c_fc"))
    assert modules_of(regex) == {f"{h}.mlp.c_fc": True}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_modules=["c_attn"], feedforward_modules=["mlp.c_proj"]), "must be a subset of target_modules"),
        (dict(target_modules=5), "must be a list of names or a regex string"),
        (dict(init_ia3_weights="yes"), "init_ia3_weights must be True or False"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(tp.ConfigError, match=message):
        tp.IA3Config(**kwargs)


def test_unknown_target_lists_what_exists():
    with pytest.raises(tp.ConfigError, match=r"'q_proj' matches no module; the modules are \['attn.c_attn'"):
        tp.get_peft_model(small(), tp.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def test_saved_shapes_are_peft_s_and_loading_accepts_both():
    model = random_ia3(small(n_layer=1), "every_linear")
    state = model.adapter_state_dict()
    shapes = {k.removeprefix("base_model.model.transformer.h.0."): v.shape for k, v in state.items()}
    assert shapes == {
        "attn.c_attn.ia3_l": (36, 1),
        "attn.c_proj.ia3_l": (12, 1),
        "mlp.c_fc.ia3_l": (1, 12),
        "mlp.c_proj.ia3_l": (1, 48),
    }
    other = tp.get_peft_model(small(n_layer=1), tp.IA3Config(**TARGETS["every_linear"]))
    other.load_adapter_state_dict(state)  # PEFT's shapes
    for k, v in model.trainable_parameters().items():
        np.testing.assert_array_equal(other.trainable_parameters()[k], v)
    other.load_adapter_state_dict({k: v.reshape(-1) for k, v in state.items()})  # plain vectors
    name = "base_model.model.transformer.h.0.attn.c_attn.ia3_l"
    with pytest.raises(tp.CheckpointError, match=r"has shape \(1, 36\); this adapter needs \(36,\)"):
        other.load_adapter_state_dict({**state, name: state[name].reshape(1, -1)})  # the wrong orientation


def test_save_and_load_round_trip(tmp_path):
    model = random_ia3(small())
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(small(), tmp_path)
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
    saved = loaded.peft_config["default"].to_dict()
    assert saved["peft_type"] == "IA3" and saved["fan_in_fan_out"] is True
    assert saved["target_modules"] == ["c_attn", "mlp.c_proj"] and saved["feedforward_modules"] == ["mlp.c_proj"]


def test_only_the_vectors_train():
    model = tp.get_peft_model(small(), tp.IA3Config(**TARGETS["every_linear"]))
    assert_only_adapter_changes(model, vocab_size=37)
