"""Bytes as tokens, and real corpora from what Python itself ships.

The tokenizer is the identity on UTF-8 bytes: vocab 256, every text round-trips exactly, and a loss
in nats per token is a loss per byte (divide by ln 2 for bits per byte).

Built-in corpora, no download needed:
- "prose": the documentation topics of `pydoc_data.topics` (the text `help("if")` shows), ~0.5 MB;
- "code": the Python standard library's own `.py` sources (tests excluded).
A path to a text file, or to a folder of .txt/.md/.py/.rst files, is a corpus too. Files are read as
raw bytes, so a Latin-1 or binary corpus is trained on exactly as it is (the vocabulary is bytes);
only regular files are read, up to MAX_CORPUS_FILE_BYTES each and MAX_CORPUS_BYTES in all.

With a model folder's own tokenizer (tinypeft/tokenizer.py: a GPT-2 folder's tokenizer.json), each
document is tokenized on its own and the documents are joined by the separator the tokenizer gives
(its eos token, as GPT-2 was trained); such a tokenizer reads text, so a file must then be UTF-8.

Documents are split into train/validation by a hash of their name (one in ten to validation), so
the split is deterministic and does not move when a document is added elsewhere. When that leaves
one side empty (a single file, or a folder whose every name hashes alike), the joined text is split
by content instead: its last tenth is the validation split.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError, InputError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

VOCAB_SIZE = 256
BUILTIN_CORPORA = ("prose", "code")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_CORPUS_FILE_BYTES = 1 << 30
MAX_CORPUS_BYTES = 4 << 30
SEPARATOR = b"\n\n"  # between documents


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of text as token ids (int64)."""
    if not isinstance(text, str):
        raise InputError(f"encode needs a str; got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def decode(ids: Iterable[int]) -> str:
    """Text from token ids; bytes that are not valid UTF-8 (a sampled half-character) become U+FFFD."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise InputError(f"byte token ids must be in 0..{VOCAB_SIZE - 1}; got {int(ids.min())}..{int(ids.max())}")
    return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    """Training and validation tokens of one corpus: bytes (uint8), or a tokenizer's ids (int64, unit "token")."""

    name: str
    train: np.ndarray  # uint8 bytes, or int64 token ids
    val: np.ndarray
    documents: int
    unit: str = "byte"

    def describe(self) -> str:
        return (
            f"{self.name}: {self.documents} documents, {len(self.train):,d} train / {len(self.val):,d} val {self.unit}s"
        )


def prose_documents() -> list[tuple[str, bytes]]:
    """The pydoc topics, by name, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return [(name, text.encode("utf-8")) for name, text in sorted(topics.items())]


def code_documents(max_bytes: int | None = 6_000_000) -> list[tuple[str, bytes]]:
    """Standard-library .py sources by relative path, tests and site-packages skipped, in sorted path
    order until max_bytes (about 6 MB by default: more than a CPU run can use, cheap to load)."""
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("."))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError):
                continue
            docs.append((os.path.relpath(path, root), text.encode("utf-8")))
            total += len(text)
            if max_bytes is not None and total >= max_bytes:
                return docs
    return docs


def folder_documents(path: str) -> list[tuple[str, bytes]]:
    """A file, or every text file under a folder (sorted), as documents of raw bytes."""
    from .io import check_regular_file

    if os.path.isdir(path):
        files = sorted(
            os.path.join(folder, f) for folder, _, names in os.walk(path) for f in names if f.endswith(TEXT_SUFFIXES)
        )
    elif os.path.lexists(path):
        files = [path]
    else:
        raise ConfigError(f"corpus {path!r} is neither one of {BUILTIN_CORPORA} nor an existing file or folder")
    docs, total = [], 0
    for f in files:
        size = check_regular_file(f, MAX_CORPUS_FILE_BYTES)
        total += size
        if total > MAX_CORPUS_BYTES:
            raise ConfigError(f"corpus {path!r} holds over {MAX_CORPUS_BYTES:,d} bytes; a corpus is read up to that")
        with open(f, "rb") as fh:
            data = fh.read(min(size, MAX_CORPUS_FILE_BYTES) + 1)
        docs.append((os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f), data))
    if not docs:
        raise ConfigError(f"corpus folder {path!r} holds no {TEXT_SUFFIXES} files")
    return docs


def is_validation(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 10 == 0


def load_corpus(name: str, tokenizer: Tokenizer | None = None) -> Corpus:
    """ "prose", "code", or a path; documents joined by blank lines, split by `is_validation` (or by
    content, when that leaves a side empty). With a tokenizer other than the byte tokenizer, the
    documents are its ids joined by its separator (see the module's docstring)."""
    if name == "prose":
        docs = prose_documents()
    elif name == "code":
        docs = code_documents()
    else:
        docs = folder_documents(name)
    if tokenizer is not None and tokenizer.unit != "byte":
        return _tokenized_corpus(name, docs, tokenizer)
    train = SEPARATOR.join(data for doc, data in docs if not is_validation(doc))
    val = SEPARATOR.join(data for doc, data in docs if is_validation(doc))
    if not train or not val:  # a single file, or names that all hash alike: hold out the last tenth
        joined = SEPARATOR.join(data for _, data in docs)
        cut = int(len(joined) * 0.9)
        train, val = joined[:cut], joined[cut:]
    if not train or not val:
        raise ConfigError(
            f"corpus {name!r} holds {len(train) + len(val)} bytes; too few to split into train and validation"
        )
    return Corpus(name, np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8), len(docs))


def _tokenized_corpus(name: str, docs: list[tuple[str, bytes]], tokenizer: Tokenizer) -> Corpus:
    """The corpus of `load_corpus` in a tokenizer's ids: the same documents on each side of the split."""
    ids = tokenizer.encode_documents(docs, f"corpus {name!r}")
    sep = tokenizer.separator()

    def joined(validation: bool | None) -> np.ndarray:
        chosen = [i for (doc, _), i in zip(docs, ids, strict=True) if validation in (None, is_validation(doc))]
        parts = [part for doc_ids in chosen for part in (sep, doc_ids)][1:]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    train, val = joined(False), joined(True)
    if not train.size or not val.size:  # as for bytes: hold out the last tenth
        everything = joined(None)
        cut = int(len(everything) * 0.9)
        train, val = everything[:cut], everything[cut:]
    if not train.size or not val.size:
        raise ConfigError(
            f"corpus {name!r} holds {len(train) + len(val)} tokens; too few to split into train and validation"
        )
    return Corpus(name, train, val, len(docs), "token")


def random_batch(data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """batch_size windows of seq_len bytes at uniform random offsets: ids (B, T) int64.

    Used as both input and labels: the loss's one-token shift makes each window predict itself."""
    if len(data) < seq_len:
        raise InputError(f"corpus split of {len(data)} bytes is shorter than seq_len={seq_len}")
    starts = rng.integers(0, len(data) - seq_len + 1, size=batch_size)
    return data[starts[:, None] + np.arange(seq_len)].astype(np.int64)


def eval_windows(data: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to max_windows non-overlapping windows spread evenly over data: a fixed evaluation set (N, T)."""
    n_possible = len(data) // seq_len
    if n_possible == 0:
        raise InputError(f"corpus split of {len(data)} bytes is shorter than seq_len={seq_len}")
    n = min(max_windows, n_possible)
    starts = (np.arange(n) * (n_possible // n)) * seq_len
    return data[starts[:, None] + np.arange(seq_len)].astype(np.int64)
