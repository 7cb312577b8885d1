"""Shared by the OFT and BOFT tests (tinypeft's own and the PEFT cross-checks): hypothesis strategies for method
keyword arguments valid for a drawn GPT shape, as dicts both libraries' configs take, and PEFT's BOFT CUDA
kernel stood in for on the CPU."""

from __future__ import annotations

import contextlib

import torch
from hypothesis import strategies as st

import tinypeft as tp

LINEAR = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@st.composite
def targets(draw) -> list[str] | str:
    """A non-empty subset of the linear layers by PEFT's suffix rule, or a full-match regex."""
    if draw(st.integers(0, 4)) == 0:
        return r".*\.h\.0\..*c_\w+"
    return draw(st.lists(st.sampled_from(LINEAR), min_size=1, max_size=4, unique=True))


@st.composite
def oft_kwargs(draw, cfg: tp.GPTConfig) -> dict:
    """OFTConfig arguments for a model of width n_embd = d (every layer's in_features is d or 4d, so a block size
    dividing d divides both). The Neumann series is kept to blocks of at most 8: its powers of a perturbed S
    grow with the block, and the checks would measure the growth, not the formula."""
    d = cfg.n_embd
    neumann = draw(st.booleans())
    sizes = [b for b in divisors(d) if b >= 2 and (b <= 8 or not neumann)]
    if not sizes:
        neumann, sizes = False, [d]
    if not neumann and draw(st.booleans()):  # r given: blocks of d / r on d-wide inputs, 4d / r on mlp.c_proj
        shape = {"r": draw(st.sampled_from([r for r in divisors(d) if d // r >= 2])), "oft_block_size": 0}
    else:
        shape = {"oft_block_size": draw(st.sampled_from(sizes))}
    return {
        **shape,
        "target_modules": draw(targets()),
        "coft": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-3, 0.05, 0.5, 5.0])),
        "block_share": draw(st.booleans()),
        "use_cayley_neumann": neumann,
        "num_cayley_neumann_terms": draw(st.integers(2, 7)),
        "bias": draw(st.sampled_from(["none", "all", "oft_only"])),
        "init_weights": False,
    }


@st.composite
def boft_kwargs(draw, cfg: tp.GPTConfig) -> dict:
    """BOFTConfig arguments valid for every linear layer of a model of width d = n_embd (inputs d or 4d): with F
    butterfly factors, D blocks of H need D a multiple of 2^(F−1) and H even (F > 1), and H >= 2; a choice that
    holds for d holds for 4d (4 times the blocks, or blocks 4 times larger)."""
    d = cfg.n_embd
    choices = []
    for F in (1, 2, 3):
        pairs = 2 ** (F - 1)
        for H in divisors(d):
            D = d // H
            if H >= 2 and D % pairs == 0 and (F == 1 or H % 2 == 0):
                choices += [{"boft_block_size": H, "boft_n_butterfly_factor": F},
                            {"boft_block_size": 0, "boft_block_num": D, "boft_n_butterfly_factor": F}]  # fmt: skip
    return {
        **draw(st.sampled_from(choices)),
        "target_modules": draw(targets()),
        "bias": draw(st.sampled_from(["none", "all", "boft_only"])),
        "init_weights": False,
    }


class _TorchBlockDiag:
    """PEFT's fbd_cuda kernels (peft/tuners/boft/fbd/fbd_cuda_kernel.cu) in torch, for the CPU: forward turns
    (z, N, b, b) into z block-diagonal (N·b, N·b) matrices; backward reads the blocks of the gradient back."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad_output: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        z, n, b, _ = blocks.shape
        return [torch.stack([torch.stack([grad_output[k, i * b : (i + 1) * b, i * b : (i + 1) * b]
                                          for i in range(n)]) for k in range(z)])]  # fmt: skip


@contextlib.contextmanager
def fake_fbd_cuda():
    """PEFT's BOFT with its CUDA extension "loaded" (the kernels above): without it PEFT silently makes one
    butterfly factor whatever the config says; with it, it computes the F factors asked for. Only PEFT's
    models built inside this block use it."""
    import peft.tuners.boft.layer as boft_layer

    saved = boft_layer._FBD_CUDA
    boft_layer._FBD_CUDA = _TorchBlockDiag()
    try:
        yield
    finally:
        boft_layer._FBD_CUDA = saved
