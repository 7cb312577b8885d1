"""The math of LoRA's variants: DoRA's magnitude and direction (Liu et al. 2024), and the starts that
split the base weight into a trained low-rank part and a frozen residual: PiSSA's SVD (Meng et al. 2024),
exact or randomised ("pissa_niter_K"), and OLoRA's QR (Büyükakyüz 2024). `lora.py` holds LoRA itself,
its config, adapter and site, and calls these when LoraConfig's use_dora or init_lora_weights asks;
docs/lora.md derives them.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ..backend import Array, namespace
from .embedding_lora import token_table_parameters


def stop_gradient(a: Array) -> Array:
    """`a`'s value cut loose from autograd's trace (a traced array is a Box whose value is `_value`), so
    autograd treats what is computed from it as a constant, as torch's `.detach()` does. Plain arrays
    come back as they are."""
    while type(a).__module__.startswith("autograd"):
        a = a._value
    return a


def dora_weight_norm(weight: Array, lora_A: Array, lora_B: Array, scaling: float) -> Array:
    """‖W + s (B A)ᵀ‖ per output feature, over the input dimension: (out,). W: (in, out)."""
    xp = namespace(weight, lora_A, lora_B)
    # Aᵀ Bᵀ rather than (B A)ᵀ: a transposed operand in the sum reads memory across rows; a DoRA step at
    # n_embd 512 (B 8, 2 threads) 556 -> 453 ms, bitwise the same numbers
    directional = weight + scaling * (lora_A.T @ lora_B.T)  # [in, out] + s [in, r] @ [r, out] = s (B A)ᵀ
    return xp.sqrt((directional * directional).sum(axis=0))  # [in, out] -> [out]


def dora_forward(
    x: Array,
    weight: Array,
    bias: Array | None,
    lora_A: Array,
    lora_B: Array,
    magnitude: Array,
    scaling: float,
    weight_norm: Array,
    keep: Array | None,
) -> tuple[Array, tuple]:
    """DoRA as PEFT computes it: with k = m / ‖W + s (B A)ᵀ‖ per output feature (the norm given, a constant),

        y = x W + b + (k − 1) ⊙ (x_d W) + k ⊙ s · x_d Aᵀ Bᵀ,      x_d = x ⊙ keep.

    Without dropout (keep None) x_d = x and this is y = k ⊙ (x W + s x Aᵀ Bᵀ) + b: each output feature of
    the LoRA-updated layer rescaled to length m. With dropout, the undropped x W stays and only the
    correction is computed from the dropped input, exactly PEFT's formula.

    x: (..., in), W: (in, out), A: (r, in), B: (out, r), m and the norm: (out,)  ->  y: (..., out).
    Cache: x_d, h = x_d Aᵀ (N, r), v = x_d W + s h Bᵀ (N, out: the output before rescaling, needed for
    dm), k, the norm and the weights.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)  # [N, in]
    keep2 = None if keep is None else keep.reshape(-1, n_in)
    x_drop = x2 if keep2 is None else x2 * keep2  # [N, in]
    base = x2 @ weight  # [N, in] @ [in, out] -> [N, out]
    base_drop = base if keep2 is None else x_drop @ weight  # [N, out]
    h = x_drop @ lora_A.T  # [N, in] @ [in, r] -> [N, r]
    lora = scaling * (h @ lora_B.T)  # [N, r] @ [r, out] -> [N, out]
    k = magnitude / weight_norm  # [out]
    y = base + (k - 1) * base_drop + k * lora  # [N, out]
    if bias is not None:
        y = y + bias
    cache = (x_drop, h, base_drop + lora, k, weight, lora_A, lora_B, weight_norm, keep2, scaling)
    return y.reshape(*lead, weight.shape[1]), cache


def dora_backward(
    dy: Array, cache: tuple, need_dx: bool = True, need_dparams: bool = True, need_dbias: bool = False
) -> tuple[Array | None, Array | None, Array | None, Array | None, Array | None]:
    """(dx, dA, dB, dm, db) for y = x W + b + (k − 1) ⊙ (x_d W) + k ⊙ s · h Bᵀ, h = x_d Aᵀ, k = m / n,
    with the norm n a constant (DoRA's detached norm: no gradient reaches A or B through it):

        dm   = Σ_positions dy ⊙ (x_d W + s h Bᵀ) / n        (out,)
        g    = dy ⊙ k                                       (N, out): the gradient at the LoRA output
        dB   = s · gᵀ h,   dh = s · g B,   dA = dhᵀ x_d
        dx   = dy Wᵀ + ((dy ⊙ (k − 1)) Wᵀ + dh A) ⊙ keep   (= (dy ⊙ k) Wᵀ + dh A without dropout)
        db   = Σ_positions dy
    """
    x_drop, h, unscaled, k, weight, lora_A, lora_B, weight_norm, keep2, scaling = cache
    n_in, n_out = weight.shape
    # in the forward pass this was: y = x W + b + (k − 1) ⊙ (x_d W) + k ⊙ s · (x_d Aᵀ) Bᵀ, so now:
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    dx = dA = dB = dm = db = None
    g = dy2 * k  # [N, out]
    dh = scaling * (g @ lora_B) if (need_dx or need_dparams) else None  # [N, out] @ [out, r] -> [N, r]
    if need_dparams:
        dm = (dy2 * unscaled).sum(axis=0) / weight_norm  # [N, out] -> [out]
        dB = scaling * (g.T @ h)  # [out, N] @ [N, r] -> [out, r]
        dA = dh.T @ x_drop  # [r, N] @ [N, in] -> [r, in]
    if need_dx:
        if keep2 is None:  # x_d = x: both paths meet before the matmul with Wᵀ
            dx = g @ weight.T + dh @ lora_A  # [N, out] @ [out, in] + [N, r] @ [r, in]
        else:
            dx_drop = (dy2 * (k - 1)) @ weight.T + dh @ lora_A  # the gradient at x_d: [N, in]
            dx = dy2 @ weight.T + dx_drop * keep2
        dx = dx.reshape(*dy.shape[:-1], n_in)
    if need_dbias:
        db = dy2.sum(axis=0)
    return dx, dA, dB, dm, db


def dora_merged_weight(weight: Array, lora_A: Array, lora_B: Array, magnitude: Array, scaling: float) -> Array:
    """(m / ‖W + s (B A)ᵀ‖) ⊙ (W + s (B A)ᵀ), each output column scaled: (in, out). The bias is not scaled."""
    directional = weight + scaling * (lora_A.T @ lora_B.T)  # [in, out]: the LoRA-merged weight
    return directional * (magnitude / dora_weight_norm(weight, lora_A, lora_B, scaling))  # [in, out] * [out]


def lora_estimated_parameters(config: Any, base: Any) -> int:
    """LoraConfig.estimated_parameters (here, since lora.py is at its length limit): per targeted layer
    A (r, in) and B (out, r), DoRA's m (out,) and PiSSA's frozen residual (in, out); wte's A (r, V) and
    B (C, r), or Δ (n, C); and the trained copies of base biases (bias="all": every one; "lora_only": the
    targeted layers')."""
    pissa = splits_the_weight(config.init_lora_weights)
    shapes = [base.params[module + ".weight"].shape for module in config.targets(base)]
    n = token_table_parameters(config, base, config.adapts_wte(base))
    n += sum(config.r * (n_in + n_out) + config.use_dora * n_out + pissa * n_in * n_out for n_in, n_out in shapes)
    if config.bias == "all":
        return n + sum(int(p.size) for name, p in base.params.items() if name.endswith(".bias"))
    return n + (config.bias == "lora_only") * sum(n_out for _, n_out in shapes)


def lora_init_factors(config: Any, n_in: int, n_out: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A (r, in) and B (out, r) as PEFT initialises them (PiSSA's are replaced by the caller).

    True: A ~ U(±1/√in) (torch's kaiming_uniform_ with a = √5, nn.Linear's default), B = 0.
    "gaussian": A ~ N(0, std 1/r), B = 0. False: both as nn.Linear leaves them, A ~ U(±1/√in), B ~ U(±1/√r).
    """
    r, init = config.r, config.init_lora_weights
    if init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, size=(r, n_in))
    else:
        A = rng.uniform(-1 / math.sqrt(n_in), 1 / math.sqrt(n_in), size=(r, n_in))
    B = rng.uniform(-1 / math.sqrt(r), 1 / math.sqrt(r), size=(n_out, r)) if init is False else np.zeros((n_out, r))
    return A, B


def pissa_factors(weight: np.ndarray, r: int, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, residual) of PiSSA's init, as PEFT's `pissa_init`, in float64.

    With the SVD Wᵀ = U S Vh (Wᵀ is PEFT's (out, in) layout): A = diag(√(S_r/s)) Vh_r (r, in),
    B = U_r diag(√(S_r/s)) (out, r), so s (B A)ᵀ is W's best rank-r approximation, and the residual
    W − s (B A)ᵀ (in, out) holds the rest.
    """
    W = np.asarray(weight, dtype=np.float64)
    U, S, Vh = np.linalg.svd(W.T, full_matrices=False)  # [out, in] = [out, k] [k] [k, in]
    root = np.sqrt(S[:r] / scaling)  # [r]
    lora_A = root[:, None] * Vh[:r]  # [r, in]
    lora_B = U[:, :r] * root[None, :]  # [out, r]
    return lora_A, lora_B, W - scaling * (lora_A.T @ lora_B.T)


def pissa_niter(init: object) -> int | None:
    """K of init_lora_weights="pissa_niter_K" (PiSSA by the randomised SVD, K subspace iterations)."""
    match = re.fullmatch(r"pissa_niter_(\d{1,3})", init) if isinstance(init, str) else None
    return None if match is None else int(match.group(1))


def splits_the_weight(init: object) -> bool:
    """Whether this init replaces the base weight by a residual (PiSSA, fast PiSSA, OLoRA)."""
    return init in ("pissa", "olora") or pissa_niter(init) is not None


def randomized_svd(matrix: np.ndarray, q: int, niter: int, sketch: np.ndarray) -> tuple[np.ndarray, ...]:
    """(U, S, V) with U diag(S) Vᵀ ≈ `matrix` of rank q: Halko, Martinsson & Tropp (2009), Algorithm 5.1 with
    their subspace iteration, step for step as torch.svd_lowrank, which PEFT's "pissa_niter_K" calls.

    A tall (m ≥ n; else the transpose, and U and V swap at the end), sketch Ω (n, q) ~ N(0, 1):
        Q = qr(A Ω);  K times: Q = qr(Aᵀ Q), Q = qr(A Q)          (m, q): a basis of A's top-q range
        U_B S Vᵀ = svd(Qᵀ A);  U = Q U_B                             the SVD of A's projection onto it
    Each iteration raises the singular values' ratios to a higher power, so the basis locks onto the top q.
    """
    A = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T  # [m, n], m >= n
    Q = np.linalg.qr(A @ sketch)[0]  # [m, n] @ [n, q] -> [m, q]
    for _ in range(niter):
        Q = np.linalg.qr(A.T @ Q)[0]  # [n, m] @ [m, q] -> [n, q]
        Q = np.linalg.qr(A @ Q)[0]  # [m, n] @ [n, q] -> [m, q]
    U_B, S, Vh = np.linalg.svd(Q.T @ A, full_matrices=False)  # [q, n] = [q, q] [q] [q, n]
    U, V = Q @ U_B, Vh.T  # [m, q], [n, q]
    return (U, S, V) if matrix.shape[0] >= matrix.shape[1] else (V, S, U)


def sketch_for(weight_shape: tuple[int, int], r: int, layer_index: int) -> np.ndarray:
    """The random sketch of fast PiSSA for one layer: N(0, 1), (n, r) for the layer's (out, in) weight made
    tall. From a fixed stream per layer, not the adapter's seed, so that loading a saved adapter draws
    it again and recreates the residual it was trained on (exact PiSSA and OLoRA need no draw)."""
    n_out, n_in = weight_shape
    return np.random.default_rng((20240403, layer_index)).standard_normal((min(n_out, n_in), r))


def residual_factors(
    weight: np.ndarray, init: str, r: int, scaling: float, layer_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, residual) of the inits that split W (in, out) into s (B A)ᵀ and a frozen residual, in float64.

    PiSSA, exact (`pissa_factors`) or by `randomized_svd` with K iterations ("pissa_niter_K", as PEFT:
    rank q = r, no oversampling). OLoRA: the QR of the layer's (out, in) weight, Wᵀ = Q R; B = Q_r (out, r),
    orthonormal columns, A = R_r (r, in), not divided by s (as PEFT). PEFT 0.21.2 takes that QR of the
    weight as stored, which for GPT-2's Conv1D is (in, out): there its B has the wrong shape (non-square
    layers fail) and on a square layer the adapter does not start as the base model. tinypeft takes it of
    the (out, in) weight, the orientation PEFT uses for nn.Linear, where the two agree.
    """
    W = np.asarray(weight, dtype=np.float64)
    if init == "olora":
        Q, R = np.linalg.qr(W.T)  # [out, in] = [out, k] [k, in]
        lora_A, lora_B = R[:r], Q[:, :r]  # [r, in], [out, r]
        return lora_A, lora_B, W - scaling * (lora_A.T @ lora_B.T)
    niter = pissa_niter(init)
    if niter is None:
        return pissa_factors(W, r, scaling)
    U, S, V = randomized_svd(W.T, r, niter, sketch_for(W.T.shape, r, layer_index))  # Wᵀ ≈ U diag(S) Vᵀ
    root = np.sqrt(S / scaling)  # [r]
    lora_A, lora_B = root[:, None] * V.T, U * root[None, :]  # [r, in], [out, r]
    return lora_A, lora_B, W - scaling * (lora_A.T @ lora_B.T)
