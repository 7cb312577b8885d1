"""The byte tokenizer, the built-in corpora and batching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinypeft.data import (
    VOCAB_SIZE,
    decode,
    encode,
    eval_windows,
    is_validation,
    load_corpus,
    random_batch,
)
from tinypeft.errors import ConfigError, InputError


@given(st.text())
def test_any_text_round_trips(text):
    ids = encode(text)
    assert ids.dtype == np.int64 and (ids.size == 0 or (ids.min() >= 0 and ids.max() < VOCAB_SIZE))
    assert decode(ids) == text


def test_decode_replaces_broken_utf8_instead_of_failing():
    assert decode([0xE2, 0x82]) == "\ufffd"
    with pytest.raises(InputError):
        decode([256])


@pytest.mark.parametrize("name", ["prose", "code"])
def test_builtin_corpora_are_real_and_split_deterministically(name):
    a, b = load_corpus(name), load_corpus(name)
    assert len(a.train) > 100_000 and len(a.val) > 10_000
    np.testing.assert_array_equal(a.val, b.val)
    assert decode(a.train[:20000]).isprintable() is False  # real text has newlines
    assert 0.03 < len(a.val) / (len(a.train) + len(a.val)) < 0.3


def test_validation_split_is_by_document_name():
    assert is_validation("x") == is_validation("x")
    names = [f"doc{i}" for i in range(1000)]
    assert 50 < sum(map(is_validation, names)) < 150


def test_a_file_or_folder_is_a_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("more text\n" * 200)
    c = load_corpus(str(tmp_path))
    assert len(c.train) + len(c.val) > 3000
    single = load_corpus(str(tmp_path / "a.txt"))
    assert len(single.val) > 0
    with pytest.raises(ConfigError):
        load_corpus(str(tmp_path / "missing"))


def test_batches_are_windows_of_the_data_and_seeded():
    data = np.arange(1000, dtype=np.uint8)
    a = random_batch(data, 4, 16, np.random.default_rng(0))
    b = random_batch(data, 4, 16, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 16) and a.dtype == np.int64
    assert (np.diff(a, axis=1) % 256 == 1).all()  # consecutive bytes
    w = eval_windows(data, 10, 5)
    assert w.shape == (5, 10)
    with pytest.raises(InputError):
        random_batch(data[:5], 1, 16, np.random.default_rng(0))
