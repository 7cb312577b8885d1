"""examples/merge_precision.py run as a user runs it (`--quick`): it writes its JSON and PNG, and the numbers
mean what they say: float32 storage costs rounding only, float16 more, bfloat16 most; a merge loses more of a
small update than of a large one; PEFT's merge/unmerge cycles drift and tinypeft's do not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_merge_precision_quick(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "examples/merge_precision.py", "--quick", "--no_progress", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "merge_precision.png").read_bytes()[:8] == PNG_MAGIC
    results = json.loads((tmp_path / "merge_precision.json").read_text())
    assert results["experiment"] == "merge_precision" and results["settings"]["steps"] == 3
    assert [row["label"] for row in results["adapters"]] == [
        "LoRA r=1",
        "LoRA r=8",
        "LoRA r=64",
        "DoRA r=8",
        "IA3",
        "VeRA r=256",
    ]
    for row in results["adapters"] + results["scales"]:
        d = row["dtypes"]
        assert d["float32"]["unmerged_logits_error"] < 1e-5 and d["float32"]["merged_logits_error"] < 1e-5
        assert d["float32"]["unmerged_logits_error"] < d["float16"]["unmerged_logits_error"]
        assert d["float16"]["unmerged_logits_error"] < d["bfloat16"]["unmerged_logits_error"] < 1e-2
        assert d["float16"]["update_error_merged"] < d["bfloat16"]["update_error_merged"]
    lost = [row["dtypes"]["bfloat16"]["update_error_merged"] for row in results["scales"]]
    assert lost == sorted(lost, reverse=True)  # the smaller the update against W, the more a merge rounds away
    for dtype, drift in results["drift"].items():
        assert drift["tinypeft_restored_exactly"] is True
        if dtype != "float32":
            assert drift["peft"][0]["weight_drift"] > 1e-6, dtype
