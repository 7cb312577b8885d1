"""The CuPy stand-in: `cupy/` and `cupyx/` here are NumPy-backed modules that behave as CuPy does where a
NumPy program goes wrong on a GPU (see cupy/__init__.py). `installed()` puts them in sys.modules as
`cupy` and `cupyx` for the length of a block, so tinypeft's device branches run without a GPU; a
subprocess gets them with PYTHONPATH=tests/fake_cupy."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

FOLDER = Path(__file__).resolve().parent
NAMES = ("cupy", "cupyx")
_loaded: dict[str, ModuleType] = {}


def _load() -> dict[str, ModuleType]:
    """The stand-in's modules, loaded once per process (so arrays made in one block are of the class the
    next block knows), under their real names: `type(a).__module__` is "cupy"."""
    if not _loaded:
        saved = {name: sys.modules.get(name) for name in NAMES}
        try:
            for name in NAMES:
                spec = importlib.util.spec_from_file_location(
                    name, FOLDER / name / "__init__.py", submodule_search_locations=[str(FOLDER / name)]
                )
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module  # cupyx imports the stand-in's cupy
                spec.loader.exec_module(module)
                _loaded[name] = module
        finally:
            _restore(saved)
    return _loaded


def _restore(saved: dict[str, ModuleType | None]) -> None:
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@contextlib.contextmanager
def installed() -> Iterator[ModuleType]:
    """`import cupy` and `import cupyx` give the stand-in inside the block (a real CuPy, if any, is
    put back after it); yields the stand-in's cupy."""
    modules = _load()
    saved = {name: sys.modules.get(name) for name in NAMES}
    sys.modules.update(modules)
    try:
        yield modules["cupy"]
    finally:
        _restore(saved)
