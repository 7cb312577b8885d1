"""GELU, tanh form (GPT-2's "gelu_new"; PyTorch's gelu(approximate="tanh")).

The erf form differs from it by up to ~5e-4, so the name says which one this is.
"""

from __future__ import annotations

import math

from ..backend import Array, namespace

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


def gelu_tanh_forward(x: Array) -> tuple[Array, Array]:
    """y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Cache: x only; tanh(u) is recomputed in the backward to keep one activation-sized array
    (the MLP's 4*n_embd-wide hidden layer is the largest activation in the model).
    """
    xp = namespace(x)
    u = x * (SQRT_2_OVER_PI + (SQRT_2_OVER_PI * CUBIC) * (x * x))  # = sqrt(2/pi) (x + 0.044715 x^3)
    return (0.5 * x) * (1.0 + xp.tanh(u)), x


def gelu_tanh_backward(dy: Array, x: Array) -> Array:
    """dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  t = tanh(u),  du/dx = sqrt(2/pi) (1 + 3*0.044715 x^2).

    Written with in-place updates of three fresh buffers: the backward is never traced by autograd,
    and on the MLP's activation (the model's largest) each avoided temporary is a pass over memory.
    """
    xp = namespace(x)
    x2 = x * x
    t = x2 * (SQRT_2_OVER_PI * CUBIC)
    t += SQRT_2_OVER_PI
    t *= x  # u = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(t, out=t)  # t = tanh(u)
    du_dx = x2
    du_dx *= 3.0 * CUBIC * SQRT_2_OVER_PI
    du_dx += SQRT_2_OVER_PI
    slope = t * t
    xp.subtract(1.0, slope, out=slope)
    slope *= x
    slope *= du_dx  # x (1 - t^2) du/dx
    t += 1.0
    t += slope
    t *= 0.5
    t *= dy
    return t
