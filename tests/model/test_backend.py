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


# ------------------------------------------------------------------ the CuPy stand-in (tests/fake_cupy)
# tests/model/test_cupy.py runs the device branches through it, and checks it behaves as CuPy does (against CuPy
# itself where there is a GPU); these check that the backend takes it for CuPy


def test_the_stand_in_is_what_the_backend_takes_for_cupy():
    import fake_cupy

    with fake_cupy.installed() as cupy:
        a = cupy.asarray(np.arange(6.0).reshape(2, 3))
        assert type(a).__module__ == "cupy" and backend.namespace(np.ones(2), a) is cupy
        assert backend.get_backend("cuda") is cupy and backend.device_of(cupy) == "cuda"
        host = backend.to_numpy(a)
        assert type(host) is np.ndarray
        host[0, 0] = 99.0  # a copy: the device array is unchanged
        np.testing.assert_array_equal(cupy.asnumpy(a), np.arange(6.0).reshape(2, 3))
        out = backend.scatter_add_rows(
            3, cupy.asarray(np.array([0, 2, 0])), cupy.asarray(np.array([[1.0], [2.0], [4.0]]))
        )
        assert type(out) is cupy.ndarray
        np.testing.assert_array_equal(out.get(), [[5.0], [0.0], [2.0]])


def test_the_stand_in_works_as_a_folder_on_the_path():
    """PYTHONPATH=tests/fake_cupy makes it `cupy` for a whole process (a subprocess, or a CI job)."""
    import os
    import subprocess
    import sys

    import fake_cupy

    code = (
        "import numpy as np, tinypeft as tp\n"
        "m = tp.GPT(tp.GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2), device='cuda')\n"
        "print(type(m(np.zeros((1, 4), int))).__module__)\n"
    )
    root = pathlib.Path(tp.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_cupy.FOLDER), str(root)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cupy"
