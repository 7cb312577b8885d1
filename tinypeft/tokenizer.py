"""Text to token ids and back, chosen by what a model folder holds.

- No tokenizer.json: the byte tokenizer (`ByteTokenizer`), the identity on bytes, vocabulary 256. The
  shipped base and every model `tinypeft pretrain` writes use it; corpora are raw bytes, any bytes.
- tokenizer.json (a Hugging Face GPT-2 folder: gpt2, distilgpt2, gpt2-medium, or any
  `save_pretrained` output): that file, read by the `tokenizers` library (`BPETokenizer`; install it
  with `pip install 'tinypeft[tokenizer]'`). GPT-2's byte-level BPE encodes any Unicode text, so a
  corpus or prompt must be UTF-8 text; ids the model has no row for are refused when the folder loads.

The folder's config.json gives the special tokens: eos_token_id (else tokenizer_config.json's
eos_token) separates a corpus's documents, as GPT-2 was trained, and ends `tinypeft generate`'s text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .config import GPTConfig, shown
from .data import SEPARATOR, VOCAB_SIZE, decode, encode
from .errors import CheckpointError, ConfigError

TOKENIZER_FILE = "tokenizer.json"
# what a folder's tokenizer is made of, copied beside a model saved from it (a merge, a full fine-tune)
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
MAX_TOKENIZER_BYTES = 64 << 20  # GPT-2's tokenizer.json is 1.4 MB


class Tokenizer:
    """What tinypeft needs of a tokenizer. name: what it is (a path, or "bytes"); unit: what one
    token is, for losses ("byte" or "token"); vocab_size: every id it gives is below it; eos/bos:
    the special tokens' ids, or None."""

    name: str = ""
    unit: str = "token"
    vocab_size: int = 0
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def encode(self, data: bytes | str, what: str = "text") -> np.ndarray:
        """Token ids (int64) of data; `what` names it in an error ("corpus 'x.txt'", "--prompt")."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; what is not a whole character becomes U+FFFD."""
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes token ids stand for, as `tinypeft generate` writes them."""
        return self.decode(ids).encode("utf-8")

    def encode_documents(self, documents: Sequence[tuple[str, bytes]], what: str) -> list[np.ndarray]:
        """Each document's ids (a corpus: `what` is its name)."""
        return [self.encode(data, f"{what}: {name}") for name, data in documents]

    def separator(self) -> np.ndarray:
        """The ids between two documents of a corpus: eos where there is one, else a blank line."""
        if self.eos_token_id is not None:
            return np.array([self.eos_token_id], dtype=np.int64)
        return self.encode(SEPARATOR)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer's files into `folder`, beside a model saved from the model it came with."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 (tinypeft.data's encode and decode): any bytes, any text."""

    name, unit, vocab_size = "bytes", "byte", VOCAB_SIZE

    def encode(self, data: bytes | str, what: str = "text") -> np.ndarray:
        if isinstance(data, str):
            return encode(data)
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return decode(ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        if ids.size and ids.max() >= VOCAB_SIZE:
            raise ConfigError(
                f"the model generated token id {int(ids.max())}, which is no byte: generate writes bytes, so it "
                "needs a model of the byte vocabulary (ids 0..255), or a folder with its tokenizer.json"
            )
        return bytes(ids.astype(np.uint8).tolist())


BYTES = ByteTokenizer()


class BPETokenizer(Tokenizer):
    """A folder's tokenizer.json through the `tokenizers` library: GPT-2's byte-level BPE, or whatever
    the file describes. Text is encoded as transformers' tokenizer for the folder encodes it, with no
    special token added; an id the file does not hold decodes to U+FFFD."""

    unit = "token"

    def __init__(self, folder: str, backend: Any, eos_token_id: int | None, bos_token_id: int | None) -> None:
        self.folder, self.backend = folder, backend
        self.name = os.path.join(folder, TOKENIZER_FILE)
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id

    def encode(self, data: bytes | str, what: str = "text") -> np.ndarray:
        return self._ids(self.backend.encode(self._text(data, what), add_special_tokens=False))

    def encode_documents(self, documents: Sequence[tuple[str, bytes]], what: str) -> list[np.ndarray]:
        texts = [self._text(data, f"{what}: {name}") for name, data in documents]
        return [self._ids(e) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)]
        # tokenizers drops an id it does not hold; show where one was (a model's padding rows past the file's)
        pieces, run = [], []
        for i in ids:
            if not 0 <= i < self.vocab_size or self.backend.id_to_token(i) is None:
                pieces += [self.backend.decode(run, skip_special_tokens=False), "\ufffd"]
                run = []
            else:
                run.append(i)
        return "".join([*pieces, self.backend.decode(run, skip_special_tokens=False)])

    def save(self, folder: str | os.PathLike) -> None:
        from .io import atomic_write_bytes, read_file

        os.makedirs(folder, exist_ok=True)
        for name in TOKENIZER_FILES:
            source = os.path.join(self.folder, name)
            if os.path.isfile(source):
                atomic_write_bytes(os.path.join(folder, name), read_file(source, MAX_TOKENIZER_BYTES))

    def _text(self, data: bytes | str, what: str) -> str:
        """data as text: this tokenizer reads text, and refuses what is not UTF-8 rather than guess."""
        raw = bytes(data) if isinstance(data, (bytes, bytearray)) else _str_bytes(data)
        try:  # a str holding a lone surrogate (a byte of argv that is not UTF-8) is refused here too
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{what} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}): {self.name} tokenizes text, "
                "so it takes UTF-8 text only (any language: byte-level BPE encodes every character); convert it "
                "(iconv -t UTF-8), or use a byte-level base, which takes any bytes"
            ) from None

    @staticmethod
    def _ids(encoding: Any) -> np.ndarray:
        return np.asarray(encoding.ids, dtype=np.int64)


def _str_bytes(text: str) -> bytes:
    """The bytes a str stands for: a lone surrogate U+DC80..U+DCFF is the byte Python decoded it from
    (argv, file names), any other kept as its (invalid) UTF-8 form, so decoding says where it is."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def load_tokenizer(folder: str | os.PathLike, config: GPTConfig | None = None) -> Tokenizer:
    """The tokenizer of a model folder: its tokenizer.json, or the byte tokenizer where it has none.

    config is the folder's model (read from its config.json when None): every id of the tokenizer
    must have a row in its embedding, and its eos/bos ids must be tokens of the tokenizer."""
    folder = os.fspath(folder)
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.lexists(path):
        return BYTES
    if config is None:
        from .checkpoint import CONFIG_NAME
        from .io import load_json

        config = GPTConfig.from_hf_dict(load_json(os.path.join(folder, CONFIG_NAME)))
    backend = _read_tokenizer(path)
    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        raise CheckpointError(f"{path} holds no tokens; a tokenizer needs a vocabulary")
    token, largest = max(vocab.items(), key=lambda item: item[1])
    if largest >= config.vocab_size:
        raise ConfigError(
            f"{path} has token ids up to {largest} ({token!r}), but the model's vocab_size is "
            f"{shown(config.vocab_size)} (config.json): its embedding has rows for ids 0..{config.vocab_size - 1} "
            "only; use the tokenizer the model was trained with"
        )
    special = {name: _special_id(folder, backend, config, name) for name in ("eos", "bos")}
    return BPETokenizer(folder, backend, special["eos"], special["bos"])


def _read_tokenizer(path: str) -> Any:
    """tokenizers.Tokenizer from a tokenizer.json, or an error saying what to install or what is wrong."""
    from .io import read_file

    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            f"{path} needs the `tokenizers` library, which is not installed: pip install 'tinypeft[tokenizer]' "
            "(or pip install tokenizers); the model was trained on this tokenizer's ids, so tinypeft does not "
            "fall back to bytes"
        ) from None
    data = read_file(path, MAX_TOKENIZER_BYTES)
    try:
        return tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot read
        reason = str(e).replace("\n", " ")[:200]
        raise CheckpointError(f"{path} is not a tokenizer the `tokenizers` library can read: {reason}") from None


def _special_id(folder: str, backend: Any, config: GPTConfig, kind: str) -> int | None:
    """The {kind}_token_id of config.json, checked against the tokenizer; where config.json names none,
    the {kind}_token of tokenizer_config.json (transformers' tokenizer files), else None."""
    token_id = getattr(config, f"{kind}_token_id")
    if token_id is not None:
        if backend.id_to_token(token_id) is None:
            raise ConfigError(
                f"config.json's {kind}_token_id {token_id} is no token of {os.path.join(folder, TOKENIZER_FILE)} "
                f"(its ids: 0..{backend.get_vocab_size(with_added_tokens=True) - 1}); the two files must belong "
                "to one model"
            )
        return token_id
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    from .io import load_json

    settings = load_json(path)
    token = settings.get(f"{kind}_token") if isinstance(settings, dict) else None
    if isinstance(token, dict):  # an AddedToken as transformers saves one
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None
