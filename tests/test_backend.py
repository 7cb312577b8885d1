"""The backend switch: every forward/backward is written against the namespace of its inputs, so the
same code runs on numpy, cupy and autograd.numpy. No GPU here, so this checks what the switch relies
on: the namespace dispatch, the device choice, and that no forward or backward calls numpy directly
(a direct np.* call would pull device arrays to the host or fail on cupy)."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

import tinypeft as tp
from tinypeft import backend, runtime

SOURCES = sorted((pathlib.Path(tp.__file__).parent).glob("ops.py")) + sorted(
    (pathlib.Path(tp.__file__).parent).glob("methods/*.py")
)


def device_functions():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (
                node.name.endswith(("_forward", "_backward")) or node.name in ("forward", "backward")
            ):
                yield path.name, node


@pytest.mark.parametrize("where,node", list(device_functions()), ids=lambda v: getattr(v, "name", v))
def test_forwards_and_backwards_never_call_numpy_directly(where, node):
    direct = [
        n.lineno
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("np", "numpy")
    ]
    assert not direct, f"{where}:{node.name} uses np.* at lines {direct}; use namespace(...) so cupy works"


def test_there_are_device_functions_to_check():
    names = {node.name for _, node in device_functions()}
    assert {"linear_forward", "attention_backward", "lora_forward", "prompt_forward"} <= names


def test_namespace_dispatch():
    import autograd.numpy as anp
    from autograd import grad

    assert backend.namespace(np.zeros(2), 1.0, None) is np
    seen = []

    def f(x):
        seen.append(backend.namespace(np.ones(2), x))
        return (x * x).sum()

    grad(f)(np.ones(3))
    assert seen == [anp]


def test_device_choice(monkeypatch):
    assert backend.get_backend("cpu") is np
    monkeypatch.setenv(runtime.BACKEND_ENV, "numpy")
    assert backend.get_backend() is np
    monkeypatch.setenv(runtime.BACKEND_ENV, "tensorflow")
    with pytest.raises(tp.ConfigError, match="numpy"):
        backend.get_backend()
    with pytest.raises(tp.ConfigError, match="cpu"):
        backend.get_backend("tpu")
    assert (
        tp.GPT(tp.GPTConfig(vocab_size=5, n_positions=4, n_embd=4, n_layer=1, n_head=1), device="cpu").device == "cpu"
    )


def test_scatter_add_keeps_repeats():
    out = backend.scatter_add_rows(3, np.array([0, 2, 0]), np.array([[1.0], [2.0], [4.0]]))
    np.testing.assert_array_equal(out, [[5.0], [0.0], [2.0]])
