"""Golden vectors: what `tinypeft export-vectors` writes, that it is deterministic, that it covers every
method with informative numbers, that its loader refuses what is wrong with a clear message, and that
`tinypeft check-vectors` passes a correct implementation and fails a wrong one (exit status 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tinypeft.cli import main
from tinypeft.errors import CheckpointError, ConfigError
from tinypeft.methods import METHODS
from tinypeft.vectors import (
    CASE_NAME,
    EXPECTED_NAME,
    FLOAT32_TOLERANCES,
    INDEX_NAME,
    SPECS,
    TRAJECTORY_SPECS,
    WEIGHTS_NAME,
    check_vectors,
    compare,
    load_case,
    load_impl,
    load_vectors,
    run_case,
)
from tinypeft.vectors.generation import SPECS as GENERATION_SPECS
from tinypeft.vectors.roundtrip import CASES as ROUND_TRIP_CASES

ROOT = Path(__file__).resolve().parents[2]
# every label a registered method's golden cases carry (a method's variants, rsLoRA say, have labels of their own)
LABELS = {case.label for spec in METHODS.values() for case in spec.golden_cases}


def export_in_a_fresh_process(folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tinypeft.cli", "export-vectors", str(folder)]
    subprocess.run(command, check=True, env=env, capture_output=True, cwd=ROOT)


def test_the_same_command_writes_the_same_bytes(vectors, tmp_path):
    """Byte for byte, every file, written by this process and by another (safetensors writes a metadata map
    in an order that changes from process to process, so the files must not carry more than one key)."""
    first, second = vectors, tmp_path / "second"
    export_in_a_fresh_process(second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    index = json.loads((first / "index.json").read_text())
    assert len(index["trajectories"]) == 2 * len(TRAJECTORY_SPECS)
    # index.json, three files per case, two per trajectory, merge and generation (round trips store nothing)
    others = sum(len(index[key]) for key in ("trajectories", "merges", "generations"))
    assert len(files) == 1 + 3 * 2 * len(SPECS) + 2 * others
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_every_method_in_every_dtype_with_the_variants_a_port_gets_wrong(cases):
    assert {c.method for c in cases} == LABELS
    assert {(c.method, c.dtype) for c in cases} == {(m, d) for m in LABELS for d in ("float64", "float32")}
    for label in LABELS:
        mine = [c for c in cases if c.method == label]
        assert any(c.attention_mask is not None and not c.attention_mask.all() for c in mine), f"{label}: no padding"
        assert any(c.model_config["n_embd"] % 2 and c.model_config["vocab_size"] % 2 for c in mine), f"{label}: odd"
        configs = [c.method_config or {} for c in mine]
        if any("r" in cfg for cfg in configs):  # a rank: LoRA and its variants
            assert any(cfg["r"] == 1 for cfg in configs), f"{label}: no rank 1"
        if any("num_virtual_tokens" in cfg for cfg in configs):  # virtual tokens: prompt and prefix tuning
            filled = [
                c.method_config["num_virtual_tokens"] + c.input_ids.shape[1] == c.model_config["n_positions"]
                for c in mine
            ]
            assert any(filled), f"{label}: no case fills the position table"
    configs = [c.method_config for c in cases if c.method_config]
    prompt_inits = {cfg["prompt_tuning_init"] for cfg in configs if "prompt_tuning_init" in cfg}
    assert prompt_inits == {"RANDOM", "SAMPLE_VOCAB", "TEXT"}
    assert {cfg["prefix_projection"] for cfg in configs if "prefix_projection" in cfg} == {False, True}
    # a left-padded row whose last pad predicts its first token: the query there sees no key at all
    assert any(
        c.attention_mask is not None and c.attention_mask[:, 0].min() == 0 for c in cases if c.method_config is None
    )


def test_the_numbers_are_informative(cases):
    """Away from every init where a formula's term vanishes: LoRA's B != 0 (and VeRA's λ_b), DoRA's m differs from
    the norm it divides by (k != 1), IA3's vectors differ from 1, the adapters' up-projections from 0; no gradient
    is negligible next to the case's largest."""
    for case in cases:
        w = case.weights
        for name, value in w.items():
            if name.endswith(("lora_B.weight", "adapter_up.weight", "vera_lambda_b")):
                assert np.abs(value).min() > 0, name
            if name.endswith("ia3_l"):
                assert not np.allclose(value, 1), name
            if name.endswith("lora_magnitude_vector"):
                module = name.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
                assert not np.allclose(value, np.linalg.norm(w[module + ".weight"], axis=0), rtol=0.05), name
        norms = {name: np.linalg.norm(grad) for name, grad in case.grads.items()}
        for name, norm in norms.items():  # none is negligible next to the others (the smallest is ~0.05 of the largest)
            assert norm > 0.01 * max(norms.values()), (case.name, name)


def test_tinypeft_passes_its_own_vectors_with_room_to_spare(cases):
    """tinypeft in the case's dtype, through the same interface as a port: float64 reproduces the expected
    values exactly (the same computation), float32 stays ten times under every tolerance."""
    for case in cases:
        report = compare(case, run_case(case.port_input()))
        assert report.passed, (case.name, report.failure, [c for c in report.checks if not c.passed])
        assert all(c.passed is not None for c in report.checks), "every derived tensor is checked"
        for check in report.checks:
            limit = 1e-14 if case.dtype == "float64" else check.tolerance / 10
            assert check.error <= limit, (case.name, check)


def test_float32_cases_hold_float32_weights_and_exact_float64_expectations(cases):
    case = next(c for c in cases if c.name == "lora-odd-float32")
    twin = next(c for c in cases if c.name == "lora-odd-float64")
    assert all(v.dtype == np.float32 for v in case.weights.values())
    assert all(v.dtype == np.float64 for v in twin.weights.values())
    assert case.logits.dtype == np.float64
    # the same case rounded: the float32 weights are the float64 ones to float32 precision
    for name, value in case.weights.items():
        np.testing.assert_allclose(value, twin.weights[name], rtol=1e-6, atol=1e-7)
    assert case.tolerances["grads"]["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == 1e-4
    full = next(c for c in cases if c.name == "full-odd-float32")
    layernorm = {t for n, t in full.tolerances["grads"].items() if n.endswith("ln_1.weight")}
    assert layernorm == {FLOAT32_TOLERANCES["layernorm_weight"]}


# ------------------------------------------------------------------ check-vectors
def write_impl(tmp_path: Path, body: str) -> str:
    path = tmp_path / "impl.py"
    path.write_text("from tinypeft.vectors import run_case as reference\n\n" + body)
    return str(path)


def test_check_vectors_passes_tinypeft_and_reports_every_tensor(vectors, tmp_path, capsys):
    report = tmp_path / "report.json"
    command = ["check-vectors", str(vectors), "--impl", "tinypeft.vectors", "--cases", "lora-*", "-v"]
    code = main([*command, "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    # the cases, and every other kind that starts from them (tinypeft has every entry point)
    lora = sum(spec.name.startswith("lora-") for spec in SPECS)
    counts = {
        "cases": 2 * lora,
        "trajectories": 2 * sum(spec.case.startswith("lora-") for spec in TRAJECTORY_SPECS),
        "merges": 2 * lora,  # every LoRA case merges
        "generations": 2 * 2 * sum(spec.case.startswith("lora-") for spec in GENERATION_SPECS),  # cached or not
        "round_trips": 2 * sum(name.startswith("lora-") for name in ROUND_TRIP_CASES),
    }
    n = sum(counts.values())
    assert f"{n} cases: {n} passed, 0 failed" in out
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight" in out
    cases = json.loads(report.read_text())["cases"]
    assert Counter(c["kind"] for c in cases) == counts and all(c["passed"] for c in cases)
    assert all(t["error"] <= t["tolerance"] for c in cases for t in c["tensors"])


def test_a_gradient_wrong_by_a_millionth_fails_float64_and_the_exit_status_says_so(vectors, tmp_path, capsys):
    impl = write_impl(
        tmp_path,
        """
def run_case(case):
    result = reference(case)
    name = sorted(result["grads"])[0]
    result["grads"][name] = result["grads"][name] * (1 + 1e-6)
    return result
""",
    )
    code = main(["check-vectors", str(vectors), "--impl", impl, "--cases", "ia3-odd-*", "ia3-padded-*"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "ia3-odd-float64" in out and "FAIL" in out and "FAILED" in out
    assert "4 cases: 2 passed, 2 failed" in out  # below float32's tolerances: only float64 can see it
    # status 1 says why on stderr, in one line, as every command's non-zero status does (found by the CLI fuzz)
    assert err == "tinypeft check-vectors: 2 of 4 cases failed: ia3-odd-float64, ia3-padded-float64\n"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("    r = reference(case); r['grads'].popitem(); return r", "gradient missing"),
        ("    r = reference(case); r['grads']['transformer.wte.weight'] = 0.0; return r", "does not train"),
        ("    r = reference(case); r['logits'] = r['logits'][:, 1:]; return r", "shape"),
        ("    r = reference(case); r['logits'] = r['logits'] * float('nan'); return r", "logits: inf"),
        ("    raise RuntimeError('not ported yet')", "run_case raised RuntimeError: not ported yet"),
        ("    return [1, 2]", "run_case must return a dict"),
        ("    r = reference(case); r['derived'] = {'x': r['logits']}; return r", "not a derived tensor"),
        # issue: check-vectors trusts the port. Whatever a port does instead of returning fails its case
        ("    import sys; sys.exit(0)", "run_case called sys.exit(0) instead of returning"),
        ("    raise SystemExit('done')", "run_case called sys.exit('done') instead of returning"),
        ("    r = reference(case); r['loss'] = Unconvertible(); return r", "loss: inf / 1e-10 FAILED (not an array: "
         "raised RuntimeError: Can't call numpy() on Tensor that requires grad"),
        ("    r = reference(case); r['derived'] = r['logits']; return r", "reading what run_case returned raised "
         "ValueError: The truth value of an array"),
        ("    return ExitingDict(reference(case))", "reading what run_case returned called sys.exit(3)"),
        ("    raise Unprintable()", "run_case raised Unprintable: <unprintable: RuntimeError>"),
        ("    raise ValueError('two\\nlines')", "run_case raised ValueError: two lines"),
    ],
)  # fmt: skip
def test_what_a_broken_implementation_is_told(vectors, tmp_path, capsys, body, fragment):
    impl = write_impl(tmp_path, HOSTILE_OBJECTS + "def run_case(case):\n" + body + "\n")
    assert main(["check-vectors", str(vectors), "--impl", impl, "--cases", "lora-rank1-float64"]) == 1
    out = capsys.readouterr().out
    assert fragment in out and "1 cases: 0 passed, 1 failed" in out


# what a port may hand back that breaks when it is read (the first as a torch tensor that requires grad does)
HOSTILE_OBJECTS = """
class Unconvertible:
    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")


class ExitingDict(dict):
    def __getitem__(self, key):
        raise SystemExit(3)


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no")


"""


def test_a_torch_tensor_that_requires_grad_fails_its_case_and_the_others_run(vectors, tmp_path, capsys):
    """A port returning the loss as a torch tensor that needs grad: np.asarray raises RuntimeError, which once
    aborted every case with a traceback."""
    pytest.importorskip("torch")
    body = """
import torch

def run_case(case):
    result = reference(case)
    if case["dtype"] == "float64":
        result["loss"] = torch.tensor(float(result["loss"]), requires_grad=True)
    return result
"""
    assert main(["check-vectors", str(vectors), "--impl", write_impl(tmp_path, body), "--cases", "lora-rank1-*"]) == 1
    out = capsys.readouterr().out
    assert (
        "loss: inf / 1e-10 FAILED (not an array: raised RuntimeError: Can't call numpy() on Tensor that requires grad"
        in out
    )
    assert "2 cases: 1 passed, 1 failed" in out


def test_a_port_that_exits_or_is_interrupted_never_reads_as_a_pass(vectors, tmp_path, capsys):
    """sys.exit(0) in run_case once ended check-vectors with status 0 and no output, which CI reads as a pass:
    it fails its case, and the status is 1. sys.exit at import is a one-line error (status 2). Ctrl-C (a
    KeyboardInterrupt) still stops the whole check, with status 130."""
    case = ["--cases", "lora-rank1-float64"]
    exits = write_impl(tmp_path, "def run_case(case):\n    raise SystemExit(0)\n")
    assert main(["check-vectors", str(vectors), "--impl", exits, *case]) == 1
    assert "run_case called sys.exit(0) instead of returning" in capsys.readouterr().out
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    assert main(["check-vectors", str(vectors), "--impl", str(tmp_path / "exits_at_import.py"), *case]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "importing it called sys.exit(0) instead of returning" in err
    (tmp_path / "interrupted.py").write_text("def run_case(case):\n    raise KeyboardInterrupt\n")
    assert main(["check-vectors", str(vectors), "--impl", str(tmp_path / "interrupted.py"), *case]) == 130
    assert capsys.readouterr().err == "tinypeft check-vectors: interrupted\n"


def test_impl_that_cannot_be_used_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_impl(str(tmp_path / "missing.py"))
    (tmp_path / "norun.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"no function run_case\(case\)"):
        load_impl(str(tmp_path / "norun.py"))
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="importing it raised ModuleNotFoundError"):
        load_impl(str(tmp_path / "broken.py"))
    assert load_impl("tinypeft.vectors") is run_case


def test_check_vectors_on_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["check-vectors", str(tmp_path / "nope"), "--impl", "tinypeft.vectors"]) == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ the loader
def damaged_copy(vectors: Path, tmp_path: Path, case: str = "dora-odd-float32") -> Path:
    folder = tmp_path / "copy" / case
    folder.mkdir(parents=True)
    for name in (CASE_NAME, WEIGHTS_NAME, EXPECTED_NAME):
        (folder / name).write_bytes((vectors / case / name).read_bytes())
    return folder


def edit_json(folder: Path, change) -> None:
    doc = json.loads((folder / CASE_NAME).read_text())
    change(doc)
    (folder / CASE_NAME).write_text(json.dumps(doc))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: edit_json(f, lambda d: d.update(version=2)), "this tinypeft reads version 1"),
        (lambda f: edit_json(f, lambda d: d.update(dtype="float16")), "golden vectors come in"),
        (lambda f: edit_json(f, lambda d: d["model_config"].update(n_head=2)), "impossible model"),
        (lambda f: edit_json(f, lambda d: d["model_config"].pop("n_inner")), "exactly the keys"),
        (lambda f: edit_json(f, lambda d: d["method_config"].update(r=0)), "LoraConfig.r must be a positive"),
        (lambda f: edit_json(f, lambda d: d["trainable"].append("nope")), "'nope' is not in weights.safetensors"),
        (lambda f: edit_json(f, lambda d: d["inputs"]["input_ids"][0].append(1)), "rows of equal length"),
        (lambda f: edit_json(f, lambda d: d["inputs"]["input_ids"][0].__setitem__(0, 19)), "token id 19"),
        (lambda f: edit_json(f, lambda d: d["inputs"].update(labels=[[True]])), "holding integers"),
        (lambda f: edit_json(f, lambda d: d["expected"].update(loss=float("nan"))), "finite non-zero"),
        (lambda f: edit_json(f, lambda d: d["tolerance"].update(logits=0)), "a number in (0, 1)"),
        (lambda f: edit_json(f, lambda d: d["tolerance"]["grads"].popitem()), "one entry per tensor"),
        (lambda f: (f / WEIGHTS_NAME).unlink(), "weights.safetensors does not exist"),
        (lambda f: edit_tensors(f / WEIGHTS_NAME, lambda t: t.pop("transformer.wpe.weight")), "lacks the base"),
        (lambda f: edit_tensors(f / WEIGHTS_NAME, lambda t: t.update({"transformer.h.2.ln_1.bias": np.ones(3)})),
         "holds 3 blocks"),
        (lambda f: edit_tensors(f / WEIGHTS_NAME, lambda t: t.update(
            {"transformer.ln_f.bias": t["transformer.ln_f.bias"].astype(np.float64)})), "this is a float32 case"),
        (lambda f: edit_tensors(f / WEIGHTS_NAME, lambda t: t["transformer.ln_f.bias"].__setitem__(0, np.inf)),
         "non-finite"),
        (lambda f: edit_tensors(f / EXPECTED_NAME, lambda t: t.update(logits=t["logits"][:, :3])), "logits have shape"),
        (lambda f: edit_tensors(f / EXPECTED_NAME, lambda t: t.update(extra=np.ones(2))), "unexpected ['extra']"),
        (lambda f: edit_tensors(f / EXPECTED_NAME, lambda t: t.update(logits=t["logits"].astype(np.float32))),
         "expected values are float64"),
    ],
)  # fmt: skip
def test_the_loader_refuses_a_damaged_case_and_says_what_is_wrong(vectors, tmp_path, damage, fragment):
    folder = damaged_copy(vectors, tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError) as caught:
        load_case(folder)
    assert fragment in str(caught.value)


def test_the_index_must_list_existing_plain_case_folders(vectors, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    index = json.loads((vectors / INDEX_NAME).read_text())
    for cases, fragment in (
        (["../lora-odd-float64"], "not a plain folder name"),
        ([], "non-empty list"),
        (["lora-odd-float64"] * 2, "twice"),
        (["missing"], "missing/case.json does not exist"),
    ):
        (folder / INDEX_NAME).write_text(json.dumps({**index, "cases": cases}))
        with pytest.raises(CheckpointError, match=fragment):
            load_vectors(folder)  # fmt: skip
    with pytest.raises(ConfigError, match="no case of"):
        check_vectors(vectors, run_case, ["nothing-*"])


# ------------------------------------------------------------------ dtypes
# issue 17: a JAX port computing a float32 case partly in float64 passed, because the checker converted whatever
# it got to float64. A case's arrays come back in its dtype; the loss may be a Python float (the port's own
# float(loss)), or a 0-d array of the case's dtype.
PARTLY_FLOAT64 = """
import numpy as np


def run_case(case):
    result = reference(case)
    # s = alpha / np.sqrt(r) is a NumPy float64 scalar: under NEP 50 it promotes the float32 array it meets
    result["logits"] = result["logits"] * np.sqrt(1.0)
    return result
"""
ALL_FLOAT64 = """
import numpy as np


def run_case(case):
    # the float32 case computed in float64 throughout: closer to the expected values, and still wrong
    case = {**case, "dtype": "float64", "weights": {k: v.astype(np.float64) for k, v in case["weights"].items()}}
    result = reference(case)
    result["loss"] = np.float64(result["loss"])
    return result
"""


def test_a_float32_case_computed_partly_in_float64_fails_and_says_which_array(vectors, tmp_path, capsys):
    impl = write_impl(tmp_path, PARTLY_FLOAT64)
    assert main(["check-vectors", str(vectors), "--impl", impl, "--cases", "lora-odd-*"]) == 1
    out, err = capsys.readouterr()
    assert "2 cases: 1 passed, 1 failed" in out  # the float64 case is float64 throughout
    assert "logits is float64; a float32 case needs float32 arrays back" in out
    assert err == "tinypeft check-vectors: 1 of 2 cases failed: lora-odd-float32\n"


def test_a_float32_case_computed_in_float64_fails_every_array_though_its_values_are_closer(cases):
    case = next(c for c in cases if c.name == "pissa-odd-float32")  # logits, grads, and derived tensors
    namespace: dict = {}
    exec("from tinypeft.vectors import run_case as reference\n" + ALL_FLOAT64, namespace)
    report = compare(case, namespace["run_case"](case.port_input()))
    assert not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert {c.tensor for c in failed} == {c.tensor for c in report.checks}, "loss, logits, every grad and derived"
    assert all(c.error <= c.tolerance for c in failed), "the values pass: only the dtype fails them"
    assert {c.note.split(" is ")[1] for c in failed} == {"float64; a float32 case needs float32 arrays back"}
    assert any(c.tensor.startswith("derived ") for c in failed)


def test_a_float64_case_answered_in_float32_fails(cases):
    case = next(c for c in cases if c.name == "lora-rank1-float64")
    result = run_case(case.port_input())
    name = sorted(result["grads"])[0]
    result["grads"][name] = result["grads"][name].astype(np.float32)
    report = compare(case, result)
    assert not report.passed
    notes = [c.note for c in report.checks if not c.passed]
    assert notes == [f"{name} is float32; a float64 case needs float64 arrays back"]


@pytest.mark.parametrize(
    ("loss", "passes"),
    [
        (lambda x: x, True),  # a Python float
        (lambda x: np.float32(x), True),
        (lambda x: np.array(x, dtype=np.float32), True),  # 0-d
        (lambda x: np.float64(x), False),  # a NumPy float64 scalar: what a promoted computation gives
        (lambda x: np.array(x), False),
        (lambda x: np.array(x, dtype=np.float16), False),
        (lambda x: "1.5", False),
    ],
)
def test_the_loss_of_a_float32_case_is_a_python_float_or_float32(cases, loss, passes):
    case = next(c for c in cases if c.name == "lora-rank1-float32")
    result = run_case(case.port_input())
    result["loss"] = loss(result["loss"])
    report = compare(case, result)
    assert report.passed is passes, report.checks[0]
    if not passes:
        assert [c.tensor for c in report.checks if not c.passed] == ["loss"]


def test_the_loss_as_a_torch_scalar_of_the_case_dtype_passes(cases):
    torch = pytest.importorskip("torch")
    for name in ("lora-rank1-float32", "lora-rank1-float64"):
        case = next(c for c in cases if c.name == name)
        result = run_case(case.port_input())
        dtype = {"float32": torch.float32, "float64": torch.float64}[case.dtype]
        result["loss"] = torch.tensor(result["loss"], dtype=dtype)
        result["logits"] = torch.from_numpy(result["logits"])
        assert compare(case, result).passed, name


def test_tinypeft_and_the_torch_port_return_the_case_dtype(cases):
    """What the two implementations return, read directly (compare() fails them otherwise): every array in
    the case's dtype, the loss a Python float."""
    pytest.importorskip("torch")
    port = load_impl(str(ROOT / "examples" / "port_torch" / "port.py"))
    for case in cases:
        if case.dtype != "float32" or not (case.derived or case.name.startswith(("full-odd", "dora-odd"))):
            continue
        for impl in (run_case, port):
            result = impl(case.port_input())
            arrays = [result["logits"], *result["grads"].values(), *result["derived"].values()]
            assert {a.dtype for a in arrays} == {np.dtype(np.float32)}, case.name
            assert type(result["loss"]) is float
