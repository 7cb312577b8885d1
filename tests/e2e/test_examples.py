"""The experiment scripts in examples/, run as a user runs them (`python examples/NAME.py --quick`) on
the shipped base: each writes its JSON and PNG, and the numbers in the JSON mean what they say."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tinypeft.methods import prefix as prefix_module

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_quick(name: str, out: Path) -> dict:
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        # two test workers share two cores: BLAS threads of one would wait on the other's (stalls of
        # a second per step), while one thread each runs these tiny steps in milliseconds
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--quick", "--no_progress", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    results = json.loads((out / f"{name}.json").read_text())
    assert results["experiment"] == name and results["command"].startswith(f"python examples/{name}.py --quick")
    assert results["settings"]["steps"] == 3 and results["blas_threads"]["OPENBLAS_NUM_THREADS"] == "1"
    for run in results["runs"]:
        assert run["status"] == "ok", run["status"]
        assert run["evals"][0]["step"] == 0 and run["evals"][-1]["step"] == 3
        assert run["task_before"] == results["base_losses"]["task"]
        assert math.isclose(run["task_gain"], run["task_before"] - run["task_after"])
        assert math.isclose(run["prose_forgetting"], run["prose_after"] - run["prose_before"])
        assert run["median_step_seconds"] > 0
    return results


def by(results: dict, key: str) -> dict:
    return {run[key]: run for run in results["runs"]}


def test_rank_sweep(tmp_path):
    results = run_quick("rank_sweep", tmp_path)
    runs = by(results, "rank")
    assert sorted(runs) == [1, 2, 4, 8, 16, 32, 64]
    for r, run in runs.items():
        # LoRA on c_attn: A (r, 128) and B (384, r) in each of the 4 blocks
        assert run["trainable_parameters"] == 4 * r * (128 + 3 * 128)
        assert run["method_config"]["r"] == r and run["method_config"]["lora_alpha"] == 2 * r
    assert results["smallest_rank_near_best"] in runs

    # --replot draws the figure again from the JSON alone
    png = tmp_path / "rank_sweep.png"
    png.unlink()
    done = subprocess.run(
        [sys.executable, "examples/rank_sweep.py", "--replot", "--out", str(tmp_path)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_forgetting(tmp_path):
    results = run_quick("forgetting", tmp_path)
    runs = by(results, "method")
    assert sorted(runs) == [
        "adalora",
        "adapter",
        "bitfit",
        "boft",
        "full",
        "ia3",
        "loha",
        "lokr",
        "lora",
        "oft",
        "prompt",
        "ptuning",
        "trainable_tokens",
        "vera",
    ]
    assert runs["full"]["trainable_parameters"] == results["base_parameters"]
    assert runs["trainable_tokens"]["trainable_parameters"] == 15 * 128
    assert runs["prompt"]["trainable_parameters"] == 20 * 128
    assert runs["lora"]["trainable_parameters"] == 16_384
    assert runs["vera"]["trainable_parameters"] == 4 * (256 + 384)  # λ_d and λ_b of each c_attn; A, B frozen
    # full fine-tuning keeps a gradient and two AdamW moments for every weight; the others for a few
    peaks = {method: run["peak_memory_bytes"] for method, run in runs.items()}
    assert max(peaks, key=peaks.get) == "full"
    assert peaks["full"] > 4 * results["base_parameters"] * 3  # weights + gradient + 2 moments, float32
    assert [e["step"] for e in runs["lora"]["evals"]] == [0, 2, 3]  # eval_every 2 under --quick


def test_prompt_length(tmp_path):
    results = run_quick("prompt_length", tmp_path)
    runs = {(run["init"], run["num_virtual_tokens"]): run for run in results["runs"]}
    assert sorted(runs) == [(init, nv) for init in ("RANDOM", "SAMPLE_VOCAB") for nv in (1, 5, 20, 50, 100)]
    for (init, nv), run in runs.items():
        assert run["trainable_parameters"] == nv * 128
        assert run["method_config"]["prompt_tuning_init"] == init


def test_lr_sweep(tmp_path):
    results = run_quick("lr_sweep", tmp_path)
    rates = sorted({run["lr"] for run in results["runs"]})
    assert rates == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert sorted({run["method"] for run in results["runs"]}) == ["full", "lora"]
    for method, summary in results["summary"].items():
        runs = [run for run in results["runs"] if run["method"] == method]
        assert summary["best_task_loss"] == min(run["task_after"] for run in runs)
        assert summary["best_lr"] in summary["good_rates"]


def test_prefix_sweep(tmp_path):
    results = run_quick("prefix_sweep", tmp_path)
    groups = {  # group: (prefix_init, prefix_projection, learning rates)
        "RANDOM, table": ("RANDOM", False, [3e-3, 1e-2, 3e-2]),
        "RANDOM, projection": ("RANDOM", True, [1e-3, 3e-3, 1e-2, 3e-2]),
        "TEXT, table": ("TEXT", False, [3e-3, 1e-2, 3e-2, 1e-1]),
        "TEXT, projection": ("TEXT", True, [1e-3, 3e-3, 1e-2, 3e-2]),
    }
    prefix = [run for run in results["runs"] if run["method"] == "prefix"]
    grid = [run for run in prefix if run["seed"] == 0 and "text" not in run]
    assert sorted((run["group"], run["lr"]) for run in grid) == sorted(
        (group, lr) for group, (_, _, rates) in groups.items() for lr in rates
    )
    for run in prefix:
        init, projection, _ = groups[run["group"]]
        config = run["method_config"]
        assert (config.get("prefix_init", "RANDOM"), config["prefix_projection"]) == (init, projection)
        # the table (NV, 2 L C) = (20, 2 * 4 * 128); or embedding (20, 128), Linear(128, 128), Linear(128, 1024)
        assert run["trainable_parameters"] == (20 * 128 + 129 * 128 + 129 * 1024 if projection else 20 * 1024)
        if init == "TEXT":
            assert config["prefix_init_text"] == run.get("text", prefix_module.DEFAULT_INIT_TEXT)
    # seed 1: the old default (RANDOM table at 1e-2) and the best setting again
    again = {(run["group"], run["lr"]) for run in prefix if run["seed"] == 1}
    assert ("RANDOM, table", 1e-2) in again and 1 <= len(again) <= 2
    assert [run["lr"] for run in prefix if "text" in run] == [results["best_lr_per_setting"]["TEXT, table"]]
    prompt = [run for run in results["runs"] if run["method"] == "prompt"]
    assert [run["lr"] for run in prompt] == [1e-2, 3e-2, 1e-1]
    assert all(run["method_config"]["prompt_tuning_init"] == "RANDOM" for run in prompt)


def test_own_method_check(tmp_path):
    """examples/own_method/check.py, the script of docs/write_a_method.md, run as a user runs it (from any
    directory): the harness passes the toy method on every default case and prints each tensor's errors."""
    from tinypeft.harness import DEFAULT_CASES

    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_method" / "check.py")],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("method ssf: ok")
    for case in DEFAULT_CASES:
        assert f"case {case.name}: loss_and_grad" in done.stdout
    assert "base_model.model.transformer.h.0.attn.c_attn.ssf_scale" in done.stdout
    assert "FAILED" not in done.stdout and done.stdout.rstrip().endswith("merged = unmerged")


def test_frontiers(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import frontiers
    finally:
        sys.path.remove(str(ROOT / "examples"))
    # the least forgetting at each gain or more: the front along a rising grid of gains
    assert frontiers.envelope([0.3, None, 0.1, 0.2, None]) == [0.1, 0.1, 0.1, 0.2, None]
    results = run_quick("frontiers", tmp_path)
    assert results["seeds"] == [0, 1]
    grid = sorted((run["label"], run["lr"], run["seed"]) for run in results["runs"])
    assert grid == sorted(
        (label, lr, seed) for label, (_, _, rates) in frontiers.METHODS.items() for lr in rates for seed in (0, 1)
    )
    params = {run["label"]: run["trainable_parameters"] for run in results["runs"]}
    assert params["full fine-tuning"] == results["base_parameters"]
    # LoRA on c_attn (128 -> 384), attn.c_proj (128 -> 128), mlp.c_fc (128 -> 512), mlp.c_proj (512 -> 128) of 4 blocks
    assert params["LoRA r=8"] == 4 * 8 * (512 + 256 + 640 + 640) and params["LoRA r=64"] == 8 * params["LoRA r=8"]
    assert params["DoRA r=8"] == params["LoRA r=8"] + 4 * (384 + 128 + 512 + 128)  # a magnitude per output
    # the analysis in the JSON is what the runs in it give
    again = frontiers.analyse(results["runs"], results["base_losses"], results["seeds"])
    assert json.loads(json.dumps(again)) == {key: results[key] for key in again}
    for label, per_seed in results["fronts"].items():
        for seed, front in per_seed.items():
            points = [
                (e["task"], e["prose"])
                for run in results["runs"]
                if run["label"] == label and run["seed"] == int(seed)
                for e in run["evals"]
            ]
            assert front and all(tuple(p) in points for p in front)
            for task, prose in front:  # nothing measured beats a point of the front on both losses
                assert not any(t <= task and p <= prose and (t, p) != (task, prose) for t, p in points)
    # ΔW: a rank-r LoRA update needs at most r directions; full fine-tuning's at most min(in, out)
    for run in results["runs"]:
        bound = {"LoRA r=8": 8, "LoRA r=64": 64, "full fine-tuning": 128}.get(run["label"])
        if bound is None:
            assert "update_rank90" not in run
            continue
        assert len(run["update_rank90"]) == 16 and all(1 <= k <= bound for k in run["update_rank90"].values())
        assert ("update_singular_values" in run) == (run["seed"] == 0)
        if run["seed"] == 0 and run["label"] == "LoRA r=8":
            assert all(len(values) <= 8 for values in run["update_singular_values"].values())
    for label, per_lr in results["ranks"].items():
        for lr, row in per_lr.items():
            runs = [run for run in results["runs"] if run["label"] == label and run["lr"] == float(lr)]
            name = "transformer.h.3.mlp.c_fc.weight"
            assert row["rank90"][name]["mean"] == sum(run["update_rank90"][name] for run in runs) / len(runs)

    # --replot re-analyses the JSON's runs and draws both figures again from them
    for png in ("frontiers.png", "frontiers_spectra.png"):
        (tmp_path / png).unlink()
    done = subprocess.run(
        [sys.executable, "examples/frontiers.py", "--replot", "--out", str(tmp_path)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for png in ("frontiers.png", "frontiers_spectra.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


def test_frontiers_page_matches_its_json():
    """docs/frontiers.md holds the tables examples/frontiers.py makes from the committed JSON, verbatim;
    every three-decimal number in its text and in the README's row is a number of those tables; the JSON's
    analysis is what its runs give."""
    import re

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import frontiers
    finally:
        sys.path.remove(str(ROOT / "examples"))
    results = json.loads((ROOT / "docs" / "experiments" / "frontiers.json").read_text())
    page = (ROOT / "docs" / "frontiers.md").read_text()
    again = frontiers.analyse(results["runs"], results["base_losses"], results["seeds"])
    assert json.loads(json.dumps(again)) == {key: results[key] for key in again}
    tables = frontiers.tables(results)
    for name, table in tables.items():
        assert table in page, f"docs/frontiers.md: the {name} table is not the JSON's"
    assert f"`{results['command']}`" in page and f"took {results['run_minutes']:.0f} minutes" in page
    for png in ("frontiers.png", "frontiers_spectra.png"):
        assert f"(experiments/{png})" in page and (ROOT / "docs" / "experiments" / png).is_file()
    numbers = set(re.findall(r"[+-]?\d\.\d{3}\b", "\n".join(tables.values())))
    numbers |= {n.lstrip("+-") for n in numbers} | {f"{v:.3f}" for v in results["base_losses"].values()}
    text = page
    for table in tables.values():
        text = text.replace(table, "")
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| frontiers |"))
    for where, words in (("docs/frontiers.md", text), ("README.md", row)):
        for number in re.findall(r"[+-]?\d\.\d{3}\b", words):
            assert number in numbers or number.lstrip("+-") in numbers, f"{where}: {number} is not in the JSON's tables"
