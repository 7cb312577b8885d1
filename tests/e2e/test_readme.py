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
