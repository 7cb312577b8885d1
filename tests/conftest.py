"""Test settings. Hypothesis runs a fixed, derandomized profile ("ci", the default) so the suite
is deterministic and bounded; HYPOTHESIS_PROFILE=dev explores with fresh random examples, and
HYPOTHESIS_PROFILE=thorough runs many more."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# golden vectors, exported once per test process and only read (a test that damages one copies it first):
# tests/vectors/test_vectors.py and tests/vectors/test_port_torch.py both check against them
@pytest.fixture(scope="session")
def vectors(tmp_path_factory) -> Path:
    from tinypeft.cli import main

    folder = tmp_path_factory.mktemp("vectors")
    assert main(["export-vectors", str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def cases(vectors: Path) -> list:
    from tinypeft.vectors import load_vectors

    return load_vectors(vectors)


# Hugging Face GPT-2 folders made offline (tests/gpt2_folders.py): a small one for the command-line
# tests, and one of gpt2's own shape (124M parameters) for a step or two
@pytest.fixture(scope="session")
def gpt2_small(tmp_path_factory) -> Path:
    from gpt2_folders import make_gpt2_folder

    folder = tmp_path_factory.mktemp("gpt2-small")
    return make_gpt2_folder(folder, n_layer=2, n_embd=32, n_head=4, n_positions=128, tokenizer_size=512)


@pytest.fixture(scope="session")
def gpt2_124m(tmp_path_factory) -> Path:
    from gpt2_folders import make_gpt2_folder

    folder = tmp_path_factory.mktemp("gpt2-124m")
    return make_gpt2_folder(
        folder, n_layer=12, n_embd=768, n_head=12, n_positions=1024, tokenizer_size=50257, vocab_size=50257
    )
