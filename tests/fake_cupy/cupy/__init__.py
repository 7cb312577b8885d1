"""A stand-in for CuPy, backed by NumPy, so that tinypeft's GPU branches run on every CI machine.

It behaves as CuPy does where a program written against NumPy goes wrong on a GPU:

- An array lives "on the device": `np.asarray(a)` and every other implicit conversion raise CuPy's
  TypeError; `a.get()` and `cupy.asnumpy(a)` are the ways back to the host.
- `cupy.asarray(host)` copies: changing the host array afterwards does not change the device one.
- Arithmetic, ufuncs and cupy's functions refuse a NumPy array operand (CuPy's "Unsupported type"),
  Python and NumPy scalars are fine; a NumPy function given a device array runs cupy's function of
  that name (NEP 18, as CuPy does) or fails if cupy has none.
- Reductions and indexing return 0-d device arrays, never NumPy scalars; `float(a)`, `int(a)` and
  `bool(a)` of a one-element array work, as CuPy's synchronising conversions do.
- Assigning a NumPy array into a basic slice (`a[:2] = host`) raises CuPy's ValueError.
- `type(a).__module__` is "cupy", so tinypeft's `backend.namespace` and `to_numpy` see a device array;
  `cupyx.scatter_add` adds repeated indices, as the GPU's atomic adds do.

The arithmetic is NumPy's own, on the NumPy array inside, so a model computed here gives bitwise the
numbers the NumPy model gives. Only the names tinypeft needs (and their neighbours) exist: a name CuPy
has that is missing here is added here, never papered over. `cuda.runtime` answers as one device
with `DEVICE_MEMORY` bytes free.
"""

from __future__ import annotations

import builtins  # any, all, max, min, sum, abs and round are cupy's functions below
from typing import Any

import numpy as _np
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "0.0.0+tinypeft-stand-in"
IMPLICIT_CONVERSION = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
)
DEVICE_MEMORY = (64 << 30, 80 << 30)  # (free, total) bytes, as cuda.runtime.memGetInfo() reports them


def _device_value(x: Any) -> Any:
    """What a cupy kernel accepts as an operand, as the NumPy value to compute with: a device array's
    contents, or a Python or NumPy scalar; anything else (a NumPy array first of all) is CuPy's error."""
    if isinstance(x, ndarray):
        return x._data
    if isinstance(x, (bool, int, float, complex, _np.generic)) or x is None:
        return x
    raise TypeError(f"Unsupported type {type(x)}")


def _argument(x: Any) -> Any:
    """An argument of a cupy function or method: device arrays (also inside lists and tuples) unwrapped,
    NumPy arrays refused as operands are, shapes, axes, dtypes and flags as they are."""
    if isinstance(x, ndarray):
        return x._data
    if isinstance(x, _np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (list, tuple)):
        return type(x)(_argument(v) for v in x)
    return x


def _index(key: Any) -> Any:
    """An index as NumPy takes it: device arrays inside it unwrapped; lists and NumPy arrays are taken
    as they are (CuPy copies them to the device)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._data if isinstance(key, ndarray) else key


def _is_advanced(key: Any) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return builtins.any(isinstance(k, (list, _np.ndarray, ndarray)) for k in keys)


def _wrap(value: Any) -> Any:
    """A NumPy result as a device result: arrays and NumPy scalars become device arrays (CuPy never
    hands back a NumPy scalar); tuples and lists of them stay tuples and lists; the rest as it is."""
    if isinstance(value, _np.ndarray):
        return ndarray._of(value)
    if isinstance(value, _np.generic):
        return ndarray._of(_np.asarray(value))
    if isinstance(value, (tuple, list)):
        return type(value)(_wrap(v) for v in value)
    return value


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 (CuPy's name)
    """A device array: a NumPy array that only the stand-in's functions may see."""

    __slots__ = ("_data",)

    def __init__(self, shape: Any, dtype: Any = float, order: str = "C") -> None:
        self._data = _np.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _of(cls, data: _np.ndarray) -> ndarray:
        a = cls.__new__(cls)
        a._data = data
        return a

    # ------------------------------------------------------------ leaving the device
    def __array__(self, dtype: Any = None, copy: Any = None) -> _np.ndarray:
        raise TypeError(IMPLICIT_CONVERSION)

    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> _np.ndarray:
        """A host copy (CuPy's device-to-host transfer)."""
        if out is not None:
            out[...] = self._data
            return out
        return _np.array(self._data, order=order, copy=True)

    def set(self, arr: _np.ndarray, stream: Any = None) -> None:
        """Copy a host array of the same shape into this one (CuPy's host-to-device transfer)."""
        self._data[...] = _np.asarray(arr)

    def item(self) -> Any:
        return self._data.item()

    def tolist(self) -> Any:
        return self._data.tolist()

    def __float__(self) -> float:
        return float(self._data)

    def __int__(self) -> int:
        return int(self._data)

    def __complex__(self) -> complex:
        return complex(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __str__(self) -> str:
        return str(self._data)

    # ------------------------------------------------------------ shape
    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    nbytes = property(lambda self: self._data.nbytes)
    itemsize = property(lambda self: self._data.itemsize)
    strides = property(lambda self: self._data.strides)
    flags = property(lambda self: self._data.flags)
    T = property(lambda self: ndarray._of(self._data.T))
    real = property(lambda self: ndarray._of(self._data.real))
    imag = property(lambda self: ndarray._of(self._data.imag))

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self):
        return (_wrap(row) for row in self._data)

    def __getitem__(self, key: Any) -> ndarray:
        return _wrap(self._data[_index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, _np.ndarray) and value.ndim and not _is_advanced(key):
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._data[_index(key)] = value._data if isinstance(value, ndarray) else value

    # ------------------------------------------------------------ NumPy's protocols, as CuPy answers them
    def __array_ufunc__(self, ufunc: _np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method not in ("__call__", "reduce", "accumulate", "outer", "at"):
            return NotImplemented
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(o._data if isinstance(o, ndarray) else _device_value(o) for o in out)
        if method == "at":  # ufunc.at(a, indices, b): the indices may be host or device
            a, indices, *rest = inputs
            ufunc.at(_device_value(a), _index(indices), *(_device_value(r) for r in rest))
            return None
        result = getattr(ufunc, method)(*(_device_value(x) for x in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        mine = globals().get(func.__name__)
        if mine is None or not callable(mine) or func.__module__.split(".")[1:2] not in ([], ["core"]):
            return NotImplemented
        return mine(*args, **kwargs)

    # ------------------------------------------------------------ methods (CuPy's; see _METHODS below)
    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        return ndarray._of(self._data.reshape(*shape, order=order))

    def transpose(self, *axes: Any) -> ndarray:
        return ndarray._of(self._data.transpose(*axes))

    def scatter_add(self, slices: Any, value: Any) -> None:
        """self[slices] += value, every repeated index added (CuPy's atomic adds)."""
        _np.add.at(self._data, _index(slices), value._data if isinstance(value, ndarray) else value)


def _method(name: str):
    """ndarray.<name>: NumPy's method on the data, arguments and results through the device rules."""

    def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        out = kwargs.pop("out", None)
        result = getattr(self._data, name)(*_argument(args), **{k: _argument(v) for k, v in kwargs.items()})
        if out is not None:
            out._data[...] = result
            return out
        return _wrap(result)

    method.__name__ = name
    return method


_METHODS = (  # noqa: SIM905 (a list of names to read, not to edit one a line)
    "all any argmax argmin argsort astype clip conj copy cumprod cumsum diagonal dot fill flatten max mean min "
    "nonzero prod ravel repeat round sort squeeze std sum swapaxes take trace var view"
).split()
for _name in _METHODS:
    setattr(ndarray, _name, _method(_name))


# ------------------------------------------------------------------ between host and device
def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> ndarray:
    """A device array: a device array itself (cast if dtype says so), else a copy of the host data."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    return ndarray._of(_np.array(a, dtype=dtype, order=order, copy=True))


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", ndmin: int = 0) -> ndarray:
    data = obj._data if isinstance(obj, ndarray) else obj
    return ndarray._of(_np.array(data, dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None, *, blocking: bool = True) -> _np.ndarray:
    """A host copy of a device array; anything else through numpy.asarray (as CuPy's asnumpy)."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args: Any):
    import sys

    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else _np


# ------------------------------------------------------------------ functions and ufuncs
def _function(name: str, numpy_module: Any = _np):
    """cupy.<name>: NumPy's function, arguments and results through the device rules."""
    numpy_function = getattr(numpy_module, name)

    def function(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.pop("out", None)
        result = numpy_function(*_argument(args), **{k: _argument(v) for k, v in kwargs.items()})
        if out is not None:
            out._data[...] = result
            return out
        return _wrap(result)

    function.__name__ = name
    return function


class ufunc:  # noqa: N801 (CuPy's name)
    """A NumPy ufunc on device arrays: operands as `_device_value` allows, out= a device array."""

    def __init__(self, numpy_ufunc: _np.ufunc) -> None:
        self._ufunc = numpy_ufunc
        self.__name__ = numpy_ufunc.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = [_device_value(x) for x in args]  # refuses a NumPy array, as a cupy kernel does
        out = kwargs.get("out")
        outs = out if isinstance(out, tuple) else () if out is None else (out,)
        if not builtins.any(isinstance(x, ndarray) for x in (*args, *outs)):
            return _wrap(self._ufunc(*values, **kwargs))  # scalars alone: still a device result
        return self._ufunc(*args, **kwargs)  # NumPy hands it to ndarray.__array_ufunc__

    def reduce(self, a: ndarray, *args: Any, **kwargs: Any) -> Any:
        return self._ufunc.reduce(a, *args, **kwargs)

    def at(self, a: ndarray, indices: Any, b: Any = None) -> None:
        self._ufunc.at(a, indices, *(() if b is None else (b,)))


_FUNCTIONS = (  # noqa: SIM905
    "all allclose amax amin any arange argmax argmin argsort array_equal broadcast_to clip concatenate copyto cumsum "
    "diag dot einsum empty empty_like expand_dims eye full full_like isclose linspace max mean min moveaxis "
    "ones ones_like outer prod repeat reshape split sort squeeze stack std sum swapaxes take take_along_axis "
    "tensordot tile trace transpose tril triu var where zeros zeros_like"
).split()
_UFUNCS = (  # noqa: SIM905
    "abs absolute add arctan ceil cos divide equal exp expm1 floor greater greater_equal isfinite isinf isnan "
    "less less_equal log log1p logical_and logical_not logical_or matmul maximum minimum multiply negative "
    "not_equal power reciprocal sign sin sqrt square subtract tanh true_divide"
).split()
for _name in _FUNCTIONS:
    globals()[_name] = _function(_name)
for _name in _UFUNCS:
    globals()[_name] = ufunc(getattr(_np, _name))
del _name


class _Linalg:
    """cupy.linalg: the functions tinypeft calls (OFT's Cayley transform solves a stack of systems)."""

    solve = staticmethod(_function("solve", _np.linalg))


linalg = _Linalg()

# dtypes and constants are NumPy's, as CuPy re-exports them
bool_, int8, int16, int32, int64, uint8 = _np.bool_, _np.int8, _np.int16, _np.int32, _np.int64, _np.uint8
float16, float32, float64 = _np.float16, _np.float32, _np.float64
dtype, finfo, iinfo, newaxis = _np.dtype, _np.finfo, _np.iinfo, _np.newaxis
e, inf, nan, pi = _np.e, _np.inf, _np.nan, _np.pi


# ------------------------------------------------------------------ the device
class _Runtime:
    @staticmethod
    def getDeviceCount() -> int:
        return 1

    @staticmethod
    def memGetInfo() -> tuple[int, int]:
        return DEVICE_MEMORY


class _Device:
    """cupy.cuda.Device(): the stand-in computes synchronously, so there is nothing to wait for."""

    def __init__(self, device: int = 0) -> None:
        self.id = device

    def synchronize(self) -> None:
        pass


class _Cuda:
    runtime = _Runtime()
    Device = _Device


cuda = _Cuda()


class _MemoryPool:
    def free_bytes(self) -> int:
        return 0

    def used_bytes(self) -> int:
        return 0

    def free_all_blocks(self) -> None:
        pass


_pool = _MemoryPool()


def get_default_memory_pool() -> _MemoryPool:
    return _pool
