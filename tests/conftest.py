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
