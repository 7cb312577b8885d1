"""tinypeft on a GPU (device "cuda"), against the same model on the CPU: through the CuPy stand-in
(tests/fake_cupy) on every run, and through the real CuPy too on a machine with an NVIDIA GPU
(benchmarks/gpu_check.sh runs it there).

The stand-in computes with NumPy, so a model on it must give bitwise the CPU's numbers: any difference
is a device branch computing something else. It behaves as CuPy does where a NumPy program breaks on a
GPU (no implicit conversion to NumPy, no NumPy array operands, its own scatter-add), so a branch that
would break on a GPU breaks here. The real CuPy computes the same formulas in other reduction orders:
float64 agrees to 1e-12 relative, float32 to 1e-4 (per tensor; LayerNorm weight gradients sum over B*T
and are the loosest). The last tests show the stand-in catching what it must.
"""

from __future__ import annotations

import fake_cupy
import numpy as np
import pytest

import tinypeft as tp
from tinypeft import runtime
from tinypeft.backend import to_numpy
from tinypeft.gradcheck import relative_error
from tinypeft.train import TrainConfig, train

CFG = tp.GPTConfig(vocab_size=64, n_positions=48, n_embd=32, n_layer=2, n_head=4)
METHODS = {
    "full": None,
    "bitfit": lambda: tp.BitFitConfig(),
    "lora": lambda: tp.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False
    ),
    "dora": lambda: tp.LoraConfig(r=4, use_dora=True, init_lora_weights=False),
    "pissa": lambda: tp.LoraConfig(r=4, init_lora_weights="pissa", bias="all"),
    "lora-dropout": lambda: tp.LoraConfig(r=4, lora_dropout=0.2, init_lora_weights=False),
    "prompt": lambda: tp.PromptTuningConfig(num_virtual_tokens=5),
    "ptuning": lambda: tp.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM"),
    "prefix": lambda: tp.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True),
    # the base's keys and values of text: a forward on the device in the init (bytes "0".."3" are tokens of CFG)
    "prefix-text": lambda: tp.PrefixTuningConfig(num_virtual_tokens=5, prefix_init="TEXT", prefix_init_text="0123"),
    "ia3": lambda: tp.IA3Config(init_ia3_weights=False),
    "adapter": lambda: tp.AdapterConfig(bottleneck_size=4, init_weights=False),
    "vera": lambda: tp.VeraConfig(r=6, target_modules=["c_attn", "c_proj"], vera_dropout=0.2, init_weights=False),
    "oft": lambda: tp.OFTConfig(oft_block_size=8, coft=True, eps=0.5, init_weights=False),
    "boft": lambda: tp.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.25, init_weights=False),
}
MERGEABLE = ["bitfit", "lora", "dora", "pissa", "ia3", "vera", "oft", "boft"]
# how far the device's numbers may be from the CPU's (relative): the stand-in's not at all
TOLERANCE = {"stand-in": {"float64": 0.0, "float32": 0.0}, "cupy": {"float64": 1e-12, "float32": 1e-4}}


def real_cupy():
    """The installed CuPy if it has a device to run on, else None."""
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, or CuPy without a usable GPU
        return None
    return cupy


@pytest.fixture(params=["stand-in", "cupy"])
def device(request):
    """Which CuPy "cuda" means in the test: the stand-in (always), or the real one (where there is a GPU)."""
    if request.param == "cupy":
        if real_cupy() is None:
            pytest.skip("no CuPy with a CUDA device here; the stand-in ran these checks")
        yield "cupy"
    else:
        with fake_cupy.installed():
            yield "stand-in"


def model_on(device: str, dtype: str = "float64", method: str = "full", seed: int = 0):
    base = tp.GPT(CFG.replace(dtype=dtype), seed=seed, device=device)
    if METHODS[method] is None:
        return base
    return tp.get_peft_model(base, METHODS[method](), seed=seed)


def assert_same(got, want, tolerance: float, what: str = "") -> None:
    """`got` from the device, `want` from the CPU: host arrays equal (bitwise when tolerance is 0)."""
    got = to_numpy(got)
    if tolerance == 0:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        assert relative_error(got, np.asarray(want)) <= tolerance, what


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, size=(3, 20))
    ids[:, :4] = 7  # repeated token ids: the embedding gradient must add every one (a scatter-add)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    return ids, np.where(mask == 1, ids, -100), mask


def check_device_equals_cpu(device: str, method: str, dtype: str) -> None:
    tol = TOLERANCE[device][dtype]
    ids, labels, mask = batch()
    cpu, gpu = model_on("cpu", dtype, method), model_on("cuda", dtype, method)
    xp = gpu.view().xp
    assert xp.__name__ == "cupy"
    assert_same(gpu(ids, mask), cpu(ids, mask), tol, "logits")
    assert_same(gpu(xp.asarray(ids), xp.asarray(mask)), cpu(ids, mask), tol, "logits of inputs on the device")
    for training in (False, True):  # with dropout (lora-dropout) the masks are drawn on the host, the same
        cpu.train(training), gpu.train(training)
        loss_cpu, grads_cpu = cpu.loss_and_grad(ids, labels, mask)
        loss_gpu, grads_gpu = gpu.loss_and_grad(ids, labels, mask)
        assert abs(loss_gpu - loss_cpu) <= tol * abs(loss_cpu), "loss"
        assert set(grads_gpu) == set(grads_cpu)
        for name, g in grads_cpu.items():
            assert type(grads_gpu[name]).__module__.startswith("cupy"), name  # computed on the device
            assert_same(grads_gpu[name], g, tol, name)


# ------------------------------------------------------------------ the same numbers on the device
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_device_computes_the_cpu_s_numbers(device, method, dtype):
    check_device_equals_cpu(device, method, dtype)


def test_training_on_the_device_is_training_on_the_cpu(device, tmp_path):
    """A run of LoRA with dropout and AdamW, checkpointed, interrupted and resumed on the device, ends
    where the CPU's uninterrupted run ends; evaluations included."""
    data = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 200, dtype=np.uint8) % 64
    config = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=3, eval_windows=4)
    cpu = model_on("cpu", "float64", "lora-dropout")
    cpu_result = train(cpu, data, config, {"val": data}, progress=False)
    gpu = model_on("cuda", "float64", "lora-dropout")
    run = str(tmp_path / "run")
    checkpointed = TrainConfig(**{**vars(config), "checkpoint_every": 2})
    train(gpu, data, checkpointed, {"val": data}, run_dir=run, progress=False, stop_after=4)
    resumed = model_on("cuda", "float64", "lora-dropout")
    gpu_result = train(resumed, data, checkpointed, {"val": data}, run_dir=run, resume=True, progress=False)
    tol = TOLERANCE[device]["float64"]
    for want, got in zip(cpu_result.train_losses, gpu_result.train_losses, strict=True):
        assert abs(got["loss"] - want["loss"]) <= tol * want["loss"] + (1e-9 if tol else 0)
    assert [row["step"] for row in gpu_result.evals] == [row["step"] for row in cpu_result.evals]
    for name, value in cpu.trainable_parameters().items():
        assert_same(resumed.trainable_parameters()[name], value, tol * 1e3, name)
    assert gpu_result.evals[-1]["val"] < gpu_result.evals[0]["val"]


@pytest.mark.parametrize("method", ["full", "lora", "prompt", "prefix"])
def test_generation_on_the_device(device, method):
    """Greedy and sampled continuations, with the KV cache, pick the CPU's tokens; they come back on the host."""
    cpu, gpu = model_on("cpu", "float64", method), model_on("cuda", "float64", method)
    ids = batch()[0][:2, :6]
    for kwargs in ({}, {"temperature": 1.0, "top_k": 10, "seed": 3}):
        out = gpu.generate(ids, max_new_tokens=8, **kwargs)
        assert type(out) is np.ndarray
        np.testing.assert_array_equal(out, cpu.generate(ids, max_new_tokens=8, **kwargs))


@pytest.mark.parametrize("method", MERGEABLE)
def test_merging_on_the_device(device, method):
    """merge_and_unload gives the CPU's merged logits; merge then unmerge gives the weights back exactly."""
    tol = TOLERANCE[device]["float64"]
    ids = batch()[0]
    cpu, gpu = model_on("cpu", "float64", method), model_on("cuda", "float64", method)
    merged = gpu.merge_and_unload(safe_merge=True)
    assert merged.device == "cuda"
    assert_same(merged(ids), cpu.merge_and_unload()(ids), tol, "merged logits")
    before = {k: to_numpy(v).copy() for k, v in gpu.base_model.params.items()}
    gpu.merge_adapter()
    assert_same(gpu(ids), cpu.merge_and_unload()(ids), tol, "merged in place")
    gpu.unmerge_adapter()
    for name, value in gpu.base_model.params.items():
        np.testing.assert_array_equal(to_numpy(value), before[name], err_msg=name)


@pytest.mark.parametrize("method", ["full", "lora", "ia3", "prefix", "adapter"])
def test_saving_and_loading_on_the_device(device, method, tmp_path):
    """A model or adapter saved from the device loads on the CPU and back onto the device, unchanged."""
    ids = batch()[0]
    gpu = model_on("cuda", "float64", method)
    gpu.save_pretrained(tmp_path / "saved")
    state = gpu.state_dict() if method == "full" else gpu.adapter_state_dict()
    assert all(type(v) is np.ndarray for v in state.values())  # host copies
    if method == "full":
        on_cpu = tp.GPT.from_pretrained(tmp_path / "saved", device="cpu")
        back = tp.GPT.from_pretrained(tmp_path / "saved", device="cuda")
    else:
        on_cpu = tp.PeftModel.from_pretrained(model_on("cpu", "float64"), tmp_path / "saved")
        back = tp.PeftModel.from_pretrained(model_on("cuda", "float64"), tmp_path / "saved")
        back.load_adapter(tmp_path / "saved", "again")
        back.set_adapter("again")
    want = to_numpy(gpu(ids))
    np.testing.assert_array_equal(on_cpu(ids), want)
    np.testing.assert_array_equal(to_numpy(back(ids)), want)


def test_the_golden_vectors_on_the_device(device, cases, monkeypatch):
    """tinypeft's own run_case, with "cuda" as the default device, passes every golden case (its
    results moved to the host), and gives the CPU's numbers."""
    from tinypeft.vectors import compare, run_case

    tol = TOLERANCE[device]
    for case in cases:
        monkeypatch.setenv(runtime.BACKEND_ENV, "cpu")
        want = run_case(case.port_input())
        monkeypatch.setenv(runtime.BACKEND_ENV, "cuda")
        got = run_case(case.port_input())
        got = {**got, "logits": to_numpy(got["logits"]), "grads": {k: to_numpy(g) for k, g in got["grads"].items()}}
        report = compare(case, got)
        assert report.passed, (case.name, report)
        assert_same(got["logits"], want["logits"], tol[case.dtype], case.name)
        for name, g in want["grads"].items():
            assert_same(got["grads"][name], g, tol[case.dtype], f"{case.name}: {name}")


def test_the_command_line_on_the_device(device, tmp_path, capsys):
    """eval, generate and merge with --device cuda, on the shipped base and a LoRA adapter."""
    from tinypeft.cli import main

    base = tp.GPT.from_pretrained(tp.SHIPPED_BASE)
    tp.get_peft_model(base, tp.LoraConfig(init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    common = ["--adapter", str(tmp_path / "adapter")]
    assert main(["eval", *common, "--eval_windows", "2", "--batch_size", "2"]) == 0
    on_cpu = capsys.readouterr().out
    assert main(["eval", *common, "--eval_windows", "2", "--batch_size", "2", "--device", "cuda"]) == 0
    assert capsys.readouterr().out == on_cpu or device == "cupy"
    assert main(["generate", *common, "--max_new_tokens", "16", "--device", "cuda"]) == 0
    assert main(["merge", *common, "--out", str(tmp_path / "merged"), "--device", "cuda"]) == 0
    assert tp.GPT.from_pretrained(tmp_path / "merged").config == base.config


def test_memory_is_checked_on_the_device(device, monkeypatch):
    """A model that does not fit the GPU's free memory is refused, naming the GPU's memory."""
    if device == "cupy":
        pytest.skip("the stand-in's memory can be set; the GPU's cannot")
    import cupy

    monkeypatch.setattr(cupy, "DEVICE_MEMORY", (64 << 10, 1 << 30))  # 64 KiB free; the model needs 113 KiB
    with pytest.raises(tp.ConfigError, match=r"needs about .* the GPU has 0.1 MiB available"):
        tp.GPT(CFG, device="cuda")
    tp.GPT(CFG, device="cpu")  # the host is not the GPU


# ------------------------------------------------------------------ what the stand-in catches
def test_cupy_behaves_as_the_stand_in_says(device):
    """What the stand-in claims of CuPy, checked on the stand-in and, where there is a GPU, on CuPy itself:
    where they differ, the stand-in is wrong."""
    import cupy
    import cupyx

    host = np.arange(3.0)
    a = cupy.asarray(host)
    host[0] = 99.0  # asarray copied it to the device
    assert float(a[0]) == 0.0 and type(a[0]) is cupy.ndarray and a[0].shape == ()
    assert type(a.sum()) is cupy.ndarray and float(a.sum()) == 3.0  # reductions stay on the device
    assert type(a).__module__.startswith("cupy")
    for implicit in (lambda: np.asarray(a), lambda: np.array([a[0], a[1]], dtype=np.float64)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            implicit()
    for mixed in (lambda: a + host, lambda: host * a, lambda: cupy.exp(host)):
        with pytest.raises(TypeError, match="Unsupported type"):
            mixed()
    with pytest.raises(TypeError):
        cupy.concatenate([a, host])
    with pytest.raises(ValueError, match=r"non-scalar numpy\.ndarray"):
        cupy.zeros((2, 3))[0] = np.ones(3)
    assert type(np.concatenate([a, a])) is cupy.ndarray  # a NumPy function on device arrays runs cupy's
    t = cupy.ones(3)
    cupy.tanh(t, out=t)
    t -= 1.0
    np.testing.assert_array_equal(cupy.asnumpy(t), np.tanh(np.ones(3)) - 1.0)
    out = cupy.zeros((3, 1))
    cupyx.scatter_add(out, cupy.asarray(np.array([0, 2, 0])), cupy.asarray(np.array([[1.0], [2.0], [4.0]])))
    np.testing.assert_array_equal(out.get(), [[5.0], [0.0], [2.0]])  # repeats added
    dropped = cupy.zeros((3, 1))
    dropped[cupy.asarray(np.array([0, 2, 0]))] += cupy.asarray(np.array([[1.0], [2.0], [4.0]]))
    assert float(dropped[0, 0]) in (1.0, 4.0)  # `+=` through an index keeps one of the repeats


def test_the_stand_in_knows_only_names_it_was_given():
    """A NumPy function the stand-in has no cupy function for fails (add it there if CuPy has it); so does
    an attribute it lacks."""
    with fake_cupy.installed() as cupy:
        a = cupy.asarray(np.arange(3.0))
        with pytest.raises(TypeError):
            np.linalg.norm(a)
        assert not hasattr(a, "itemset") and not hasattr(cupy, "histogram")


def test_a_scatter_add_that_drops_repeated_ids_fails(monkeypatch):
    """`out[index] += values` on a GPU array keeps one of each repeated index (as NumPy's does): the
    embedding gradient of repeated tokens comes out short, and the comparison above fails."""
    from tinypeft import backend, ops

    def dropping_repeats(n_rows, index, values):
        xp = backend.namespace(values)
        if xp is np:
            return backend.scatter_add_rows(n_rows, index, values)
        out = xp.zeros((n_rows, values.shape[-1]), dtype=values.dtype)
        out[index] += values
        return out

    monkeypatch.setattr(ops, "scatter_add_rows", dropping_repeats)
    with fake_cupy.installed(), pytest.raises(AssertionError, match=r"transformer\.wte\.weight"):
        check_device_equals_cpu("stand-in", "full", "float64")


def test_an_implicit_conversion_of_a_device_array_raises(monkeypatch):
    """np.asarray of a device array raises CuPy's TypeError, so a host copy made that way (a to_numpy
    that forgot `.get()`) fails as it would on a GPU."""
    import tinypeft.model as model_module

    with fake_cupy.installed() as cupy:
        a = cupy.asarray(np.arange(3.0))
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            np.asarray(a)
        with pytest.raises(TypeError, match="Implicit conversion"):
            np.array([a[0], a[1]], dtype=np.float64)
        monkeypatch.setattr(model_module, "to_numpy", np.asarray)
        with pytest.raises(TypeError, match="Implicit conversion"):
            model_on("cuda").state_dict()


def test_a_host_array_in_device_math_raises(monkeypatch):
    """A forward that builds a NumPy array (here: the attention's causal mask, as if the reference GPT
    called numpy instead of its namespace) meets CuPy's "Unsupported type" where it joins device math."""
    import tinypeft.gpt as gpt_module

    with fake_cupy.installed():
        model = model_on("cuda")
        model(batch()[0])  # as it is: fine
        monkeypatch.setattr(gpt_module, "namespace", lambda *arrays: np)
        with pytest.raises(TypeError, match=r"Unsupported type <class 'numpy\.ndarray'>"):
            model(batch()[0])


def test_a_host_array_written_into_a_device_slice_raises():
    with fake_cupy.installed() as cupy:
        a = cupy.zeros((2, 3))
        with pytest.raises(ValueError, match=r"non-scalar numpy\.ndarray"):
            a[0] = np.ones(3)
        a[0] = cupy.asarray(np.ones(3))  # a device array, or a scalar, is fine
        a[1] = 2.0
        a[np.array([0, 1]), 0] = np.array([5.0, 6.0])  # an advanced index: CuPy copies the values over
        np.testing.assert_array_equal(a.get(), [[5, 1, 1], [6, 2, 2]])


# ------------------------------------------------------------------ what the stand-in found broken elsewhere
# Both failed before: compute.py added a host perturbation to the device weights of a GPT made on the
# default device (TypeError), and run_case returned device arrays, which compare() could not read.


def test_export_vectors_with_cuda_as_the_default_device(monkeypatch, tmp_path):
    from tinypeft.vectors import export_vectors

    monkeypatch.setenv(runtime.BACKEND_ENV, "cuda")
    with fake_cupy.installed():
        export_vectors(tmp_path / "vectors", patterns=["lora*"])


def test_run_case_with_cuda_as_the_default_device_passes_compare(cases, monkeypatch):
    from tinypeft.vectors import compare, run_case

    monkeypatch.setenv(runtime.BACKEND_ENV, "cuda")
    with fake_cupy.installed():
        report = compare(cases[0], run_case(cases[0].port_input()))
    assert report.passed, report


@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_the_gpu_benchmark_runs_tinypeft_on_the_device(device, method, monkeypatch):
    """benchmarks/gpu_check.sh's tinypeft contender builds its model on the device: until 2026-11-28 it
    built it on the CPU whatever --device said, and broke at its first synchronize on a real GPU."""
    from benchmarks.run import Setup, build_step

    built = []
    monkeypatch.setattr(tp, "GPT", lambda *a, **k: built.append(tp.model.GPT(*a, **k)) or built[-1])
    step = build_step(Setup("tinypeft", method, 1, 16, 2, 16, 2, device="cuda"))
    step()
    assert built[0].xp.__name__ == "cupy"
