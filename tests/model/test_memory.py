"""Memory checked before it is allocated (tinypeft/memory.py): the estimates against what tracemalloc
measures, each method's count of its tensors against the adapter it builds, and the sizes from flags
and files that used to end in a MemoryError, a minutes-long allocation or a traceback, each refused in
one line, at once, with nothing allocated."""

from __future__ import annotations

import math
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest

import tinypeft as tp
from tinypeft import memory
from tinypeft.config import parameter_shapes
from tinypeft.methods import METHODS
from tinypeft.methods.registry import ERROR_MODEL, ODD
from tinypeft.train import TrainConfig, evaluate, train

GiB = memory.GiB
SMALL = tp.GPTConfig(**ERROR_MODEL)


@pytest.fixture
def machine(monkeypatch):
    """Set the memory the machine reports as available, in GiB: the refusals do not depend on the
    machine running the tests."""

    def with_gib(gib: float) -> None:
        monkeypatch.setattr(memory, "available_bytes", lambda xp=np: int(gib * GiB))

    return with_gib


def measured_peak(fn):
    """(bytes tracemalloc saw allocated at the peak of fn() beyond what was held before, fn's result)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


@contextmanager
def refused_at_once(*fragments: str, traced: bool = True):
    """The block raises a one-line ConfigError holding every fragment, within a second, with under
    16 MiB allocated on the way (what the refused size would need is gigabytes at least). traced=False
    for a block that reads a file: the reader asks for a buffer of its whole limit (io/files.py's
    `f.read(limit + 1)`, 16 GiB for tensors), which tracemalloc counts though its pages are never touched."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(tp.ConfigError) as info:
            yield info
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 16 << 20 or not traced, f"{peak:,d} bytes allocated before the refusal"
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ------------------------------------------------------------------ the counts
@pytest.mark.parametrize(
    "config",
    [SMALL, tp.GPTConfig(**ODD), tp.GPTConfig(), tp.GPTConfig(n_embd=48, n_head=3, n_inner=100, n_layer=3)],
    ids=["error-model", "odd", "default", "n_inner"],
)
def test_parameter_count_is_the_shape_table_s(config):
    assert memory.parameter_count(config) == sum(math.prod(s) for s in parameter_shapes(config).values())


def test_a_huge_n_layer_is_counted_at_once():
    with refused_at_once("n_layer=1000000000000"):
        tp.GPT(tp.GPTConfig(n_layer=10**12))


def adapter_configs():
    """Every registered method's example, and the LoRA, prefix and VeRA options that add tensors."""
    configs = {name: spec.example for name, spec in METHODS.items()}
    configs |= {
        "lora-pissa-dora-bias-all": lambda cfg: tp.LoraConfig(
            r=2, use_dora=True, init_lora_weights="pissa", bias="all", target_modules=["c_attn", "c_fc"]
        ),
        "lora-bias-lora-only": lambda cfg: tp.LoraConfig(r=3, bias="lora_only"),
        "ptuning-mlp": lambda cfg: tp.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=7),
        "ptuning-lstm-2": lambda cfg: tp.PromptEncoderConfig(
            num_virtual_tokens=5, encoder_reparameterization_type="LSTM", encoder_num_layers=2
        ),
        "prefix-projection-hidden-7": lambda cfg: tp.PrefixTuningConfig(
            num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=7
        ),
        "adapter-mlp": lambda cfg: tp.AdapterConfig(bottleneck_size=5, placement="mlp"),
        "vera-bias-all": lambda cfg: tp.VeraConfig(r=30, bias="all", target_modules=["c_proj", "mlp.c_fc"]),
        "vera-bias-vera-only": lambda cfg: tp.VeraConfig(bias="vera_only"),
    }
    return configs


@pytest.mark.parametrize("name", sorted(adapter_configs()))
def test_each_method_counts_the_tensors_it_builds(name):
    """estimated_parameters, from the config alone, is exactly what the adapter holds (PiSSA's frozen
    residual and VeRA's frozen projections included): the count is checked before building, so it must not be
    a guess."""
    base = tp.GPT(tp.GPTConfig(**ODD))
    config = adapter_configs()[name](base.config)
    if config is None:  # full fine-tuning: no adapter
        return
    adapter = tp.get_peft_model(base, config).active
    held = [*adapter.params.values(), *getattr(adapter, "residual_weights", {}).values()]
    held += [getattr(adapter, frozen) for frozen in ("vera_A", "vera_B") if hasattr(adapter, frozen)]
    assert config.estimated_parameters(base) == sum(int(a.size) for a in held)


def test_a_method_that_does_not_count_is_not_checked():
    assert tp.PeftConfig().estimated_parameters(tp.GPT(SMALL)) == 0


# ------------------------------------------------------------------ the estimates against tracemalloc
# (config, batch, seq_len, method) for the activation estimates; the measured ratios are in memory.py
STEPS = [
    (tp.GPTConfig(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4), 8, 64, None),
    (tp.GPTConfig(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4), 16, 128, "lora"),
    (tp.GPTConfig(vocab_size=2048, n_positions=64, n_embd=32, n_layer=1, n_head=2), 16, 64, None),
    (tp.GPTConfig(vocab_size=64, n_positions=256, n_embd=32, n_layer=2, n_head=4), 4, 256, None),
    (tp.GPTConfig(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4), 8, 64, "prompt"),
    (tp.GPTConfig(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4), 8, 64, "prefix"),
    (tp.GPTConfig(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4), 8, 64, "ia3"),
]
METHOD_CONFIGS = {
    "lora": lambda: tp.LoraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "prompt": lambda: tp.PromptTuningConfig(num_virtual_tokens=10),
    "prefix": lambda: tp.PrefixTuningConfig(num_virtual_tokens=10),
    "ia3": lambda: tp.IA3Config(),
    "adapter": lambda: tp.AdapterConfig(bottleneck_size=64),
}


def step_estimate(model, batch, seq_len, training):
    """What check_step compares with the memory available, in bytes (train's AdamW state left out:
    loss_and_grad alone makes none)."""
    seen = {}

    def record(needed, *args, **kwargs):
        seen["bytes"] = needed

    original, memory.require = memory.require, record
    try:
        memory.check_step(model, batch, seq_len, optimizer_states=0 if training else None)
    finally:
        memory.require = original
    return seen["bytes"]


@pytest.mark.parametrize("config,batch,seq_len,method", STEPS, ids=lambda v: getattr(v, "n_embd", v))
def test_a_step_s_estimate_is_a_lower_bound_within_a_factor_of_two(config, batch, seq_len, method):
    base = tp.GPT(config)
    model = tp.get_peft_model(base, METHOD_CONFIGS[method]()) if method else base
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, seq_len))
    model.loss_and_grad(ids, ids)  # anything made once (caches, thread pools) is made before measuring
    train_peak, _ = measured_peak(lambda: model.loss_and_grad(ids, ids))
    eval_peak, _ = measured_peak(lambda: model.loss(ids, ids))
    assert 1.0 <= train_peak / step_estimate(model, batch, seq_len, True) <= 2.0
    assert 1.0 <= eval_peak / step_estimate(model, batch, seq_len, False) <= 2.0


@pytest.mark.parametrize(
    "config",
    [tp.GPTConfig(), tp.GPTConfig(n_embd=256, n_layer=2, n_head=4), tp.GPTConfig(dtype="float64", n_layer=2)],
    ids=["default", "wide", "float64"],
)
def test_the_parameters_estimate_is_a_lower_bound_within_a_factor_of_two(config):
    peak, _ = measured_peak(lambda: tp.GPT(config))
    assert 1.0 <= peak / memory.bytes_of(memory.parameter_count(config), config.dtype) <= 2.0


@pytest.mark.parametrize("method,dtype", [("lora", "float64"), ("adapter", "float64"), ("adapter", "float32")])
def test_the_adapter_estimate_is_a_lower_bound(method, dtype):
    """Within a factor of 2 in float64; in float32 up to 3, since a tensor is drawn in float64 and cast
    (8 + 4 bytes for the 4 counted), and the bottleneck's are drawn a module at a time."""
    base = tp.GPT(tp.GPTConfig(n_embd=256, n_layer=4, n_head=4, dtype=dtype))
    config = METHOD_CONFIGS[method]()
    peak, _ = measured_peak(lambda: tp.get_peft_model(base, config))
    ratio = peak / memory.bytes_of(config.estimated_parameters(base), dtype)
    assert 1.0 <= ratio <= (2.0 if dtype == "float64" else 3.0)


# ------------------------------------------------------------------ the refusals of the issue
def test_a_model_too_wide_for_the_machine_is_refused(machine):
    machine(16)
    with refused_at_once(
        "this model needs about 48.0 GiB for its 12,894,175,232 parameters (float32, n_embd=16384, n_layer=4)",
        "the machine has 16.0 GiB available",
        "use a smaller n_embd",
    ):
        tp.GPT(tp.GPTConfig(n_embd=16384))


def test_pretrain_n_embd_16384_is_one_line(machine, tmp_path, capsys):
    from tinypeft.cli import main

    machine(16)
    assert main(["pretrain", "--n_embd", "16384", "--out", str(tmp_path / "run"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs about 48.0 GiB" in err and "16.0 GiB available" in err, err


def test_a_bottleneck_of_three_million_is_refused_before_it_is_drawn(machine):
    """bottleneck_size 3,000,000 on the error catalogue's model: 204,000,032 numbers, 0.8 GiB in
    float32 (drawn in float64 first: about 3 GB were touched before), on a machine with 0.5 GiB."""
    machine(0.5)
    base = tp.GPT(SMALL)
    with refused_at_once("AdapterConfig's adapter needs about 0.8 GiB for its 204,000,032 numbers", "0.5 GiB"):
        tp.get_peft_model(base, tp.AdapterConfig(bottleneck_size=3_000_000))


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_an_adapter_config_json_asking_for_too_much_is_refused(machine, tmp_path, monkeypatch, how):
    import json

    def never(*args):
        raise AssertionError("the adapter was built: its tensors were allocated before the check")

    base = tp.GPT(SMALL)
    model = tp.get_peft_model(base, tp.AdapterConfig(bottleneck_size=4))
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"bottleneck_size": 3_000_000}))
    machine(0.5)
    monkeypatch.setattr(tp.AdapterConfig, "build", never)
    with refused_at_once("204,000,032 numbers", "0.5 GiB available", traced=False):
        if how == "from_pretrained":
            tp.PeftModel.from_pretrained(base, tmp_path / "adapter")
        else:
            model.load_adapter(tmp_path / "adapter", "other")
    assert how == "from_pretrained" or sorted(model.adapters) == ["default"]


def test_a_bottleneck_of_10_to_the_12_is_refused_on_any_machine():
    """Once a raw MemoryError; now refused with the memory this machine really has."""
    with refused_at_once("needs about 253,319.7 GiB", "the machine has"):
        tp.get_peft_model(tp.GPT(SMALL), tp.AdapterConfig(bottleneck_size=10**12))


def test_a_training_batch_too_large_is_refused_before_the_run_starts(machine, tmp_path):
    machine(16)
    data = np.zeros(1000, np.uint8)
    with refused_at_once("a training step on a batch of 100,000 x 128 tokens needs about", "use a smaller batch_size"):
        train(tp.GPT(tp.GPTConfig()), data, TrainConfig(batch_size=100_000), run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made or locked


def test_finetune_batch_size_100000_is_one_line(machine, tmp_path, capsys):
    from tinypeft.cli import main

    machine(16)
    args = ["finetune", "--batch_size", "100000", "--sample_bytes", "0", "--eval_windows", "2", "--no_progress"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "batch of 100,000 x 128 tokens needs about" in err, err


def test_evaluation_counts_the_rows_it_will_compute(machine):
    """evaluate's batch is at most its windows: a batch_size of 100,000 over 32 windows is 32 rows."""
    machine(0.5)
    model, data = tp.GPT(tp.GPTConfig()), np.zeros(4096 * 128, np.uint8)
    assert np.isfinite(evaluate(model, data, 128, max_windows=2, batch_size=100_000))
    with refused_at_once("evaluating a batch of 4,096 x 128 tokens needs about", "0.5 GiB available"):
        evaluate(model, data, 128, max_windows=4096, batch_size=4096)


def test_reading_weights_larger_than_the_memory_is_refused_before_reading(machine, tmp_path):
    tp.GPT(SMALL).save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(12 << 30)  # a sparse file: 12 GiB long, no disk used
    machine(8)
    with refused_at_once("reading model.safetensors needs about 12.0 GiB", "8.0 GiB available"):
        tp.GPT.from_pretrained(tmp_path / "model")


# ------------------------------------------------------------------ nothing that fits is refused
def test_what_runs_today_is_not_refused_on_a_machine_with_one_gib(machine, tmp_path):
    """The README's default finetune (the shipped base's shape, LoRA, batch 16 of 128 bytes, AdamW) and
    its evaluation need about 0.1 GiB: a machine with 1 GiB available runs them."""
    machine(1)
    model = tp.get_peft_model(tp.GPT(tp.GPTConfig()), tp.LoraConfig())
    data = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    result = train(model, data, TrainConfig(steps=1, eval_windows=2), {"val": data}, progress=False)
    assert result.steps == 1


def test_available_memory_is_read_from_the_machine():
    available = memory.available_bytes()
    assert available is not None and available > 0
    meminfo = memory._meminfo_available()
    if meminfo is not None:  # Linux: MemAvailable, plus the free memory this process's heap keeps
        assert available >= meminfo - (256 << 20)  # it moves while we read it


def test_a_gpu_that_cannot_say_refuses_nothing():
    class NoDevice:
        __name__ = "cupy"

    assert memory.available_bytes(NoDevice()) is None
    memory.require(10**18, "this", "for that", "do less", NoDevice())  # unknown: nothing is refused
