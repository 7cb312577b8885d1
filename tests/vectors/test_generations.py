"""Generation vectors (issue 17): greedy tokens and each step's logits, with and without the KV cache, for the base
model, LoRA, prompt tuning and prefix tuning. tinypeft passes its own both ways, the torch port passes them through
check-vectors, each one-line break of the port's cache fails the cached generations it serves and no uncached one,
a port's wrong token is pointed at, and the loader refuses a damaged generation."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from port_mutations import GENERATION_MUTATIONS, PORT, broken_port

from tinypeft.cli import main
from tinypeft.errors import CheckpointError
from tinypeft.vectors import check_generations, generate_case, load_entry_points, load_generations


@pytest.fixture(scope="module")
def generations(vectors, cases):
    return load_generations(vectors, cases)


def test_the_generations_cover_the_base_lora_prompt_and_prefix_tuning(generations):
    assert {g.case.method for g in generations} == {"full", "lora", "prompt_tuning", "prefix_tuning"}
    assert len(generations) == 8
    for g in generations:  # the prompt continues, and not with one token repeated
        assert g.tokens.shape == (g.case.input_ids.shape[0], g.prompt_length + g.new_tokens)
        assert len(set(g.tokens[:, g.prompt_length :].ravel().tolist())) > 1, g.name


def test_tinypeft_passes_its_own_generations_with_and_without_its_cache(generations):
    for report in check_generations(generations, generate_case):
        assert report.passed, (report.name, report.failure, report.checks)
        for check in report.checks:
            assert check.error <= (1e-14 if report.dtype == "float64" else check.tolerance / 10), report


def test_the_port_passes_every_generation_with_and_without_its_cache(generations, vectors, capsys):
    for report in check_generations(generations, load_entry_points(str(PORT))["generate_case"]):
        assert report.passed, (report.name, report.failure, report.checks)
    assert main(["check-vectors", str(vectors), "--impl", str(PORT), "--cases", "prompt_tuning-random-*"]) == 0
    out = capsys.readouterr().out
    assert "prompt_tuning-random-generate-float32 cached" in out and re.search(r"\ngenerations +4 +4  ", out), out


def test_a_wrong_token_is_pointed_at(generations):
    g = next(g for g in generations if g.name == "lora-odd-generate-float64")
    result = generate_case(g.port_input(), True)
    result["tokens"][1, -1] = (result["tokens"][1, -1] + 1) % g.case.model_config["vocab_size"]
    report = check_generations([g], lambda given, use_cache: result)[1]
    position = g.prompt_length + g.new_tokens - 1
    assert [c.note for c in report.checks if not c.passed] == [
        f"row 1 differs first at position {position}: {result['tokens'][1, -1]}, expected {g.tokens[1, -1]}"
    ]


@pytest.mark.parametrize("name", GENERATION_MUTATIONS)
def test_breaking_the_cache_fails_the_cached_generations_it_serves(name, generations, tmp_path):
    mutation = GENERATION_MUTATIONS[name]
    broken = tmp_path / "broken_port.py"
    broken.write_text(broken_port(name))
    mine = [g for g in generations if mutation.breaks(g) and g.case.dtype == "float64"]
    assert mine, "the mutation must break some generation"
    reports = check_generations(mine, load_entry_points(str(broken))["generate_case"])
    assert [r.passed for r in reports] == [True, False] * len(mine), [(r.name, r.passed) for r in reports]


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda d: d["expected"]["tokens"][0].pop(), "expected 'tokens' must be 2 rows of 8 token ids"),
        (lambda d: d["expected"]["tokens"][0].__setitem__(0, 0 if d["expected"]["tokens"][0][0] else 1),
         "must start with the case's first 3 tokens"),
        (lambda d: d.update(new_tokens=50), "'prompt_length' and 'new_tokens' must be counts"),
    ],
)  # fmt: skip
def test_the_loader_refuses_a_damaged_generation(vectors, cases, tmp_path, damage, fragment):
    name = "lora-odd-generate-float64"
    copy = tmp_path / "v"
    copy.mkdir()
    shutil.copytree(Path(vectors) / name, copy / name)
    (copy / "index.json").write_text(json.dumps({"generations": [name]}))
    doc = json.loads((copy / name / "generation.json").read_text())
    damage(doc)
    (copy / name / "generation.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(")):
        load_generations(copy, cases)
