"""Writers never replace what is not a regular file; readers read regular files only, bounded; corpora
are bytes (each regression test here failed, hung or destroyed something before its fix)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import zlib

import numpy as np
import pytest

from tinypeft import data
from tinypeft.errors import CheckpointError, ConfigError
from tinypeft.io import files, load_json, load_safetensors, save_json, save_safetensors


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a read of a FIFO blocks until a writer comes, which none will."""

    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: the call blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_writer_refuses_a_device_and_leaves_it_alone(tmp_path):
    """A null device of our own (never /dev/null: a regression of this fix, run as root, would replace
    the machine's)."""
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    with pytest.raises(ConfigError, match="character device, not a regular file"):
        save_json(device, {"a": 1})
    assert stat.S_ISCHR(os.lstat(device).st_mode)


@pytest.mark.parametrize("kind", ["fifo", "folder", "symlink"])
def test_a_writer_refuses_what_is_not_a_regular_file(tmp_path, kind):
    target = tmp_path / "out.json"
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(elsewhere)
    expected = {"fifo": "FIFO", "folder": "a folder", "symlink": "symbolic link"}[kind]
    with pytest.raises(ConfigError, match=expected):
        save_json(target, {"a": 1})
    with pytest.raises(ConfigError, match=expected):
        save_safetensors(target, {"w": np.zeros(2)})
    assert elsewhere.read_text() == "{}"
    assert target.is_symlink() if kind == "symlink" else not target.is_file()


def test_a_reader_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(CheckpointError, match="FIFO"):
        load_json(fifo)
    with deadline(5), pytest.raises(CheckpointError, match="FIFO"):
        load_safetensors(fifo)


def test_a_reader_refuses_a_link_to_an_endless_device(tmp_path):
    link = tmp_path / "model.safetensors"
    link.symlink_to("/dev/zero")
    with deadline(5), pytest.raises(CheckpointError, match="character device"):
        load_safetensors(link)


def test_a_reader_states_its_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    save_json(path, {"x": "y" * 100})
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 50)
    with pytest.raises(CheckpointError, match="read up to 50 bytes"):
        load_json(path)


def test_a_fifo_in_a_corpus_folder_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 100)
    os.mkfifo(tmp_path / "b.txt")
    with deadline(5), pytest.raises(CheckpointError, match="FIFO"):
        data.load_corpus(str(tmp_path))


def test_a_corpus_linked_to_dev_zero_is_refused(tmp_path):
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")
    with deadline(5), pytest.raises(CheckpointError, match="character device"):
        data.load_corpus(str(link))


def test_a_corpus_over_the_limit_says_the_limit(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"x" * 100)
    monkeypatch.setattr(data, "MAX_CORPUS_FILE_BYTES", 10)
    with pytest.raises(CheckpointError, match="read up to 10 bytes"):
        data.load_corpus(str(tmp_path))


def test_a_latin1_or_binary_corpus_is_read_as_its_bytes(tmp_path):
    raw = bytes(range(256)) * 40 + "café".encode("latin-1") * 50  # not UTF-8
    (tmp_path / "latin1.txt").write_bytes(raw)
    corpus = data.load_corpus(str(tmp_path / "latin1.txt"))
    assert corpus.train.tobytes() + corpus.val.tobytes() == raw


def test_a_single_file_never_leaves_a_split_empty(tmp_path):
    """One file name in ten hashes to validation; the split must then be by content."""
    name = next(f"doc{i}.txt" for i in range(1000) if zlib.crc32(f"doc{i}.txt".encode()) % 10 == 0)
    assert data.is_validation(name)
    (tmp_path / name).write_bytes(b"abcdefghij" * 100)
    corpus = data.load_corpus(str(tmp_path / name))
    assert len(corpus.train) == 900 and len(corpus.val) == 100
    folder = tmp_path / "all_validation"
    folder.mkdir()
    (folder / name).write_bytes(b"0123456789" * 100)
    corpus = data.load_corpus(str(folder))
    assert len(corpus.train) == 900 and len(corpus.val) == 100
