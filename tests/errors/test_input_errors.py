"""The error catalogue's call-time inputs (token ids, labels, attention masks, generate's arguments, the
byte tokenizer) and the numbers that stop a computation (a non-finite loss, weights or logits)."""

from __future__ import annotations

import catalogue
import pytest
from catalogue import (
    Bad,
    assert_refused,
    cases_of,
    ids,
)

world = catalogue.world  # the fixture: the world the cases break, made once per module
CASES = cases_of("input")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_input_and_numeric_errors(world, case: Bad):
    assert_refused(world, case)
