"""cupyx, as far as tinypeft uses it: `scatter_add`, which adds every repeated index (the GPU's atomic
adds), where `a[index] += value` keeps one of them."""

from __future__ import annotations

from typing import Any


def scatter_add(a: Any, slices: Any, value: Any) -> None:
    """a[slices] += value in place, repeated indices each added. As CuPy's, this is `a.scatter_add`: a
    NumPy array has no such method."""
    a.scatter_add(slices, value)
