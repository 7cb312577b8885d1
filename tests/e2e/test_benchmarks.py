"""The benchmark command runs end to end on tiny settings (a smoke run: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) >= {"steps", "autograd", "memory", "gflops", "scaling", "long", "floor", "profile", "machine"}
    assert set(results["scaling"]) == {"seq_len", "n_embd", "rank", "batch_size"}
    assert (tmp_path / "growth.png").stat().st_size > 0  # the cost-growth plot, beside the JSON
    long = results["long"]["rows"]
    assert set(long) == {"tinypeft lora", "tinypeft lora (reference attention)", "torch+peft lora"}
    assert all(row["rss_over_built_mib"] >= 0 for row in long.values())
    assert long["tinypeft lora"]["tracemalloc_over_built_mib"] > 0
    groups = results["profile"]["groups_s"]
    assert {"linear layers (x W, dy Wᵀ, xᵀ dy)", "attention", "GELU", "LayerNorm", "AdamW"} <= set(groups)
    floor = results["floor"]["tiny"]
    assert len(floor["products"]) == 15 and floor["numpy_s"] > 0 and floor["torch_s"] > 0
    assert results["autograd"]["speedup_range"][0] <= results["autograd"]["speedup"]
    row = results["steps"]["tiny"]["median_s"]
    expected = {
        "tinypeft full",
        "torch full",
        "tinypeft lora",
        "torch+peft lora",
        "tinypeft prompt",
        "torch+peft prompt",
        "tinypeft prefix",
        "torch+peft prefix",
    }
    assert set(row) == expected
    assert all(t is not None and t > 0 for t in row.values()), row
    assert results["autograd"]["speedup"] > 0
    assert "| tinypeft full |" in done.stdout


def test_reading_path_counts_the_reference_step():
    """The figure docs/index.md gives for reading one LoRA step comes from this command."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.reading_path"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    assert ", 6 files (" in first, first
    files = [line.split(")")[1].split()[0] for line in done.stdout.splitlines()[1:]]
    assert {"tinypeft/ops.py", "tinypeft/gpt.py", "tinypeft/methods/lora.py"} <= set(files)
    assert not {"tinypeft/engine.py", "tinypeft/checks.py", "tinypeft/runtime.py"} & set(files)  # no plumbing


@pytest.mark.slow
def test_the_gpt2_124m_section_smoke_run(tmp_path):
    """`--sections gpt2_124m` (README's 124M figures) runs, here at a tiny shape: both contenders time
    their steps and report their peak memory above the library they import."""
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--threads",
        "1",
        "--sections",
        "gpt2_124m",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    section = json.loads(out.read_text())["gpt2_124m"]
    assert set(section["raw"]) == {"tinypeft lora", "torch+peft lora"}
    for label, row in section["raw"].items():
        assert row["median_s"] > 0, label
        assert row["memory"]["peak_kib"] >= row["memory"]["built_kib"] > row["memory"]["library_kib"] > 0, label
    assert set(section["ratios"]) == {"step: tinypeft / torch+peft", "peak memory: tinypeft / torch+peft"}


def test_the_fitted_exponent_of_a_power_law_is_its_power():
    from benchmarks.growth import exponents, fit_exponent

    assert fit_exponent({32: 2.0 * 32**1.5, 64: 2.0 * 64**1.5, 512: 2.0 * 512**1.5}) == pytest.approx(1.5)
    assert fit_exponent({32: 1.0}) is None
    scaling = {"seq_len": {32: {"tinypeft lora": 1.0, "torch+peft lora": 2.0}, 64: {"tinypeft lora": 4.0}}}
    assert exponents(scaling) == {"seq_len": {"tinypeft lora": pytest.approx(2.0), "torch+peft lora": None}}


def test_ab_times_two_trees_in_alternating_processes(tmp_path):
    """`python -m benchmarks.ab` runs its worker from each tree given (here the same one twice) and reports
    both medians and their ratio; a folder without tinypeft/ is refused with a message, not a traceback."""
    tiny = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--seq_len", "8", "--batch_size", "2"]
    cmd = [sys.executable, "-m", "benchmarks.ab", ".", ".", "--method", "loha", "--rounds", "1", "--steps", "2", *tiny]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loha (n_layer 1, n_embd 16" in done.stdout and "2 steps each" in done.stdout
    assert "after / before" in done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", str(tmp_path), ".", *tiny], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "holds no tinypeft/ package" in refused.stderr and "Traceback" not in refused.stderr
