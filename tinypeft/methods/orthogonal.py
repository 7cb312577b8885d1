"""The orthogonal rotations OFT and BOFT share: skew-symmetric blocks, the Cayley transform that turns one into
a rotation (exact, or PEFT's truncated Neumann series), OFT's constraint (COFT), and the block-diagonal
rotation of a layer's input. Each is a forward/backward pair; `oft.py` and `boft.py` chain them, and
docs/oft.md derives them step by step.

Shapes: k blocks of size b (k = the number of blocks stored: r, or 1 when the blocks share one rotation);
a skew-symmetric S (k, b, b) with Sᵀ = −S; a rotation R (k, b, b). PEFT stores OFT's S by its strict upper
triangle, a vector q of b(b−1)/2 numbers per block (`torch.triu_indices(b, b, 1)` order, row by row), and
BOFT's by a full square X whose skew part ½(X − Xᵀ) is S.

The Cayley transform, as PEFT 0.21.2 computes it (`torch.linalg.solve(I + S, I − S, left=False)`):

    R = (I − S)(I + S)⁻¹  =  2 (I + S)⁻¹ − I          (orthogonal for every skew S; R = I at S = 0)

and its Neumann form (`use_cayley_neumann`), PEFT's truncated series with the opposite sign of S:

    R ≈ I + 2S + 2S² + … + 2S^(m−1) + S^m             (the series of (I + S)(I − S)⁻¹; not orthogonal)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace
from ..config import shown
from ..errors import ConfigError
from .base import PEFT_PREFIX
from .registry import Flag

if TYPE_CHECKING:
    from ..model import GPT


def _t(a: Array) -> Array:
    """The transpose of each matrix of a stack: (..., i, j) -> (..., j, i)."""
    return a.swapaxes(-1, -2)


# ===================================================================== skew-symmetric blocks
def skew_gather_index(b: int) -> np.ndarray:
    """For S's b·b entries in row-major order, where each comes from in [0, q, −q]: 0 on the diagonal,
    1 + t above it and 1 + n + t below it, t the entry's place in q (n = b(b−1)/2, triu order)."""
    rows, cols = np.triu_indices(b, 1)
    n = rows.size
    index = np.zeros((b, b), dtype=np.int64)
    index[rows, cols] = 1 + np.arange(n)
    index[cols, rows] = 1 + n + np.arange(n)
    return index.reshape(-1)


def skew_from_upper_forward(q: Array, b: int) -> Array:
    """S with S[i, j] = q[t], S[j, i] = −q[t] for the t-th (i < j) of the strict upper triangle, zero diagonal.

    q: (k, b(b−1)/2) -> S: (k, b, b). A gather (no in-place writes), so autograd follows it.
    """
    xp = namespace(q)
    k = q.shape[0]
    padded = xp.concatenate([xp.zeros((k, 1), dtype=q.dtype), q, -q], axis=1)  # [k, 1 + 2n]
    return padded[:, xp.asarray(skew_gather_index(b))].reshape(k, b, b)  # [k, b·b] -> [k, b, b]


def skew_from_upper_backward(dS: Array) -> Array:
    """dq[t] = dS[i, j] − dS[j, i]: q[t] enters S twice, at (i, j) with sign + and at (j, i) with sign −.

    dS: (k, b, b) -> dq: (k, b(b−1)/2)."""
    xp = namespace(dS)
    rows, cols = (xp.asarray(i) for i in upper_triangle(dS.shape[-1]))
    return dS[:, rows, cols] - dS[:, cols, rows]


def upper_triangle(b: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the strict upper triangle of a b x b matrix, row by row: torch.triu_indices(b, b, 1)."""
    return np.triu_indices(b, 1)


def skew_part_forward(X: Array) -> Array:
    """S = ½ (X − Xᵀ) per block (BOFT stores the full square X): X (..., b, b) -> S (..., b, b)."""
    return 0.5 * (X - _t(X))


def skew_part_backward(dS: Array) -> Array:
    """dX = ½ (dS − dSᵀ): X[i, j] enters S[i, j] with +½ and S[j, i] with −½."""
    return 0.5 * (dS - _t(dS))


# ===================================================================== Cayley transform
def cayley_forward(S: Array) -> tuple[Array, Array]:
    """R = (I − S)(I + S)⁻¹ per block, by a solve (no explicit inverse), as PEFT: Rᵀ = (I + S)⁻ᵀ (I − S)ᵀ.

    S: (..., b, b) -> R: (..., b, b). Cache: R alone (the backward needs nothing else, see below).
    """
    xp = namespace(S)
    eye = xp.eye(S.shape[-1], dtype=S.dtype)
    R = _t(xp.linalg.solve(_t(eye + S), _t(eye - S)))  # solve (I + S)ᵀ Rᵀ = (I − S)ᵀ
    return R, R


def cayley_backward(dR: Array, R: Array) -> Array:
    """dS = −½ (I + Rᵀ) dR (I + Rᵀ), per block: (..., b, b).

    In the forward pass this was R = (I − S) A⁻¹ with A = I + S; since I − S = 2I − A, R = 2 A⁻¹ − I. Then
    d(A⁻¹) = −A⁻¹ dA A⁻¹ with dA = dS gives dR = −2 A⁻¹ dS A⁻¹, and for L(R):
        ⟨dR_bar, dR⟩ = ⟨−2 A⁻ᵀ dR_bar A⁻ᵀ, dS⟩   so   dS_bar = −2 A⁻ᵀ dR_bar A⁻ᵀ.
    The forward already holds A⁻¹ = (R + I)/2, so A⁻ᵀ = (Rᵀ + I)/2 and no inverse is computed again.
    """
    xp = namespace(dR, R)
    eye = xp.eye(R.shape[-1], dtype=R.dtype)
    half = _t(R) + eye  # 2 A⁻ᵀ: [..., b, b]
    return -0.5 * (half @ dR @ half)


def neumann_coefficients(terms: int) -> tuple[int, ...]:
    """c_0..c_m of PEFT's truncated series R = Σ c_j S^j for `num_cayley_neumann_terms` = terms, exactly as
    PEFT's loop builds it: 1 term: I; 2: I + 2S; from 3 on: I + 2S + … + 2S^(m−1) + S^m with m = max(terms − 1, 3)
    (so 3 and 4 terms give the same cubic: PEFT's loop adds no term for 4)."""
    if terms == 1:
        return (1,)
    if terms == 2:
        return (1, 2)
    m = max(terms - 1, 3)
    return (1, *([2] * (m - 1)), 1)


def neumann_forward(S: Array, terms: int) -> tuple[Array, tuple]:
    """R = Σ_j c_j S^j (j = 0..m, coefficients above): S (..., b, b) -> R (..., b, b).

    Cache: the powers S^0..S^(m−1) (S^m is not needed by the backward) and the coefficients.
    """
    xp = namespace(S)
    coefficients = neumann_coefficients(terms)
    powers = [xp.broadcast_to(xp.eye(S.shape[-1], dtype=S.dtype), S.shape)]  # S^0 per block
    for _ in range(len(coefficients) - 2):
        powers.append(powers[-1] @ S)  # S^1 .. S^(m−1)
    R = sum(c * P for c, P in zip(coefficients, powers, strict=False))
    if len(coefficients) > 1:
        R = R + coefficients[-1] * (powers[-1] @ S)  # the last term, c_m S^m
    return R, (powers, coefficients)


def neumann_backward(dR: Array, cache: tuple) -> Array:
    """dS = Σ_{j≥1} c_j Σ_{i=0}^{j−1} (S^i)ᵀ dR (S^(j−1−i))ᵀ.

    In the forward pass this was R = Σ c_j S^j, and d(S^j) = Σ_i S^i dS S^(j−1−i) (S does not commute with
    dS), so ⟨dR_bar, d(S^j)⟩ = Σ_i ⟨(S^i)ᵀ dR_bar (S^(j−1−i))ᵀ, dS⟩. S^0 = I contributes no gradient.
    """
    powers, coefficients = cache
    dS = 0.0 * dR
    for j, c in enumerate(coefficients[1:], start=1):
        for i in range(j):
            dS = dS + c * (_t(powers[i]) @ dR @ _t(powers[j - 1 - i]))
    return dS


# ===================================================================== the constrained variant (COFT)
def coft_block_eps(eps: float, n_blocks: int) -> float:
    """The radius each block's S is held to: eps / √(blocks stored), in float32 as PEFT computes it:
    `eps * 1 / torch.sqrt(torch.tensor(n))` is a float32 tensor (torch's default dtype), and a number divided by
    a tensor is the tensor's reciprocal times the number. √n here is correctly rounded; torch's float32 sqrt is
    not always (on the CPU these tests ran on, √19 is one float32 unit low), and there the two radii differ by one
    or two units in float32's last place (docs/oft.md)."""
    with np.errstate(over="ignore"):  # an eps past float32's range is inf there, as in PEFT: no constraint
        return float(np.float32(eps) * (np.float32(1.0) / np.sqrt(np.float32(n_blocks))))


def coft_project(q: Array, eps_block: float) -> Array:
    """PEFT's `_project_batch`: each block's S moved onto the ball ‖S‖_F ≤ eps_block if outside it, radially,
    S -> eps_block · S / ‖S‖_F, else kept. ‖S‖_F = √2 ‖q‖ (each q entry is in S twice).

    q: (k, n) -> (k, n). A value only: PEFT computes it under torch.no_grad() and writes it back into the
    parameter, so its gradient is taken at the projected q as if the projection were not there (see oft.py).
    """
    xp = namespace(q)
    norm = xp.sqrt(2.0 * (q * q).sum(axis=-1, keepdims=True))  # ‖S_i‖_F: [k, 1]
    inside = norm <= eps_block
    return xp.where(inside, q, q * (eps_block / xp.where(inside, 1.0, norm)))  # no 0/0 at S = 0


# ===================================================================== block-diagonal rotation
def block_rotate_forward(x: Array, R: Array) -> tuple[Array, tuple]:
    """x' = x diag(R_1, ..., R_r): each consecutive group of b features of x, a row vector, times its block.

    x: (..., r·b), R: (r, b, b), or (1, b, b) for one block shared by all r groups  ->  x': (..., r·b).
    Cache: the groups of x, block-major (r, N, b), and R (the groups are needed for dR, R for dx).
    The groups are laid out block-major so that each block's product is one BLAS call (r matmuls of
    [N, b] @ [b, b]): measured ~6x faster than an einsum over (N, r, b) at N = 2048, b = 32.
    """
    b = R.shape[-1]
    groups = x.reshape(-1, x.shape[-1] // b, b).swapaxes(0, 1)  # [N, r·b] -> [r, N, b]
    rotated = groups @ R  # [r, N, b] @ [r or 1, b, b]: group i times R_i
    return rotated.swapaxes(0, 1).reshape(x.shape), (groups, R)


def block_rotate_backward(
    dxr: Array, cache: tuple, need_dx: bool = True, need_dR: bool = True
) -> tuple[Array | None, Array | None]:
    """(dx, dR) for x'_i = x_i R_i per group i (x_i, x'_i: the group's row vectors over every position n):

    dR_i = Σ_n x_{n,i}ᵀ dx'_{n,i}      (b, b): summed over the r groups too when the block is shared
    dx_i = dx'_i R_iᵀ
    """
    groups, R = cache
    dgroups = dxr.reshape(-1, groups.shape[0], groups.shape[2]).swapaxes(0, 1)  # [r, N, b]
    dx = dR = None
    if need_dR:
        dR = groups.swapaxes(1, 2) @ dgroups  # [r, b, N] @ [r, N, b] -> [r, b, b]
        if R.shape[0] == 1:
            dR = dR.sum(axis=0, keepdims=True)  # one block used r times: its gradient is the sum
    if need_dx:
        dx = (dgroups @ _t(R)).swapaxes(0, 1).reshape(dxr.shape)  # dx'_i R_iᵀ
    return dx, dR


def block_diagonal_matrix(R: Array, n_features: int) -> Array:
    """diag(R_1..R_r) as one (in, in) matrix: the identity's rows rotated as the forward rotates x."""
    xp = namespace(R)
    return block_rotate_forward(xp.eye(n_features, dtype=R.dtype), R)[0]


# ===================================================================== BOFT's butterfly
def block_butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> np.ndarray:
    """PEFT's `block_butterfly_perm`, ported as it is: a permutation of n features in blocks of n // b, within
    each of which groups of r are reordered evens first, then odds. The identity when n_butterfly_factor = 0."""
    if n_butterfly_factor == 0:
        return np.arange(n)
    block_size = n // b
    step = block_size / r
    order = np.concatenate([np.arange(0, step, 2), np.arange(1, step, 2)])
    sorted_order = np.concatenate([np.arange(block_size)[int(pos * r) : int(pos * r + r)] for pos in order])
    return np.concatenate([i + sorted_order for i in range(0, n, block_size)])


def butterfly_permutations(n_in: int, block_num: int, block_size: int, n_factors: int) -> list[np.ndarray]:
    """perm_f for f = 0..F−1, as PEFT's `update_layer` makes them: P_f[i, perm_f[i]] = 1, so x P_f = x[..., inv_f]
    and x P_fᵀ = x[..., perm_f] (inv_f the inverse permutation)."""
    return [
        block_butterfly_perm(n_in, int(block_num / 2**f), int(block_size / 2), n_factors - 1) for f in range(n_factors)
    ]


# per factor, the gathers x P_f = x[..., inv_f] and x P_fᵀ = x[..., perm_f] as (perm_f, inv_f), or None for P_f = I
Gather = "tuple[np.ndarray, np.ndarray] | None"


def butterfly_gathers(perms: Sequence[np.ndarray]) -> list[Gather]:
    """(perm_f, inv_f) for each factor, None where perm_f is the identity (P_0 always; every P_f when F = 1)."""
    return [None if np.array_equal(p, np.arange(p.size)) else (p, np.argsort(p)) for p in perms]


def butterfly_forward(x: Array, R: Array, gathers: Sequence[Gather]) -> tuple[Array, list]:
    """x' = x M_{F−1} ⋯ M_0 with x M_f = ((x P_f) B_f) P_fᵀ: gather by inv_f, rotate the blocks, gather by perm_f.

    x: (..., in), R: (F, D, H, H) -> x': (..., in). Cache: each factor's block-rotation cache, in the order applied.
    """
    xp = namespace(x, R)
    caches = []
    for f in reversed(range(len(gathers))):
        gather = gathers[f]
        u = x if gather is None else x[..., xp.asarray(gather[1])]  # x P_f
        v, cache = block_rotate_forward(u, R[f])  # (x P_f) B_f
        x = v if gather is None else v[..., xp.asarray(gather[0])]  # ... P_fᵀ
        caches.append((f, cache))
    return x, caches


def butterfly_backward(
    dxr: Array, caches: list, gathers: Sequence[Gather], need_dx: bool = True, need_dR: bool = True
) -> tuple[Array | None, Array | None]:
    """(dx, dR (F, D, H, H)), back through the factors in the reverse of the order they were applied.

    For one factor, in the forward pass this was u = x[..., inv], v = u B (block_rotate), x' = v[..., perm];
    a gather by a permutation is undone by the inverse gather, so dv = dx'[..., inv], (du, dR_f) from the block
    rotation, and dx = du[..., perm]. The first factor applied needs no dx unless asked for.
    """
    xp = namespace(dxr)
    dR: list[Array | None] = [None] * len(gathers)
    d = dxr
    for position, (f, cache) in reversed(list(enumerate(caches))):
        gather = gathers[f]
        dv = d if gather is None else d[..., xp.asarray(gather[1])]
        du, dR[f] = block_rotate_backward(dv, cache, need_dx or position > 0, need_dR)
        d = du if du is None or gather is None else du[..., xp.asarray(gather[0])]
    return d, (xp.stack(dR) if need_dR else None)


def butterfly_matrix(R: Array, gathers: Sequence[Gather], n_in: int) -> Array:
    """M (in, in): the identity's rows through the butterfly, as the forward turns x."""
    xp = namespace(R)
    return butterfly_forward(xp.eye(n_in, dtype=R.dtype), R, gathers)[0]


# ===================================================================== config checks both methods share
GPT2_DEFAULT_TARGETS = ("c_attn",)  # PEFT's TRANSFORMERS_MODELS_TO_(B)OFT_TARGET_MODULES_MAPPING["gpt2"]
UNSUPPORTED = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
TARGET_FLAG = Flag(("--target_modules",), {"nargs": "+", "default": None, "metavar": "NAME", "help": "layers to "
                   "adapt (PEFT matching: a name or a suffix such as c_attn); default: PEFT's for gpt2"})  # fmt: skip


def check_choice(cls: str, name: str, value: Any, choices: tuple) -> None:
    if not any(value is c if isinstance(c, bool) else (value == c and not isinstance(value, bool)) for c in choices):
        raise ConfigError(f"{cls}.{name} must be one of {choices}; got {shown(value)}")


def check_probability(cls: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{cls}.{name} must be a probability in [0, 1); got {shown(value)}")
    return value


def check_count(cls: str, name: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{cls}.{name} must be an integer >= {minimum}; got {shown(value)}")


def normalize_targets(value: Any) -> list[str] | str:
    """PEFT keeps a set; JSON needs a list. None is GPT-2's default, ["c_attn"]."""
    if value is None:
        return list(GPT2_DEFAULT_TARGETS)
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value) if isinstance(value, tuple) else value


def refuse_unsupported(config: Any, names: tuple[str, ...]) -> None:
    """PEFT options tinypeft does not implement are fields only so that a PEFT adapter_config.json using them is
    refused rather than computed as something else."""
    used = {k: getattr(config, k) for k in names if getattr(config, k) is not None}
    if used:
        raise ConfigError(
            f"{type(config).__name__}: tinypeft does not implement PEFT's {shown(used)}; leave them at None"
        )


def suggested_divisor(n: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of n nearest to value (the lower one on a tie), or n if
    value >= n; PEFT silently switches to it, tinypeft names it in its error."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher:
        higher += 1
    lower = value
    while lower > 1 and n % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def trained_biases(bias: str, base: GPT, modules: Collection[str]) -> dict[str, str]:
    """Base bias -> the name its trained copy is saved under, as PEFT: "all" trains every `*.bias` (LayerNorms'
    too), "<method>_only" those of the targeted layers (saved as `<module>.base_layer.bias`)."""
    if bias == "none":
        return {}
    targeted = {m + ".bias": f"{PEFT_PREFIX}{m}.base_layer.bias" for m in modules}
    names = [n for n in base.params if n.endswith(".bias")] if bias == "all" else list(targeted)
    return {n: targeted.get(n, PEFT_PREFIX + n) for n in names}
