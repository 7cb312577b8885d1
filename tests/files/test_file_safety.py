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


# ------------------------------------------------------------------ NaN does not hide (issue 15, item 8)
def test_greedy_generation_from_nan_weights_is_an_error_not_nul_bytes():
    import tinypeft as tp

    model = tp.GPT(tp.GPTConfig(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=1))
    model.params["transformer.ln_f.weight"] = model.params["transformer.ln_f.weight"] * np.nan
    with pytest.raises(tp.TrainingError, match="not finite"):
        model.generate([[1, 2]], max_new_tokens=3)


def test_a_checkpoint_with_nan_weights_is_not_loaded(tmp_path):
    import tinypeft as tp

    model = tp.GPT(tp.GPTConfig(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=1))
    model.params["transformer.h.0.mlp.c_fc.bias"] = model.params["transformer.h.0.mlp.c_fc.bias"] + np.inf
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"mlp.c_fc.bias.*non-finite"):
        tp.GPT.from_pretrained(tmp_path)


# ------------------------------------------------------------------ one device vocabulary (issue 15, item 10)
def test_the_device_vocabulary_is_cpu_and_cuda_everywhere(monkeypatch):
    import importlib.util

    from tinypeft import backend, runtime

    for value, device in (("cpu", "cpu"), ("CUDA", "cuda"), ("numpy", "cpu"), ("cupy", "cuda"), ("", "cpu")):
        monkeypatch.setenv(runtime.BACKEND_ENV, value)
        assert runtime.default_device() == device
    monkeypatch.setenv(runtime.BACKEND_ENV, "gpu")
    with pytest.raises(ConfigError, match="'cpu' and 'cuda'"):
        runtime.default_device()
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(ConfigError, match="needs CuPy"):
            backend.get_backend("cuda")


def test_evaluate_refuses_a_batch_size_that_would_report_a_loss_of_zero():
    import tinypeft as tp
    from tinypeft.train import evaluate

    model = tp.GPT(tp.GPTConfig(vocab_size=256, n_positions=16, n_embd=4, n_layer=1, n_head=1))
    corpus = np.arange(200, dtype=np.uint8)
    for kwargs, field in (({"batch_size": -1}, "batch_size"), ({"max_windows": 0}, "max_windows")):
        with pytest.raises(ConfigError, match=field):
            evaluate(model, corpus, 8, **kwargs)
    with pytest.raises(ConfigError, match="seq_len"):
        evaluate(model, corpus, 0)


@pytest.mark.parametrize("method", ["lora", "prefix", "bitfit"])
def test_an_adapter_with_nan_tensors_is_not_loaded(tmp_path, method):
    import tinypeft as tp
    from tinypeft.methods.registry import METHODS

    cfg = tp.GPTConfig(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    model = tp.get_peft_model(tp.GPT(cfg), METHODS[method].example(cfg))
    model.save_pretrained(tmp_path)
    state = load_safetensors(tmp_path / "adapter_model.safetensors")
    name = sorted(state)[0]
    state[name] = state[name] * np.nan
    save_safetensors(tmp_path / "adapter_model.safetensors", state)
    with pytest.raises(CheckpointError, match="non-finite"):
        tp.PeftModel.from_pretrained(tp.GPT(cfg), tmp_path)


def test_reads_work_under_an_address_space_limit(tmp_path):
    """A read reserves the bytes it asks for: asking for the 16 GiB limit failed with MemoryError
    wherever the address space is capped (ulimit -v), for every small file."""
    import subprocess
    import sys

    save_safetensors(tmp_path / "w.safetensors", {"w": np.arange(6.0)})
    save_json(tmp_path / "c.json", {"a": 1})
    (tmp_path / "corpus.txt").write_bytes(b"abc " * 100)
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
        "from tinypeft.io import load_json, load_safetensors; from tinypeft.data import load_corpus\n"
        f"load_safetensors({str(tmp_path / 'w.safetensors')!r}); load_json({str(tmp_path / 'c.json')!r})\n"
        f"load_corpus({str(tmp_path / 'corpus.txt')!r}); print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408])
def test_a_safetensors_file_whose_length_bytes_look_like_a_pickle_loads(tmp_path, header_len):
    """A header of 640 bytes is 0x280: the file starts b"\\x80\\x02", a pickle's magic (PEFT wrote one such
    adapter in a test). The JSON header's "{" after the length says safetensors."""
    from safetensors.numpy import save

    arrays = {"x": np.arange(3.0)}
    for pad in range(header_len):
        data = save(arrays, metadata={"pad": "p" * pad})
        if int.from_bytes(data[:8], "little") == header_len:
            break
    assert int.from_bytes(data[:8], "little") == header_len and data[:1] == b"\x80"
    (tmp_path / "a.safetensors").write_bytes(data)
    np.testing.assert_array_equal(load_safetensors(tmp_path / "a.safetensors")["x"], arrays["x"])
