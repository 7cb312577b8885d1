"""The README's Python blocks run as a user runs them: in order, in one fresh folder, in one process
(a later block uses what an earlier one made)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it from Python") : text.index("## Pretraining a base model")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 4
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable params:" in done.stdout and "tokens/s" in done.stdout
    for made in ("run/checkpoints/latest.json", "adapter/adapter_config.json", "merged/model.safetensors"):
        assert (tmp_path / made).is_file(), made


def test_the_readme_s_two_base_losses_are_the_shipped_base_s_on_32_and_64_windows():
    """The README shows the base's loss twice, 2.218/1.165 in `tinypeft finetune`'s output and
    2.158/1.238 beside the experiments, and says why: 32 validation windows against 64. Both are what
    the shipped base scores on those windows."""
    import tinypeft as tp

    text = (ROOT / "README.md").read_text()
    before = re.search(r"^before +([\d.]+) nats +[\d.]+ bpb +([\d.]+) nats", text, flags=re.M)
    experiments = re.search(r"\(base: ([\d.]+) nats per byte on code, ([\d.]+) on prose; the experiments", text)
    assert "32 validation windows" in text and "64 validation windows" in text
    base = tp.GPT.from_pretrained(tp.SHIPPED_BASE)
    code, prose = tp.load_corpus("code"), tp.load_corpus("prose")
    for match, windows, digits in ((before, 32, 4), (experiments, 64, 3)):
        measured = [round(tp.evaluate(base, corpus.val, 128, windows), digits) for corpus in (code, prose)]
        assert [float(match.group(1)), float(match.group(2))] == measured, windows
