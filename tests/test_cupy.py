"""The cupy backend against the numpy backend, on a machine with an NVIDIA GPU and cupy installed
(skipped elsewhere; benchmarks/gpu_check.sh runs it). The same model and adapter on both devices:
float64 losses and gradients agree to 1e-12 relative (the same formulas, different reduction
orders), float32 to 1e-4 (per tensor; LayerNorm weight gradients sum over B*T and are the loosest)."""

from __future__ import annotations

import numpy as np
import pytest

import tinypeft as tp
from tinypeft.backend import to_numpy
from tinypeft.gradcheck import relative_error

cupy = pytest.importorskip("cupy")
try:
    cupy.cuda.runtime.getDeviceCount()
except Exception:  # cupy installed, no usable GPU
    pytest.skip("no CUDA device", allow_module_level=True)

CFG = tp.GPTConfig(vocab_size=64, n_positions=48, n_embd=32, n_layer=2, n_head=4)
METHODS = {
    "full": None,
    "bitfit": lambda: tp.BitFitConfig(),
    "lora": lambda: tp.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False
    ),
    "dora": lambda: tp.LoraConfig(r=4, use_dora=True, init_lora_weights=False),
    "prompt": lambda: tp.PromptTuningConfig(num_virtual_tokens=5),
    "prefix": lambda: tp.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True),
    "ia3": lambda: tp.IA3Config(init_ia3_weights=False),
    "adapter": lambda: tp.AdapterConfig(bottleneck_size=4, init_weights=False),
}


def model_on(device, dtype, method):
    base = tp.GPT(CFG.replace(dtype=dtype), seed=0, device=device)
    if METHODS[method] is None:
        return base
    return tp.get_peft_model(base, METHODS[method](), seed=0)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cupy_equals_numpy(method, dtype, tol):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(3, 20))
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    labels = np.where(mask == 1, ids, -100)
    cpu, gpu = model_on("cpu", dtype, method), model_on("cuda", dtype, method)
    assert relative_error(to_numpy(gpu(ids, mask)), cpu(ids, mask)) <= tol
    loss_cpu, grads_cpu = cpu.loss_and_grad(ids, labels, mask)
    loss_gpu, grads_gpu = gpu.loss_and_grad(ids, labels, mask)
    assert abs(loss_gpu - loss_cpu) <= tol * abs(loss_cpu)
    assert set(grads_gpu) == set(grads_cpu)
    for name, g in grads_cpu.items():
        assert type(grads_gpu[name]).__module__.startswith("cupy"), name  # computed on the device
        assert relative_error(to_numpy(grads_gpu[name]), g) <= tol, name


def test_training_on_cupy_lowers_the_loss():
    from tinypeft.train import TrainConfig, train

    data = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 200, dtype=np.uint8) % 64
    model = model_on("cuda", "float32", "lora")
    result = train(
        model,
        data,
        TrainConfig(steps=20, batch_size=4, seq_len=32, lr=1e-2, eval_every=0, eval_windows=4),
        {"val": data},
        progress=False,
    )
    assert result.evals[-1]["val"] < result.evals[0]["val"]
