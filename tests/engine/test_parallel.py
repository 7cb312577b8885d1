"""Row-parallel steps: a batch computed as row blocks on parallel threads gives the whole batch's loss
and gradients (float64: <= 1e-13 relative; only the order of a few sums differs), with padding-only
blocks, virtual tokens and every kind of site; sites that draw dropout masks keep the batch whole."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from strategies import perturbed_model

import tinypeft as tp
from tinypeft import runtime as parallel
from tinypeft.gradcheck import relative_error

CFG = tp.GPTConfig(vocab_size=41, n_positions=32, n_embd=12, n_layer=2, n_head=3, dtype="float64")
METHODS = {
    "full": None,
    "bitfit": lambda: tp.BitFitConfig(),
    "lora": lambda: tp.LoraConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False),
    "dora": lambda: tp.LoraConfig(r=2, use_dora=True, init_lora_weights=False),
    "prompt": lambda: tp.PromptTuningConfig(num_virtual_tokens=4),
    "ptuning": lambda: tp.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=5),
    "prefix": lambda: tp.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
    "ia3": lambda: tp.IA3Config(init_ia3_weights=False),
    "adapter": lambda: tp.AdapterConfig(bottleneck_size=3, init_weights=False),
    "vera": lambda: tp.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], bias="all", init_weights=False),
}


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 41, size=(7, 11))
    mask = np.ones_like(ids)
    mask[2, :4] = 0  # left padding
    mask[5, 8:] = 0  # right padding
    labels = np.where(mask == 1, ids, -100)
    labels[6] = -100  # a row with nothing to predict: its block may hold no target at all
    return ids, labels, mask


def model_for(method):
    base = perturbed_model(CFG, 0)
    return base if METHODS[method] is None else tp.get_peft_model(base, METHODS[method](), seed=1)


@pytest.mark.parametrize("n_threads", [2, 3, 7])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_row_blocks_equal_the_whole_batch(monkeypatch, method, n_threads):
    model = model_for(method)
    ids, labels, mask = batch()
    monkeypatch.setenv(parallel.THREADS_ENV, "1")
    whole_loss, whole_grads = model.loss_and_grad(ids, labels, mask)
    monkeypatch.setenv(parallel.THREADS_ENV, str(n_threads))
    monkeypatch.setattr(parallel, "MIN_BLOCK_WORK", 1)
    assert len(parallel.row_blocks(7, 11 * 12)) == n_threads
    loss, grads = model.loss_and_grad(ids, labels, mask)
    assert abs(loss - whole_loss) <= 1e-13 * abs(whole_loss)
    assert set(grads) == set(whole_grads)
    for name, g in grads.items():
        assert relative_error(g, whole_grads[name]) <= 1e-13, name
    assert abs(model.loss(ids, labels, mask) - whole_loss) <= 1e-13 * abs(whole_loss)


def test_blocks_cover_the_rows_in_order():
    for n_rows in range(1, 20):
        for work in (1, parallel.MIN_BLOCK_WORK, 10 * parallel.MIN_BLOCK_WORK):
            blocks = parallel.row_blocks(n_rows, work)
            assert blocks[0].start == 0 and blocks[-1].stop == n_rows
            assert all(a.stop == b.start and a.stop > a.start for a, b in itertools.pairwise(blocks))


def test_small_batches_are_not_split():
    assert parallel.row_blocks(16, 100) == [slice(0, 16)]


def test_dropout_keeps_the_batch_whole(monkeypatch):
    model = tp.get_peft_model(perturbed_model(CFG, 0), tp.LoraConfig(r=2, lora_dropout=0.5, init_lora_weights=False))
    model.train()
    monkeypatch.setenv(parallel.THREADS_ENV, "4")
    monkeypatch.setattr(parallel, "MIN_BLOCK_WORK", 1)
    seen = []
    original = parallel.map_blocks

    def counting(fn, blocks):
        seen.append(len(blocks))
        return original(fn, blocks)

    monkeypatch.setattr(parallel, "map_blocks", counting)
    ids, labels, mask = batch()
    model.loss_and_grad(ids, labels, mask)
    assert seen and set(seen) == {1}
    model.eval()
    seen.clear()
    model.loss_and_grad(ids, labels, mask)
    assert max(seen) == 4


def test_bad_thread_count(monkeypatch):
    monkeypatch.setenv(parallel.THREADS_ENV, "zero")
    with pytest.raises(tp.ConfigError, match="TINYPEFT_THREADS"):
        parallel.threads()


def test_row_blocks_run_with_one_blas_thread_each_and_the_limit_is_lifted_after():
    """Two blocks on two threads, each with one BLAS thread (else the cores are oversubscribed); the
    process's BLAS thread count is back as it was once the blocks are done."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    before = blas_threads()
    seen = parallel.map_blocks(lambda block: blas_threads(), [0, 1])
    assert seen == [{1}, {1}]
    assert blas_threads() == before
