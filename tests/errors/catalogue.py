"""The error catalogue: every misuse tinypeft catches, each raising one of tinypeft's error types
with a message that names the bad value and says what is allowed.

A case is a `Bad`: the situation (`when`, also its row in docs/errors.md), a call that must fail,
the exact error type, and fragments the message must contain (the bad value, and what is allowed).
Cases are grouped in lists by section. The configurations a method refuses are not listed here: each
method's file declares them (`MethodSpec.error_cases`, tinypeft/methods/registry.py), and the
"Method configurations" section reads them from the registry. The tests, by area, are the
test_*_errors.py files beside this one; test_catalogue.py checks the catalogue as a whole. After
adding cases, regenerate the documented list with

    PYTHONPATH=.:tests python tests/errors/catalogue.py > docs/errors.md

(a test checks that docs/errors.md lists every case).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from limits import time_bound
from safetensors.numpy import load_file, save_file

import tinypeft as tp
from tinypeft import data, memory
from tinypeft.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    InputTypeError,
    MergeError,
    TinyPeftError,
    TrainingError,
)
from tinypeft.methods import METHODS
from tinypeft.methods.registry import ERROR_MODEL, ErrorCase
from tinypeft.optim import SGD, AdamW
from tinypeft.optim_lora import LoraFA, create_loraplus_optimizer
from tinypeft.precision import round_to
from tinypeft.train import TrainConfig, evaluate, train
from tinypeft.vectors import load_impl

CFG = tp.GPTConfig(**ERROR_MODEL)  # the base every method's ErrorCase expects
IDS = np.arange(8).reshape(2, 4)
DATA = np.random.default_rng(0).integers(0, 32, size=400).astype(np.uint8)
RUN = TrainConfig(steps=4, batch_size=2, seq_len=8, warmup_steps=0, eval_every=0, eval_windows=1, checkpoint_every=2)
CHECKPOINT = "checkpoints/step-000002"
DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "errors.md"


# ------------------------------------------------------------------ the world the cases break
class Raw:
    """An edit of a file's bytes (the other edits see parsed JSON or a dict of arrays)."""

    def __init__(self, change: Callable[[bytes], bytes]) -> None:
        self.change = change


@dataclass
class World:
    """A tiny base model, and folders to break: a saved model, a saved BitFit adapter of that model,
    a training run of the full model and one of LoRA with dropout, both checkpointed at step 2."""

    root: Path
    base: tp.GPT
    model_dir: Path
    adapter_dir: Path
    run_dir: Path
    lora_run_dir: Path

    @classmethod
    def create(cls, root: Path) -> World:
        base = tp.GPT(CFG, seed=0)
        base.save_pretrained(root / "model")
        tp.get_peft_model(base, tp.BitFitConfig()).save_pretrained(root / "adapter")
        train(tp.GPT(CFG, seed=0), DATA, RUN, run_dir=str(root / "run"), progress=False, stop_after=2)
        train(lora_with_dropout(), DATA, RUN, run_dir=str(root / "lora-run"), progress=False, stop_after=2)
        return cls(root, base, root / "model", root / "adapter", root / "run", root / "lora-run")

    def variant(self, source: Path, edits: Mapping[str, object]) -> Path:
        """A fresh copy of `source` with its files edited. An edit is None (delete the file), bytes
        (the new content), a Raw (bytes -> bytes), or a function of the parsed file: JSON -> JSON,
        {name: array} -> {name: array}."""
        dest = Path(tempfile.mkdtemp(dir=self.root, prefix=source.name + "-"))
        shutil.copytree(source, dest, dirs_exist_ok=True)
        for rel, edit in edits.items():
            path = dest / rel
            if edit is None:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            elif isinstance(edit, bytes):
                path.write_bytes(edit)
            elif isinstance(edit, Raw):
                path.write_bytes(edit.change(path.read_bytes()))
            elif rel.endswith(".json"):
                path.write_text(json.dumps(edit(json.loads(path.read_text()))))
            else:
                save_file(edit(dict(load_file(path))), path)
        return dest

    def peft(self, config: tp.PeftConfig | None = None) -> tp.PeftModel:
        return tp.get_peft_model(tp.GPT(CFG, seed=0), config or tp.BitFitConfig())

    def resume(self, run_dir: Path, config: TrainConfig = RUN) -> None:
        train(tp.GPT(CFG, seed=0), DATA, config, run_dir=str(run_dir), resume=True, progress=False)


def lora_with_dropout() -> tp.PeftModel:
    return tp.get_peft_model(tp.GPT(CFG, seed=0), tp.LoraConfig(r=2, lora_dropout=0.1))


def resume_lora(edits: Mapping[str, object]) -> Callable[[World], object]:
    return lambda w: train(
        lora_with_dropout(), DATA, RUN, run_dir=str(w.variant(w.lora_run_dir, edits)), resume=True, progress=False
    )


def load_model(edits: Mapping[str, object]) -> Callable[[World], object]:
    return lambda w: tp.GPT.from_pretrained(w.variant(w.model_dir, edits))


def load_adapter(edits: Mapping[str, object]) -> Callable[[World], object]:
    return lambda w: tp.PeftModel.from_pretrained(w.base, w.variant(w.adapter_dir, edits))


def resume(edits: Mapping[str, object]) -> Callable[[World], object]:
    return lambda w: w.resume(w.variant(w.run_dir, edits))


def first_tensor(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], dict]:
    """An edit of the first tensor (in sorted name order) of a safetensors file."""

    def edit(tensors: dict) -> dict:
        name = sorted(tensors)[0]
        return tensors | {name: change(tensors[name])}

    return edit


def without_first(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k != sorted(tensors)[0]}


def renamed_first(tensors: dict) -> dict:
    name = sorted(tensors)[0]
    return {(k + ".renamed" if k == name else k): v for k, v in tensors.items()}


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file written by hand, for dtypes safetensors.numpy cannot write."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def fails_at(model, call: int):
    """A model whose loss becomes NaN at the given call of loss_and_grad."""

    class Diverging:
        calls = 0

        def __getattr__(self, name):
            return getattr(model, name)

        def loss_and_grad(self, ids, labels, mask=None):
            Diverging.calls += 1
            loss, grads = model.loss_and_grad(ids, labels, mask)
            return (float("nan") if Diverging.calls == call else loss), grads

    return Diverging()


def overflows_at(model, call: int):
    """A model whose weights become inf during the given call of loss_and_grad (as an overflowing
    update would leave them), while its loss stays finite."""

    class Overflowing:
        calls = 0

        def __getattr__(self, name):
            return getattr(model, name)

        def loss_and_grad(self, ids, labels, mask=None):
            Overflowing.calls += 1
            result = model.loss_and_grad(ids, labels, mask)
            if Overflowing.calls == call:
                next(iter(model.trainable_parameters().values()))[...] = np.inf
            return result

    return Overflowing()


def train_while_disabled(model: tp.PeftModel) -> None:
    with model.disable_adapter():
        model.loss_and_grad(IDS, IDS)


def nan_model() -> tp.GPT:
    model = tp.GPT(CFG, seed=0)
    model.params["transformer.ln_f.weight"] = np.full(CFG.n_embd, np.nan, dtype=np.float32)
    return model


def merged_bitfit() -> tp.PeftModel:
    model = tp.get_peft_model(tp.GPT(CFG, seed=0), tp.BitFitConfig())
    model.merge_adapter()
    return model


def non_finite_bitfit() -> tp.PeftModel:
    model = tp.get_peft_model(tp.GPT(CFG, seed=0), tp.BitFitConfig())
    next(iter(model.trainable_parameters().values()))[0] = np.nan
    return model


def on_a_machine_with(gib: float, call: Callable[[World], object]) -> Callable[[World], object]:
    """`call` on a machine that reports `gib` GiB of memory available, so that the case, and its message
    in docs/errors.md, do not depend on the machine that runs it."""

    def on_it(w: World) -> object:
        with mock.patch.object(memory, "available_bytes", lambda xp=None: int(gib * memory.GiB)):
            return call(w)

    return on_it


def sparse_weights(w: World, size: int) -> Path:
    """A copy of the saved model whose model.safetensors is `size` bytes long (sparse: no disk used)."""
    folder = w.variant(w.model_dir, {})
    os.truncate(folder / "model.safetensors", size)
    return folder


@dataclass(frozen=True)
class Bad:
    when: str
    call: Callable[[World], object]
    error: type[TinyPeftError]
    says: tuple[str, ...]


# ------------------------------------------------------------------ configurations
CONFIG_CASES = [
    Bad(
        "n_embd not divisible by n_head",
        lambda w: tp.GPTConfig(n_embd=10, n_head=3),
        ConfigError,
        ("n_embd=10", "n_head=3", "n_head in [1, 2, 5, 10]"),
    ),
    *[
        Bad(
            f"GPTConfig.{field} = {value!r}",
            lambda w, f=field, v=value: tp.GPTConfig(**{f: v}),
            ConfigError,
            (f"GPTConfig.{field}", repr(value), "positive integer"),
        )
        for field, value in [
            ("vocab_size", 0),
            ("n_positions", -1),
            ("n_embd", 0),
            ("n_layer", -2),
            ("n_head", 0),
            ("n_embd", 8.0),
            ("n_layer", True),
            ("vocab_size", "256"),
        ]
    ],
    Bad("GPTConfig.n_inner = 0", lambda w: tp.GPTConfig(n_inner=0), ConfigError, ("n_inner", "0", "or None")),
    Bad("GPTConfig.n_inner = True", lambda w: tp.GPTConfig(n_inner=True), ConfigError, ("n_inner", "True")),
    Bad(
        "GPTConfig.dtype not float32/float64",
        lambda w: tp.GPTConfig(dtype="int8"),
        ConfigError,
        ("'int8'", "float32", "float64"),
    ),
    Bad(
        "GPTConfig.dtype bfloat16: no method computes in it",
        lambda w: tp.GPTConfig(dtype="bfloat16"),
        ConfigError,
        ("'bfloat16'", "float32", "float64", "store weights in half precision", "tinypeft.precision"),
    ),
    *[
        Bad(
            f"GPTConfig.layer_norm_epsilon = {value!r}",
            lambda w, v=value: tp.GPTConfig(layer_norm_epsilon=v),
            ConfigError,
            ("layer_norm_epsilon", repr(value), "positive number"),
        )
        for value in [0.0, float("nan"), "1e-5", True]
    ],
    # numbers that are not numbers: an integer past float's range, or past the 4,300 digits Python prints
    Bad(
        "GPTConfig.layer_norm_epsilon = 10**400",
        lambda w: tp.GPTConfig(layer_norm_epsilon=10**400),
        ConfigError,
        ("GPTConfig.layer_norm_epsilon must be a positive number; got an integer of 401 digits",),
    ),
    Bad(
        "GPTConfig.n_embd of 5,001 digits, not divisible by n_head",
        lambda w: tp.GPTConfig(n_embd=10**5000, n_head=3),
        ConfigError,
        ("n_embd=an integer of about 5001 digits is not divisible by n_head=3",),
    ),
    Bad(
        "LoraConfig.lora_alpha = 10**400",
        lambda w: tp.LoraConfig(lora_alpha=10**400),
        ConfigError,
        ("LoraConfig.lora_alpha must be a positive finite number; got an integer of 401 digits",),
    ),
    Bad(
        "LoraConfig.r = -(10**5000)",
        lambda w: tp.LoraConfig(r=-(10**5000)),
        ConfigError,
        ("LoraConfig.r must be a positive integer", "got a negative integer of about 5001 digits"),
    ),
    Bad(
        "LoraConfig.target_modules holding 10**5000",
        lambda w: tp.get_peft_model(w.base, tp.LoraConfig(r=1, target_modules=[10**5000])),
        ConfigError,
        ("target_modules entries must be non-empty strings; got an integer of about 5001 digits",),
    ),
    Bad(
        "GPT given something else than a GPTConfig", lambda w: tp.GPT({"n_embd": 8}), ConfigError, ("GPTConfig", "dict")
    ),
    Bad("GPT seed negative", lambda w: tp.GPT(CFG, seed=-1), ConfigError, ("seed", "-1", ">= 0")),
    Bad("unknown device", lambda w: tp.GPT(CFG, device="tpu"), ConfigError, ("'tpu'", "'cpu'", "'cuda'")),
    Bad(
        "device cuda without CuPy",
        lambda w: cuda_without_cupy(w),  # defined below, with the other cases of issue 15
        ConfigError,
        ("device 'cuda' needs CuPy, which is not installed", "or use device 'cpu'"),
    ),
    Bad(
        "GPT larger than the memory (pretrain --n_embd 16384)",
        on_a_machine_with(16, lambda w: tp.GPT(tp.GPTConfig(n_embd=16384))),
        ConfigError,
        ("this model needs about 48.0 GiB", "n_embd=16384", "the machine has 16.0 GiB available", "smaller n_embd"),
    ),
    Bad(
        "GPT larger than float's range (pretrain --n_embd of 401 digits)",
        on_a_machine_with(16, lambda w: tp.GPT(tp.GPTConfig(n_embd=10**400, n_head=1))),
        ConfigError,
        (
            "this model needs about 10^793 GiB",
            "~10^801 parameters",
            "n_embd=an integer of 401 digits",
            "16.0 GiB available",
        ),
    ),
    Bad(
        "adapter larger than the memory (bottleneck_size 10**12)",
        on_a_machine_with(16, lambda w: tp.get_peft_model(tp.GPT(CFG), tp.AdapterConfig(bottleneck_size=10**12))),
        ConfigError,
        ("AdapterConfig's adapter needs about", "68,000,000,000,032 numbers", "16.0 GiB available"),
    ),
    Bad(
        "from_pretrained dtype not float32/float64",
        lambda w: tp.GPT.from_pretrained(w.model_dir, dtype="float16"),
        ConfigError,
        ("'float16'", "float32", "float64"),
    ),
    *[
        Bad(
            f"TrainConfig.{field} = {value!r}",
            lambda w, f=field, v=value: TrainConfig(**{f: v}),
            ConfigError,
            (field, repr(value), allowed),
        )
        for field, value, allowed in [
            ("steps", 0, ">= 1"),
            ("batch_size", -1, ">= 1"),
            ("seq_len", 1.5, ">= 1"),
            ("eval_windows", True, ">= 1"),
            ("warmup_steps", -1, ">= 0"),
            ("eval_every", "10", ">= 0"),
            ("checkpoint_every", -5, ">= 0"),
            ("lr", -1.0, ">= 0"),
            ("lr", float("nan"), "finite"),
            ("lr", float("inf"), "finite"),
            ("weight_decay", "0.1", "number"),
            ("grad_clip", -1.0, ">= 0"),
            ("min_lr_ratio", 2.0, "[0, 1]"),
            ("min_lr_ratio", "0.1", "[0, 1]"),
            ("optimizer", "adam", "'adamw' or 'sgd'"),
            ("momentum", 1.0, "[0, 1)"),
            ("seed", -1, ">= 0"),
            ("seed", "0", ">= 0"),
        ]
    ],
    Bad(
        "training step larger than the memory (finetune --batch_size 100000)",
        on_a_machine_with(16, lambda w: train(tp.GPT(tp.GPTConfig()), DATA, TrainConfig(batch_size=100_000))),
        ConfigError,
        ("a training step on a batch of 100,000 x 128 tokens needs about", "16.0 GiB available", "smaller batch_size"),
    ),
    Bad("AdamW lr negative", lambda w: AdamW(lr=-1.0), ConfigError, ("lr", "-1.0", ">= 0")),
    Bad("AdamW betas outside [0, 1)", lambda w: AdamW(betas=(0.9, 1.0)), ConfigError, ("(0.9, 1.0)", "[0, 1)")),
    Bad("AdamW eps zero", lambda w: AdamW(eps=0.0), ConfigError, ("eps", "0.0", "> 0")),
    Bad("SGD momentum outside [0, 1)", lambda w: SGD(momentum=1.5), ConfigError, ("1.5", "[0, 1)")),
    Bad(
        "optimizer given gradients of unknown parameters",
        lambda w: AdamW().step({"a": np.zeros(2)}, {"b": np.zeros(2)}),
        ConfigError,
        ("unknown parameters", "'b'"),
    ),
    Bad(
        "training a model with nothing trainable",
        lambda w: train((lambda m: (tp.freeze(m), m)[1])(tp.GPT(CFG)), DATA, RUN, progress=False),
        ConfigError,
        ("no trainable parameters",),
    ),
    Bad(
        "resume without a run folder",
        lambda w: train(tp.GPT(CFG), DATA, RUN, resume=True, progress=False),
        ConfigError,
        ("resume=True", "run_dir"),
    ),
    Bad(
        "get_peft_model on something else than a GPT",
        lambda w: tp.get_peft_model("gpt2", tp.BitFitConfig()),
        ConfigError,
        ("tinypeft GPT", "str"),
    ),
    Bad(
        "get_peft_model with something else than a PEFT config",
        lambda w: tp.get_peft_model(w.base, {"r": 8}),
        ConfigError,
        ("PEFT config", "dict"),
    ),
    Bad(
        "get_peft_model seed negative",
        lambda w: tp.get_peft_model(w.base, tp.BitFitConfig(), seed=-3),
        ConfigError,
        ("seed", "-3", ">= 0"),
    ),
    Bad(
        "adapter name empty",
        lambda w: w.peft().add_adapter("", tp.BitFitConfig()),
        ConfigError,
        ("adapter_name", "''", "non-empty string"),
    ),
    Bad(
        "adapter name taken",
        lambda w: w.peft().add_adapter("default", tp.BitFitConfig()),
        ConfigError,
        ("'default'", "names in use"),
    ),
    Bad(
        "set_adapter to an unknown name",
        lambda w: w.peft().set_adapter("other"),
        ConfigError,
        ("'other'", "['default']"),
    ),
    Bad(
        "set_adapter to a non-string",
        lambda w: w.peft().set_adapter(7),
        ConfigError,
        ("no adapter named 7", "the adapters are ['default']"),
    ),
    Bad(
        "deleting the only adapter",
        lambda w: w.peft().delete_adapter("default"),
        ConfigError,
        ("'default'", "only adapter", "unload()"),
    ),
    Bad(
        "training inside disable_adapter()",
        lambda w: train_while_disabled(w.peft()),
        ConfigError,
        ("disabled", "nothing to train"),
    ),
]


# ------------------------------------------------------------------ method configurations: from the registry
def from_registry(case: ErrorCase) -> Bad:
    """A method's ErrorCase as a Bad: its call gets the world's base, or that base wrapped with its config
    (made inside the call, where it may fail)."""

    def call(w: World) -> object:
        return case.call(w.base if case.config is None else tp.get_peft_model(w.base, case.config()))

    return Bad(case.when, call, case.error, case.says)


METHOD_CASES = [from_registry(case) for spec in METHODS.values() for case in spec.error_cases()]


# ------------------------------------------------------------------ issue 15's cases: files, runs, numbers
def fifo(w: World, name: str) -> Path:
    """A FIFO (named pipe) at a fresh path: reading it would block forever, replacing it would lose it."""
    folder = Path(tempfile.mkdtemp(dir=w.root, prefix="fifo-"))
    os.mkfifo(folder / name)
    return folder / name


def link_to(w: World, name: str, target: str) -> Path:
    folder = Path(tempfile.mkdtemp(dir=w.root, prefix="link-"))
    (folder / name).symlink_to(target)
    return folder / name


def corpus_with_a_fifo(w: World) -> Path:
    folder = Path(tempfile.mkdtemp(dir=w.root, prefix="corpus-"))
    (folder / "a.txt").write_text("text " * 100)
    os.mkfifo(folder / "b.txt")
    return folder


def nan_weights_folder(w: World) -> Path:
    model = tp.GPT(CFG, seed=0)
    model.params["transformer.ln_f.bias"] = model.params["transformer.ln_f.bias"] + np.nan
    folder = Path(tempfile.mkdtemp(dir=w.root, prefix="nan-model-"))
    model.save_pretrained(folder)
    return folder


def cuda_without_cupy(w: World) -> object:
    """device='cuda' as on a machine without CuPy, whatever this one has."""
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = None  # makes `import cupy` raise ImportError
    try:
        return tp.GPT(CFG, device="cuda")
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved


def resume_with_another_alpha(w: World) -> object:
    run = w.variant(w.lora_run_dir, {})
    other = tp.get_peft_model(tp.GPT(CFG, seed=0), tp.LoraConfig(r=2, lora_dropout=0.1, lora_alpha=5))
    return train(other, DATA, RUN, run_dir=str(run), resume=True, progress=False)


def run_folder_in_use(w: World) -> object:
    import fcntl

    run = w.variant(w.run_dir, {})
    fd = os.open(run / ".tinypeft.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242", 0)
        return w.resume(run)
    finally:
        os.close(fd)


def bpe_folder(w: World, vocab_size: int = 300, edits: Mapping[str, object] | None = None) -> Path:
    """A model folder with a GPT-2-style tokenizer.json of 300 ids (the last, 299, <|endoftext|>), the
    model's vocab_size given, config.json's eos and bos that token; `edits` as `World.variant` takes them."""
    from gpt2_folders import trained_bpe

    folder = Path(tempfile.mkdtemp(dir=w.root, prefix="bpe-"))
    tokenizer = trained_bpe(300)
    eos = tokenizer.token_to_id("<|endoftext|>")
    special = eos if eos < vocab_size else None
    tp.GPT(CFG.replace(vocab_size=vocab_size, bos_token_id=special, eos_token_id=special)).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return w.variant(folder, edits or {})


def load_tokenizer_of(edits: Mapping[str, object], vocab_size: int = 300) -> Callable[[World], object]:
    from tinypeft.tokenizer import load_tokenizer

    return lambda w: load_tokenizer(bpe_folder(w, vocab_size, edits))


def without_tokenizers(w: World) -> object:
    """A folder with tokenizer.json on a machine without the `tokenizers` library, whatever this one has."""
    from tinypeft.tokenizer import load_tokenizer

    folder = bpe_folder(w)
    with mock.patch.dict(sys.modules, {"tokenizers": None}):  # `import tokenizers` raises ImportError
        return load_tokenizer(folder)


def latin1_corpus(w: World) -> Path:
    path = Path(tempfile.mkdtemp(dir=w.root, prefix="corpus-")) / "latin1.txt"
    path.write_bytes("Un café à Paris, où l'on parle.\n".encode("latin-1") * 20)
    return path


# ------------------------------------------------------------------ call-time inputs
INPUT_CASES = [
    Bad(
        "token id >= vocab_size",
        lambda w: w.base(np.array([[1, 32]])),
        InputError,
        ("token id 32", "0..31", "vocab_size=32"),
    ),
    Bad("negative token id", lambda w: w.base(np.array([[-1, 3]])), InputError, ("token id -1", "0..31")),
    Bad("float token ids", lambda w: w.base(np.array([[1.0, 2.0]])), InputTypeError, ("integers", "float64")),
    Bad("bool token ids", lambda w: w.base(np.array([[True, False]])), InputTypeError, ("integers", "bool")),
    Bad("string token ids", lambda w: w.base("hello"), InputTypeError, ("integers", "<U5")),
    Bad("ragged token ids", lambda w: w.base([[1, 2], [3]]), InputError, ("rectangular", "list")),
    Bad("token ids of rank 1", lambda w: w.base(np.arange(5)), InputError, ("(batch, seq_len)", "(5,)")),
    Bad(
        "token ids of rank 3", lambda w: w.base(np.zeros((1, 2, 3), int)), InputError, ("(batch, seq_len)", "(1, 2, 3)")
    ),
    Bad("empty batch", lambda w: w.base(np.zeros((0, 4), int)), InputError, ("empty", "(0, 4)", ">= 1")),
    Bad("empty sequences", lambda w: w.base(np.zeros((2, 0), int)), InputError, ("empty", "(2, 0)", ">= 1")),
    Bad(
        "longer than n_positions", lambda w: w.base(np.zeros((1, 17), int)), InputError, ("17 tokens", "n_positions=16")
    ),
    Bad(
        "bad token ids through a PeftModel", lambda w: w.peft()(np.array([[40]])), InputError, ("token id 40", "0..31")
    ),
    Bad("labels of another shape", lambda w: w.base.loss(IDS, IDS[:, :3]), InputError, ("(2, 4)", "(2, 3)")),
    Bad("label >= vocab_size", lambda w: w.base.loss(IDS, IDS + 30), InputError, ("labels hold 32", "0..31", "-100")),
    Bad(
        "negative label other than -100",
        lambda w: w.base.loss(IDS, -IDS - 1),
        InputError,
        ("labels hold -1", "-100 (ignored)"),
    ),
    Bad("float labels", lambda w: w.base.loss(IDS, IDS.astype(float)), InputTypeError, ("float64", "-100")),
    Bad(
        "labels with nothing to predict",
        lambda w: w.base.loss(IDS, np.full_like(IDS, -100)),
        InputError,
        ("nothing to predict", "at least one target"),
    ),
    Bad(
        "sequences of one token (nothing to predict)",
        lambda w: w.base.loss(IDS[:, :1], IDS[:, :1]),
        InputError,
        ("nothing to predict", "seq_len is 1"),
    ),
    Bad("attention mask not 0/1", lambda w: w.base(IDS, np.full(IDS.shape, 2)), InputError, ("only 0", "1", "found 2")),
    Bad("attention mask holding NaN", lambda w: w.base(IDS, np.full(IDS.shape, np.nan)), InputError, ("found nan",)),
    Bad("attention mask of another shape", lambda w: w.base(IDS, np.ones((2, 3))), InputError, ("(2, 4)", "(2, 3)")),
    Bad(
        "attention mask of strings",
        lambda w: w.base(IDS, np.full(IDS.shape, "1")),
        InputTypeError,
        ("0/1 or bools", "<U1"),
    ),
    Bad(
        "generate max_new_tokens negative",
        lambda w: w.base.generate(IDS, -1),
        InputError,
        ("max_new_tokens", "-1", ">= 0"),
    ),
    Bad(
        "generate max_new_tokens not an integer",
        lambda w: w.base.generate(IDS, 2.5),
        InputError,
        ("max_new_tokens", "2.5"),
    ),
    Bad(
        "generate past n_positions",
        lambda w: w.base.generate(IDS, 14),
        InputError,
        ("14 tokens after 4", "n_positions=16"),
    ),
    *[
        Bad(
            f"generate temperature {value!r}",
            lambda w, v=value: w.base.generate(IDS, 2, temperature=v),
            InputError,
            ("temperature", repr(value), "finite number >= 0"),
        )
        for value in [-1.0, float("nan"), float("inf"), "hot", True]
    ],
    *[
        Bad(
            f"generate top_k {value!r}",
            lambda w, v=value: w.base.generate(IDS, 2, 1.0, top_k=v),
            InputError,
            ("top_k", repr(value), "1..32"),
        )
        for value in [0, 33, 2.5]
    ],
    Bad("generate seed negative", lambda w: w.base.generate(IDS, 2, 1.0, seed=-1), InputError, ("seed", "-1", ">= 0")),
    Bad("encode a non-string", lambda w: data.encode(b"bytes"), InputError, ("str", "bytes")),
    Bad("decode ids outside a byte", lambda w: data.decode([65, 300]), InputError, ("0..255", "300")),
    Bad(
        "corpus shorter than seq_len",
        lambda w: data.random_batch(DATA[:5], 2, 8, np.random.default_rng(0)),
        InputError,
        ("5 bytes", "seq_len=8"),
    ),
    Bad(
        "corpus that is not a file or folder",
        lambda w: data.load_corpus(str(w.root / "nope")),
        ConfigError,
        ("nope", "'prose'", "existing file or folder"),
    ),
]

# ------------------------------------------------------------------ files: models and adapters
TORCH_ZIP = b"PK\x03\x04" + bytes(60)  # the start of what torch.save writes
FILE_CASES = [
    Bad(
        "writing over a FIFO",
        lambda w: tp.GPT(CFG).save_pretrained(fifo(w, "config.json").parent),
        ConfigError,
        ("config.json exists and is a FIFO (named pipe), not a regular file", "give the path of a file"),
    ),
    Bad(
        "writing through a symbolic link",
        lambda w: tp.io.save_json(link_to(w, "report.json", str(w.root / "elsewhere.json")), {}),
        ConfigError,
        ("report.json is a symbolic link", "would replace the link"),
    ),
    Bad(
        "reading a FIFO as config.json",
        lambda w: tp.io.load_json(fifo(w, "config.json")),
        CheckpointError,
        ("config.json is a FIFO (named pipe), not a regular file", "reads regular files only"),
    ),
    Bad(
        "reading a link to /dev/zero as weights",
        lambda w: tp.io.load_safetensors(link_to(w, "model.safetensors", "/dev/zero")),
        CheckpointError,
        ("model.safetensors is a character device, not a regular file",),
    ),
    Bad(
        "a FIFO in a corpus folder",
        lambda w: data.load_corpus(str(corpus_with_a_fifo(w))),
        CheckpointError,
        ("b.txt is a FIFO (named pipe), not a regular file",),
    ),
    Bad(
        "adapter tensors holding NaN",
        load_adapter({"adapter_model.safetensors": first_tensor(lambda a: a * np.nan)}),
        CheckpointError,
        ("non-finite value(s) (NaN or inf)", "not loaded"),
    ),
    Bad(
        "model weights holding NaN",
        lambda w: tp.GPT.from_pretrained(nan_weights_folder(w)),
        CheckpointError,
        ("'transformer.ln_f.bias' holds 8 non-finite value(s) (NaN or inf)", "not loaded"),
    ),
    Bad(
        "model folder missing",
        lambda w: tp.GPT.from_pretrained(w.root / "nope"),
        CheckpointError,
        ("nope", "not a folder", "config.json", "model.safetensors"),
    ),
    Bad(
        "model path is a file",
        lambda w: tp.GPT.from_pretrained(w.model_dir / "config.json"),
        CheckpointError,
        ("config.json is not a folder",),
    ),
    Bad("config.json missing", load_model({"config.json": None}), CheckpointError, ("config.json does not exist",)),
    Bad(
        "tokenizer.json with ids beyond the model's vocab_size",
        load_tokenizer_of({}, vocab_size=256),
        ConfigError,
        ("tokenizer.json has token ids up to 299 ('<|endoftext|>')", "vocab_size is 256", "rows for ids 0..255"),
    ),
    Bad(
        "tokenizer.json without the tokenizers library",
        without_tokenizers,
        ConfigError,
        ("tokenizer.json needs the `tokenizers` library", "pip install 'tinypeft[tokenizer]'"),
    ),
    Bad(
        "tokenizer.json truncated",
        load_tokenizer_of({"tokenizer.json": Raw(lambda b: b[: len(b) // 2])}),
        CheckpointError,
        ("tokenizer.json is not a tokenizer the `tokenizers` library can read",),
    ),
    Bad(
        "tokenizer.json of no known model",
        load_tokenizer_of({"tokenizer.json": lambda t: t | {"model": {"type": "Nope"}}}),
        CheckpointError,
        ("tokenizer.json is not a tokenizer the `tokenizers` library can read",),
    ),
    Bad(
        "config.json's eos_token_id no token of tokenizer.json",
        load_tokenizer_of({"config.json": lambda c: c | {"eos_token_id": 310}}, vocab_size=320),
        ConfigError,
        ("config.json's eos_token_id 310 is no token of", "its ids: 0..299", "must belong to one model"),
    ),
    Bad(
        "model.safetensors missing",
        load_model({"model.safetensors": None}),
        CheckpointError,
        ("model.safetensors does not exist",),
    ),
    Bad(
        "only a pickled pytorch_model.bin",
        load_model({"model.safetensors": None, "pytorch_model.bin": TORCH_ZIP}),
        CheckpointError,
        ("model.safetensors does not exist", "pytorch_model.bin", "never loaded"),
    ),
    Bad(
        "config.json truncated",
        load_model({"config.json": Raw(lambda b: b[: len(b) // 2])}),
        CheckpointError,
        ("config.json is not valid JSON",),
    ),
    Bad(
        "config.json not UTF-8",
        load_model({"config.json": b"\xff\xfe{}"}),
        CheckpointError,
        ("config.json is not valid JSON", "utf-8"),
    ),
    Bad(
        "config.json integer with 5000 digits",
        load_model({"config.json": b'{"n_embd": ' + b"9" * 5000 + b"}"}),
        CheckpointError,
        ("config.json is not valid JSON", "digits"),
    ),
    Bad(
        "config.json not an object",
        load_model({"config.json": lambda c: [c]}),
        CheckpointError,
        ("config.json must be a JSON object", "list"),
    ),
    Bad(
        "config.json of another architecture",
        load_model({"config.json": lambda c: c | {"model_type": "llama"}}),
        CheckpointError,
        ("'llama'", "'gpt2'"),
    ),
    Bad(
        "config.json activation tinypeft does not compute",
        load_model({"config.json": lambda c: c | {"activation_function": "relu"}}),
        CheckpointError,
        ("activation_function='relu'", "gelu_new"),
    ),
    Bad(
        "config.json untied embeddings",
        load_model({"config.json": lambda c: c | {"tie_word_embeddings": False}}),
        CheckpointError,
        ("tie_word_embeddings=False", "(True,)"),
    ),
    Bad(
        "config.json lacks a size",
        load_model({"config.json": lambda c: {k: v for k, v in c.items() if k != "n_head"}}),
        CheckpointError,
        ("lacks ['n_head']", "vocab_size"),
    ),
    Bad(
        "config.json size of the wrong type",
        load_model({"config.json": lambda c: c | {"n_embd": "8"}}),
        CheckpointError,
        ("config.json", "n_embd", "'8'", "positive integer"),
    ),
    Bad(
        "config.json n_embd not divisible by n_head",
        load_model({"config.json": lambda c: c | {"n_head": 3}}),
        CheckpointError,
        ("config.json", "n_embd=8", "n_head=3"),
    ),
    Bad(
        "config.json huge n_embd (answered at once)",
        load_model({"config.json": lambda c: c | {"n_embd": 10**18 + 1, "n_head": 2}}),
        CheckpointError,
        ("n_embd=1000000000000000001", "n_head=2"),
    ),
    Bad(
        "config.json n_layer disagrees with the weights",
        load_model({"config.json": lambda c: c | {"n_layer": 3}}),
        CheckpointError,
        ("2 transformer block(s)", "n_layer=3"),
    ),
    Bad(
        "config.json huge n_layer (answered at once)",
        load_model({"config.json": lambda c: c | {"n_layer": 10**12}}),
        CheckpointError,
        ("2 transformer block(s)", "n_layer=1000000000000"),
    ),
    Bad(
        "model.safetensors larger than the memory",
        on_a_machine_with(8, lambda w: tp.GPT.from_pretrained(sparse_weights(w, 12 << 30))),
        ConfigError,
        ("reading model.safetensors needs about 12.0 GiB", "8.0 GiB available"),
    ),
    Bad(
        "config.json n_embd disagrees with the weights",
        load_model({"config.json": lambda c: c | {"n_embd": 16}}),
        CheckpointError,
        ("has shape", "; this GPTConfig needs"),
    ),
    Bad("model.safetensors empty", load_model({"model.safetensors": b""}), CheckpointError, ("truncated", "0 bytes")),
    Bad(
        "model.safetensors truncated",
        load_model({"model.safetensors": Raw(lambda b: b[: len(b) // 2])}),
        CheckpointError,
        ("model.safetensors is", "truncated"),
    ),
    Bad(
        "model.safetensors not safetensors",
        load_model({"model.safetensors": b"hello, this is text" * 10}),
        CheckpointError,
        ("model.safetensors is", "not safetensors"),
    ),
    Bad(
        "model.safetensors with a corrupt header",
        load_model({"model.safetensors": Raw(lambda b: b[:8] + b"[" + b[9:])}),
        CheckpointError,
        ("model.safetensors is not a valid safetensors file",),
    ),
    Bad(
        "model.safetensors is a pickle",
        load_model({"model.safetensors": pickle.dumps({"a": 1}, protocol=4)}),
        CheckpointError,
        ("pickle", "never loads pickles", "safetensors"),
    ),
    Bad(
        "model.safetensors is a torch .bin",
        load_model({"model.safetensors": TORCH_ZIP}),
        CheckpointError,
        ("torch .bin/.pt", "never loads pickles"),
    ),
    Bad(
        "model.safetensors in bfloat16",
        load_model(
            {
                "model.safetensors": safetensors_bytes(
                    {"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)
                )
            }
        ),
        CheckpointError,
        ("dtype BF16", "float32"),
    ),
    Bad(
        "weights with an unexpected name",
        load_model({"model.safetensors": renamed_first}),
        CheckpointError,
        ("unexpected tensor", ".renamed", "expected names like"),
    ),
    Bad(
        "weights lacking a tensor",
        load_model({"model.safetensors": without_first}),
        CheckpointError,
        ("lacks 1 tensor(s)",),
    ),
    Bad(
        "weights of the wrong shape",
        load_model({"model.safetensors": first_tensor(lambda a: a[:1])}),
        CheckpointError,
        ("has shape (1,)", "needs (24,)"),
    ),
    Bad(
        "weights of an integer dtype",
        load_model({"model.safetensors": first_tensor(lambda a: a.astype(np.int32))}),
        CheckpointError,
        ("dtype int32", "floating point"),
    ),
    Bad(
        "lm_head differs from wte",
        load_model({"model.safetensors": lambda t: t | {"lm_head.weight": t["transformer.wte.weight"] + 1}}),
        CheckpointError,
        ("lm_head.weight differs", "ties"),
    ),
    Bad(
        "a tensor given with and without the transformer. prefix",
        load_model({"model.safetensors": lambda t: t | {"wte.weight": t["transformer.wte.weight"]}}),
        CheckpointError,
        ("'transformer.wte.weight' appears twice",),
    ),
    Bad(
        "load_state_dict given a list",
        lambda w: tp.GPT(CFG).load_state_dict([1, 2]),
        CheckpointError,
        ("map tensor names to arrays", "list"),
    ),
    Bad(
        "load_state_dict with a non-string name",
        lambda w: tp.GPT(CFG).load_state_dict({0: np.zeros(2)}),
        CheckpointError,
        ("strings", "0"),
    ),
    Bad(
        "load_state_dict with a value that is not an array",
        lambda w: tp.GPT(CFG).load_state_dict(w.base.state_dict() | {"transformer.wte.weight": [[1.0], [1.0, 2.0]]}),
        CheckpointError,
        ("'transformer.wte.weight' is not an array", "list"),
    ),
    Bad(
        "adapter folder missing",
        lambda w: tp.PeftModel.from_pretrained(w.base, w.root / "nope"),
        CheckpointError,
        ("nope", "not a folder", "adapter_config.json", "adapter_model.safetensors"),
    ),
    Bad(
        "adapter_config.json missing",
        load_adapter({"adapter_config.json": None}),
        CheckpointError,
        ("adapter_config.json does not exist",),
    ),
    Bad(
        "adapter_model.safetensors missing",
        load_adapter({"adapter_model.safetensors": None}),
        CheckpointError,
        ("adapter_model.safetensors does not exist",),
    ),
    Bad(
        "only a pickled adapter_model.bin",
        load_adapter({"adapter_model.safetensors": None, "adapter_model.bin": TORCH_ZIP}),
        CheckpointError,
        ("adapter_model.safetensors does not exist", "adapter_model.bin", "never loaded"),
    ),
    Bad(
        "adapter_config.json truncated",
        load_adapter({"adapter_config.json": Raw(lambda b: b[:-3])}),
        CheckpointError,
        ("adapter_config.json is not valid JSON",),
    ),
    Bad(
        "adapter_config.json not an object",
        load_adapter({"adapter_config.json": lambda c: "BITFIT"}),
        CheckpointError,
        ("adapter_config.json must be a JSON object", "str"),
    ),
    Bad(
        "adapter_config.json of an unknown method",
        load_adapter({"adapter_config.json": lambda c: c | {"peft_type": "NOT_A_METHOD"}}),
        CheckpointError,
        ("'NOT_A_METHOD'", "tinypeft loads", "BITFIT"),
    ),
    Bad(
        "adapter_config.json without peft_type",
        load_adapter({"adapter_config.json": lambda c: {k: v for k, v in c.items() if k != "peft_type"}}),
        CheckpointError,
        ("peft_type None", "BITFIT"),
    ),
    Bad(
        "adapter_config.json peft_type not a string",
        load_adapter({"adapter_config.json": lambda c: c | {"peft_type": ["BITFIT"]}}),
        CheckpointError,
        ("peft_type ['BITFIT']", "tinypeft loads"),
    ),
    Bad(
        "adapter_config.json field of the wrong type",
        load_adapter({"adapter_config.json": lambda c: c | {"peft_type": "SELECTIVE", "patterns": 5}}),
        ConfigError,
        ("patterns", "5", "list of glob strings"),
    ),
    Bad(
        "adapter_config.json of another method than its weights",
        load_adapter({"adapter_config.json": lambda c: c | {"peft_type": "LN_TUNING"}}),
        CheckpointError,
        ("LN_TUNING adapter tensors do not match", "missing", "ln_tuning_layers", "unexpected", "c_attn.bias"),
    ),
    Bad(
        "adapter_config.json bottleneck_size 3,000,000, larger than the memory",
        on_a_machine_with(
            0.5,
            load_adapter(
                {"adapter_config.json": lambda c: c | {"peft_type": "BOTTLENECK_ADAPTER", "bottleneck_size": 3_000_000}}
            ),
        ),
        ConfigError,
        ("AdapterConfig's adapter needs about 0.8 GiB", "204,000,032 numbers", "0.5 GiB available"),
    ),
    Bad(
        "adapter saved for another base (n_layer)",
        lambda w: tp.PeftModel.from_pretrained(tp.GPT(CFG.replace(n_layer=1)), w.adapter_dir),
        CheckpointError,
        ("do not match this model", "unexpected", "transformer.h.1."),
    ),
    Bad(
        "adapter saved for another base (n_embd)",
        lambda w: tp.PeftModel.from_pretrained(tp.GPT(CFG.replace(n_embd=16)), w.adapter_dir),
        CheckpointError,
        ("has shape (8,)", "needs (16,)"),
    ),
    Bad(
        "adapter tensor of the wrong shape",
        load_adapter({"adapter_model.safetensors": first_tensor(lambda a: a[:2])}),
        CheckpointError,
        ("has shape (2,)", "needs (24,)"),
    ),
    Bad(
        "adapter tensor of an integer dtype",
        load_adapter({"adapter_model.safetensors": first_tensor(lambda a: a.astype(np.int64))}),
        CheckpointError,
        ("dtype int64", "floating point"),
    ),
    Bad(
        "adapter_model.safetensors truncated",
        load_adapter({"adapter_model.safetensors": Raw(lambda b: b[: len(b) - 7])}),
        CheckpointError,
        ("adapter_model.safetensors is truncated",),
    ),
    Bad(
        "adapter_model.safetensors is a pickle",
        load_adapter({"adapter_model.safetensors": pickle.dumps([1], protocol=2)}),
        CheckpointError,
        ("pickle", "never loads pickles"),
    ),
    Bad(
        "load_adapter_state_dict given a list",
        lambda w: w.peft().load_adapter_state_dict(["a"]),
        CheckpointError,
        ("map tensor names to arrays", "list"),
    ),
    Bad(
        "load_adapter_state_dict with a value that is not an array",
        lambda w: (lambda m: m.load_adapter_state_dict({k: [[0.0], []] for k in m.adapter_state_dict()}))(w.peft()),
        CheckpointError,
        ("is not an array", "list"),
    ),
    Bad(
        "load_adapter_state_dict with names of mixed types",
        lambda w: w.peft().load_adapter_state_dict({1: np.zeros(1), "x": np.zeros(1)}),
        CheckpointError,
        ("do not match", "unexpected ['x', 1]"),
    ),
]

# ------------------------------------------------------------------ training checkpoints
CHECKPOINT_CASES = [
    Bad(
        "resume with another method config",
        resume_with_another_alpha,
        CheckpointError,
        ("this is another run", "method.lora_alpha: now 5, saved 8", "or start a new run"),
    ),
    Bad(
        "a new run in a folder holding another run",
        lambda w: train(tp.GPT(CFG, seed=0), DATA, RUN, run_dir=str(w.variant(w.run_dir, {})), progress=False),
        ConfigError,
        ("holds another run's checkpoints", "--resume", "--overwrite"),
    ),
    Bad(
        "a run folder in use",
        run_folder_in_use,
        ConfigError,
        ("is in use by another tinypeft run (process 4242)", "another output folder"),
    ),
    Bad(
        "resume with no checkpoint",
        lambda w: w.resume(w.root / "empty"),
        CheckpointError,
        ("no checkpoint to resume from", "latest.json"),
    ),
    Bad(
        "latest.json truncated",
        resume({"checkpoints/latest.json": Raw(lambda b: b[:5])}),
        CheckpointError,
        ("latest.json is not valid JSON",),
    ),
    Bad(
        "latest.json not an object",
        resume({"checkpoints/latest.json": lambda c: [c]}),
        CheckpointError,
        ("latest.json must be", '"path": "step-NNNNNN"'),
    ),
    Bad(
        "latest.json pointing outside the run",
        resume({"checkpoints/latest.json": lambda c: c | {"path": "../.."}}),
        CheckpointError,
        ("latest.json must be", "'../..'"),
    ),
    Bad(
        "latest.json step not an integer",
        resume({"checkpoints/latest.json": lambda c: c | {"step": "2"}}),
        CheckpointError,
        ("step '2'", "integer >= 0"),
    ),
    Bad(
        "latest.json naming a missing checkpoint",
        resume({CHECKPOINT: None}),
        CheckpointError,
        ("names step-000002", "is not a folder"),
    ),
    Bad(
        "state.json missing",
        resume({f"{CHECKPOINT}/state.json": None}),
        CheckpointError,
        ("state.json does not exist",),
    ),
    Bad(
        "state.json not an object",
        resume({f"{CHECKPOINT}/state.json": lambda s: []}),
        CheckpointError,
        ("state.json must be a JSON object", "list"),
    ),
    Bad(
        "state.json lacking keys",
        resume({f"{CHECKPOINT}/state.json": lambda s: {k: v for k, v in s.items() if k not in ("rng", "result")}}),
        CheckpointError,
        ("lacks ['rng', 'result']", "step, rng, train_config, result and identity"),
    ),
    Bad(
        "state.json of another step than latest.json",
        resume({f"{CHECKPOINT}/state.json": lambda s: s | {"step": 3}}),
        CheckpointError,
        ("for step 3", "latest.json names step 2"),
    ),
    Bad(
        "checkpoint past the run's end",
        lambda w: w.resume(w.run_dir, dataclasses.replace(RUN, steps=1)),
        CheckpointError,
        ("for step 2", "past the run's 1 steps"),
    ),
    Bad(
        "resume with another training config",
        lambda w: w.resume(w.run_dir, dataclasses.replace(RUN, lr=0.5)),
        CheckpointError,
        ("differs", "'lr': (0.5, 0.003)", "same settings"),
    ),
    Bad(
        "state.json train_config not an object",
        resume({f"{CHECKPOINT}/state.json": lambda s: s | {"train_config": "adamw"}}),
        CheckpointError,
        ("train_config 'adamw'", "JSON object"),
    ),
    Bad(
        "state.json random-generator state broken",
        resume({f"{CHECKPOINT}/state.json": lambda s: s | {"rng": {"bit_generator": "PCG64"}}}),
        CheckpointError,
        ("invalid random-generator state",),
    ),
    Bad(
        "state.json dropout states not an object",
        resume({f"{CHECKPOINT}/state.json": lambda s: s | {"model_rng": True}}),
        CheckpointError,
        ("model_rng must be an object", "got bool"),
    ),
    Bad(
        "state.json dropout states for a model without dropout",
        resume({f"{CHECKPOINT}/state.json": lambda s: s | {"model_rng": {"_dropout_keys": {}}}}),
        CheckpointError,
        ("draws no random masks", "another kind of run"),
    ),
    Bad(
        "state.json history malformed",
        resume({f"{CHECKPOINT}/state.json": lambda s: s | {"result": s["result"] | {"train_losses": 5}}}),
        CheckpointError,
        ("malformed result", "train_losses and evals"),
    ),
    Bad(
        "checkpoint weights lacking a tensor",
        resume({f"{CHECKPOINT}/trainable.safetensors": without_first}),
        CheckpointError,
        ("other tensors than this model trains", "missing ['transformer.h.0.attn.c_attn.bias']"),
    ),
    Bad(
        "checkpoint weights of the wrong shape",
        resume({f"{CHECKPOINT}/trainable.safetensors": first_tensor(lambda a: a[:3])}),
        CheckpointError,
        ("shape (3,)", "model has (24,)"),
    ),
    Bad(
        "checkpoint weights of another dtype",
        resume({f"{CHECKPOINT}/trainable.safetensors": first_tensor(lambda a: a.astype(np.float64))}),
        CheckpointError,
        ("dtype float64", "model has float32"),
    ),
    Bad(
        "checkpoint weights file truncated",
        resume({f"{CHECKPOINT}/trainable.safetensors": Raw(lambda b: b[: len(b) // 3])}),
        CheckpointError,
        ("trainable.safetensors is", "truncated"),
    ),
    Bad(
        "optimizer state without its step counter",
        resume({f"{CHECKPOINT}/optimizer.safetensors": lambda t: {k: v for k, v in t.items() if k != "t"}}),
        CheckpointError,
        ("lacks its step counter 't'",),
    ),
    Bad(
        "optimizer step counter negative",
        resume({f"{CHECKPOINT}/optimizer.safetensors": lambda t: t | {"t": np.array([-1])}}),
        CheckpointError,
        ("'t' must be one integer >= 0", "-1"),
    ),
    Bad(
        "optimizer state of another optimizer",
        resume(
            {
                f"{CHECKPOINT}/optimizer.safetensors": lambda t: {
                    k.replace("exp_avg_sq/", "momentum/"): v for k, v in t.items()
                }
            }
        ),
        CheckpointError,
        ("slot 'momentum'", "AdamW keeps ['exp_avg', 'exp_avg_sq']"),
    ),
    Bad(
        "optimizer state lacking a slot",
        resume(
            {
                f"{CHECKPOINT}/optimizer.safetensors": lambda t: {
                    k: v for k, v in t.items() if k != "exp_avg_sq/transformer.wte.weight"
                }
            }
        ),
        CheckpointError,
        ("'transformer.wte.weight' lacks ['exp_avg_sq']",),
    ),
    Bad(
        "optimizer state for an unknown parameter",
        resume({f"{CHECKPOINT}/optimizer.safetensors": lambda t: t | {"exp_avg/nope": np.zeros(1, np.float32)}}),
        CheckpointError,
        ("'nope'", "not a trainable parameter"),
    ),
    Bad(
        "optimizer state of the wrong shape",
        resume({f"{CHECKPOINT}/optimizer.safetensors": lambda t: t | {"exp_avg/transformer.ln_f.bias": np.zeros(3)}}),
        CheckpointError,
        ("'exp_avg/transformer.ln_f.bias' has shape (3,)", "parameter is (8,)"),
    ),
    Bad(
        "optimizer state of an integer dtype",
        resume(
            {f"{CHECKPOINT}/optimizer.safetensors": lambda t: t | {"exp_avg/transformer.ln_f.bias": np.zeros(8, int)}}
        ),
        CheckpointError,
        ("dtype int64", "floating point"),
    ),
    Bad(
        "optimizer state loaded from a non-array",
        lambda w: AdamW().load_state_dict({"t": np.array([1]), "exp_avg/a": [[1.0], []]}, {"a": np.zeros(2)}),
        CheckpointError,
        ("'exp_avg/a' is not an array",),
    ),
    Bad(
        "optimizer.safetensors is a pickle",
        resume({f"{CHECKPOINT}/optimizer.safetensors": pickle.dumps(0)}),
        CheckpointError,
        ("pickle", "never loads pickles"),
    ),
    Bad(
        "LoRA run: state.json without the dropout generator's state",
        resume_lora({f"{CHECKPOINT}/state.json": lambda s: s | {"model_rng": {}}}),
        CheckpointError,
        ("LORA adapter random state holds []", "draws from ['_dropout_keys']"),
    ),
    Bad(
        "LoRA run: dropout generator state broken",
        resume_lora({f"{CHECKPOINT}/state.json": lambda s: s | {"model_rng": {"_dropout_keys": {"state": 1}}}}),
        CheckpointError,
        ("adapter random state '_dropout_keys' is invalid",),
    ),
]

# ------------------------------------------------------------------ numbers that stop a computation
NUMERIC_CASES = [
    Bad(
        "greedy generation from NaN weights",
        lambda w: nan_model().generate([[1, 2]], max_new_tokens=2),
        TrainingError,
        ("logits are not finite", "no next token"),
    ),
    Bad(
        "evaluate with batch_size -1",
        lambda w: evaluate(w.base, DATA, 8, batch_size=-1),
        ConfigError,
        ("evaluate: batch_size must be an integer >= 1", "-1"),
    ),
    Bad(
        "evaluate a batch larger than the memory",
        on_a_machine_with(
            16, lambda w: evaluate(tp.GPT(tp.GPTConfig()), np.zeros(4096 * 128, np.uint8), 128, 4096, 4096)
        ),
        ConfigError,
        ("evaluating a batch of 4,096 x 128 tokens needs about", "16.0 GiB available", "smaller batch_size"),
    ),
    Bad(
        "training loss becomes non-finite",
        lambda w: train(fails_at(tp.GPT(CFG), 2), DATA, RUN, progress=False),
        TrainingError,
        ("non-finite at step 2", "loss nan", "no update applied", "lower learning rate"),
    ),
    Bad(
        "weights become non-finite before a checkpoint",
        lambda w: train(overflows_at(tp.GPT(CFG), 4), DATA, RUN, run_dir=str(w.root / "overflow"), progress=False),
        TrainingError,
        ("after step 4", "non-finite values", "not saving", "step-000002"),
    ),
    Bad(
        "sampling from a model with NaN weights",
        lambda w: nan_model().generate(IDS, 2, temperature=1.0),
        TrainingError,
        ("logits are not finite", "non-finite"),
    ),
    Bad(
        "safe_merge of a non-finite adapter",
        lambda w: non_finite_bitfit().merge_and_unload(safe_merge=True),
        MergeError,
        ("safe_merge", "non-finite", "left unchanged"),
    ),
    Bad(
        "training a merged adapter",
        lambda w: merged_bitfit().loss_and_grad(IDS, IDS),
        MergeError,
        ("merged", "unmerge_adapter()"),
    ),
]


# ------------------------------------------------------------------ the command line
def command(*argv: str) -> Callable[[World], object]:
    """`tinypeft ARGV` as main() runs it, but raising the error main() prints in one line (exit status 2).
    {model}, {adapter}, {corpus} and {root} stand for the world's model, adapter, a small corpus file and
    folder; a str holding a lone surrogate U+DC80..U+DCFF is how Python hands over a byte that is not UTF-8."""
    from tinypeft.cli import COMMANDS, build_parser

    def run(w: World) -> object:
        corpus = w.root / "corpus.txt"
        if not corpus.exists():
            corpus.write_bytes(DATA.tobytes() * 4)  # bytes 0..31: tokens of the world's 32-token model
        paths = {"model": w.model_dir, "adapter": w.adapter_dir, "corpus": corpus, "root": w.root}
        args = build_parser().parse_args([a.format(**paths) for a in argv])
        return COMMANDS[args.command](args)

    return run


def exits_at_import(w: World) -> Path:
    path = Path(tempfile.mkdtemp(dir=w.root, prefix="port-")) / "port.py"
    path.write_text("import sys\n\nsys.exit(0)\n")
    return path


def byte_model_of_512_tokens(w: World) -> Path:
    """A model of 512 tokens whose every next token is 300: its final LayerNorm outputs its bias v alone,
    and token 300's embedding (the tied head's row) is 10 v."""
    model = tp.GPT(CFG.replace(vocab_size=512), seed=0)
    v = np.linspace(-1.0, 1.0, CFG.n_embd, dtype=np.float32)
    model.params["transformer.ln_f.weight"] = np.zeros_like(v)
    model.params["transformer.ln_f.bias"] = v
    model.params["transformer.wte.weight"] = model.params["transformer.wte.weight"].copy()
    model.params["transformer.wte.weight"][300] = 10 * v
    folder = Path(tempfile.mkdtemp(dir=w.root, prefix="model-512-"))
    model.save_pretrained(folder)
    return folder


EVAL = ("eval", "--model", "{model}", "--corpus", "{corpus}", "--seq_len", "8", "--eval_windows", "2")
FINETUNE = ("finetune", "--base", "{model}", "--corpus", "{corpus}", "--prose_corpus", "{corpus}", "--out", "{root}/ft")
COMMAND_LINE_CASES = [
    Bad("eval --batch_size 0", command(*EVAL, "--batch_size", "0"), ConfigError, ("batch_size", ">= 1", "got 0")),
    Bad("eval --batch_size -1", command(*EVAL, "--batch_size", "-1"), ConfigError, ("batch_size", ">= 1", "got -1")),
    Bad("eval --eval_windows 0", command(*EVAL, "--eval_windows", "0"), ConfigError, ("max_windows", ">= 1", "got 0")),
    Bad("eval --seq_len 0", command(*EVAL, "--seq_len", "0"), ConfigError, ("seq_len must be", ">= 2", "got 0")),
    Bad(
        "pretrain --seq_len 0",
        command("pretrain", "--seq_len", "0", "--out", "{root}/pre", "--corpus", "{corpus}"),
        ConfigError,
        ("seq_len must be an integer >= 1; got 0",),
    ),
    Bad(
        "finetune --prompt_bytes 0",
        command(*FINETUNE, "--prompt_bytes", "0"),
        ConfigError,
        ("--prompt_bytes must be an integer >= 1", "got 0"),
    ),
    Bad(
        "finetune --sample_bytes -1",
        command(*FINETUNE, "--sample_bytes", "-1"),
        ConfigError,
        ("--sample_bytes must be an integer >= 0", "got -1"),
    ),
    Bad(
        "finetune --prompt of bytes that are not UTF-8",
        command(*FINETUNE, "--prompt", "caf\udce9"),
        ConfigError,
        ("--prompt b'caf\\xe9' is not UTF-8 (byte 0xe9 at 3)", "`tinypeft generate --prompt` takes any bytes"),
    ),
    Bad(
        "finetune --prompt_tuning_init_text of bytes that are not UTF-8",
        command(*FINETUNE, "--method", "prompt", "--prompt_tuning_init", "TEXT", "--prompt_tuning_init_text", "\udcff"),
        ConfigError,
        ("prompt_tuning_init_text must be text", "'\\udcff' at 0", "a byte of the command line that is not UTF-8"),
    ),
    Bad(
        "finetune --prefix_init_text of bytes that are not UTF-8",
        command(*FINETUNE, "--method", "prefix", "--prefix_init", "TEXT", "--prefix_init_text", "\udcff"),
        ConfigError,
        ("prefix_init_text must be text", "'\\udcff' at 0", "a byte of the command line that is not UTF-8"),
    ),
    Bad("generate --prompt empty", command("generate", "--prompt", ""), ConfigError, ("--prompt must not be empty",)),
    Bad(
        "generate --prompt holding a character that is no byte",
        command("generate", "--prompt", "a\ud800"),
        ConfigError,
        ("--prompt 'a\\ud800' holds a character that stands for no byte sequence",),
    ),
    Bad(
        "generate from a model whose tokens are not bytes",
        lambda w: command(
            "generate", "--model", str(byte_model_of_512_tokens(w)), "--prompt", "ab", "--max_new_tokens", "8"
        )(w),
        ConfigError,
        ("the model generated token id 300, which is no byte", "ids 0..255"),
    ),
    Bad(
        "eval on a folder with tokenizer.json: a corpus that is not UTF-8",
        lambda w: command("eval", "--model", str(bpe_folder(w)), "--corpus", str(latin1_corpus(w)))(w),
        ConfigError,
        ("corpus", "latin1.txt is not UTF-8 (byte 0xe9 at offset 6)", "UTF-8 text only", "byte-level base"),
    ),
    Bad(
        "generate on a folder with tokenizer.json: a --prompt that is not UTF-8",
        lambda w: command("generate", "--model", str(bpe_folder(w)), "--prompt", "caf\udce9")(w),
        ConfigError,
        ("--prompt is not UTF-8 (byte 0xe9 at offset 3)", "tokenizer.json tokenizes text"),
    ),
    Bad(
        "check-vectors --impl that calls sys.exit at import",
        lambda w: load_impl(str(exits_at_import(w))),
        ConfigError,
        ("port.py: importing it called sys.exit(0) instead of returning",),
    ),
]


# ------------------------------------------------------------------ several adapters at once (issue 14)
def two_loras(second: tp.PeftConfig | None = None) -> tp.PeftModel:
    """LoRA adapters "first" (r 2 on c_attn) and "second" (r 4 on c_proj, or `second`)."""
    model = tp.get_peft_model(tp.GPT(CFG, seed=0), tp.LoraConfig(r=2), adapter_name="first")
    model.add_adapter("second", second or tp.LoraConfig(r=4, target_modules=["c_proj"]))
    return model


def combine(second: tp.PeftConfig | None = None, **kwargs) -> Callable[[World], object]:
    kwargs = {"adapters": ["first", "second"], "weights": [1.0, 0.5], "adapter_name": "mix"} | kwargs
    return lambda w: two_loras(second).add_weighted_adapter(**kwargs)


def lorafa_over(model: tp.PeftModel, adapter: str) -> LoraFA:
    model.set_adapter(adapter)
    return LoraFA(model)


SEVERAL_ADAPTER_CASES = [
    Bad(
        "add_weighted_adapter: an unknown adapter",
        combine(adapters=["first", "third"]),
        ConfigError,
        ("'third'", "['first', 'second']"),
    ),
    Bad(
        "add_weighted_adapter: weights of the wrong length",
        combine(weights=[1.0]),
        ConfigError,
        ("weights has 1 value(s) for 2 adapters", "one weight each"),
    ),
    Bad(
        "add_weighted_adapter: a weight that is not a finite number",
        combine(weights=[1.0, float("nan")]),
        ConfigError,
        ("[1.0, nan]", "finite numbers"),
    ),
    Bad(
        "add_weighted_adapter: an unknown combination_type",
        combine(combination_type="average"),
        ConfigError,
        ("'average'", "'svd'", "'cat'", "'dare_ties_svd'"),
    ),
    Bad(
        "add_weighted_adapter: adapters of different ranks combined linearly",
        combine(combination_type="linear"),
        ConfigError,
        ("'linear'", "one rank", "{'first': 2, 'second': 4}", "'cat' or an svd type"),
    ),
    Bad(
        "add_weighted_adapter: a LoRA and an IA3 adapter",
        combine(tp.IA3Config()),
        ConfigError,
        ("combines LoRA adapters", "'second' is IA3"),
    ),
    Bad(
        "add_weighted_adapter: a DoRA adapter",
        combine(tp.LoraConfig(r=2, use_dora=True)),
        ConfigError,
        ("'second' is DoRA", "not a low-rank product", "#3761"),
    ),
    Bad(
        "add_weighted_adapter: cat past min(in, out)",
        combine(tp.LoraConfig(r=8), combination_type="cat"),
        ConfigError,
        ("'cat' gives rank 10", "min(in, out) = 8", "svd_rank"),
    ),
    Bad(
        "add_weighted_adapter: a pruning type without density",
        combine(combination_type="ties"),
        ConfigError,
        ("'ties' needs density", "(0, 1]", "None"),
    ),
    Bad(
        "add_weighted_adapter: density for a type that does not prune",
        combine(combination_type="svd", density=0.5),
        ConfigError,
        ("density=0.5", "applies only to the ties, dare and magnitude_prune types", "not to 'svd'"),
    ),
    Bad(
        "add_weighted_adapter: svd_rank for a type without an SVD",
        combine(combination_type="cat", svd_rank=2),
        ConfigError,
        ("svd_rank=2", "applies only to the svd types"),
    ),
    Bad(
        "add_weighted_adapter: svd_clamp outside [0, 1]",
        combine(svd_clamp=1.5),
        ConfigError,
        ("svd_clamp", "1.5", "[0, 1]"),
    ),
    Bad(
        "add_weighted_adapter: an unknown majority_sign_method",
        combine(combination_type="ties", density=0.5, majority_sign_method="mean"),
        ConfigError,
        ("'mean'", "'total'", "'frequency'"),
    ),
    Bad(
        "add_weighted_adapter: a name in use",
        combine(adapter_name="first"),
        ConfigError,
        ("'first'", "names in use"),
    ),
    Bad(
        "set_adapter: several adapters, one of them DoRA",
        lambda w: two_loras(tp.LoraConfig(r=2, use_dora=True)).set_adapter(["first", "second"]),
        ConfigError,
        ("several active adapters add their updates", "'second' cannot", "DoRA"),
    ),
    Bad(
        "set_adapter: several adapters, one of them IA3",
        lambda w: two_loras(tp.IA3Config()).set_adapter(["first", "second"]),
        ConfigError,
        ("'second' cannot: it is IA3", "['first', 'second']"),
    ),
    Bad(
        "set_adapter: a name twice",
        lambda w: two_loras().set_adapter(["first", "first"]),
        ConfigError,
        ("distinct names", "['first', 'first']"),
    ),
    Bad(
        "model.active with several adapters active",
        lambda w: (m := two_loras(), m.set_adapter(["first", "second"]), m.active),
        ConfigError,
        ("several adapters are active", "by name"),
    ),
    Bad(
        "LoRA-FA over a DoRA adapter",
        lambda w: lorafa_over(two_loras(tp.LoraConfig(r=2, use_dora=True)), "second"),
        ConfigError,
        ("LoRA-FA", "A frozen", "'second' is DoRA"),
    ),
    Bad(
        "LoRA+ with an optimizer class that is not tinypeft's",
        lambda w: create_loraplus_optimizer(two_loras(), dict, lr=1e-3, loraplus_lr_ratio=16),
        ConfigError,
        ("optimizer_cls", "tinypeft optimizer class", "AdamW, SGD"),
    ),
    Bad(
        "LoRA+ with a negative loraplus_lr_ratio",
        lambda w: create_loraplus_optimizer(two_loras(), AdamW, lr=1e-3, loraplus_lr_ratio=-2),
        ConfigError,
        ("loraplus_lr_ratio", "-2", ">= 0"),
    ),
    Bad(
        "a storage dtype the precision model does not know",
        lambda w: round_to(np.ones(3), "int8"),
        ConfigError,
        ("storage dtype", "'float16'", "'bfloat16'", "'int8'"),
    ),
    Bad(
        "mixed batch: adapter_names of the wrong length",
        lambda w: two_loras()(IDS, adapter_names=["first"]),
        InputError,
        ("adapter_names has 1 name(s) for a batch of 2 row(s)", "'__base__'"),
    ),
    Bad(
        "mixed batch: an unknown adapter name",
        lambda w: two_loras().generate(IDS, 2, adapter_names=["first", "third"]),
        InputError,
        ("unknown adapter(s) ['third']", "['first', 'second']", "'__base__'"),
    ),
    Bad(
        "mixed batch: adapter_names not a list",
        lambda w: two_loras()(IDS, adapter_names="first"),
        InputError,
        ("adapter_names must be a list", "'first'"),
    ),
    Bad(
        "mixed batch in training mode",
        lambda w: two_loras().train()(IDS, adapter_names=["first", "second"]),
        ConfigError,
        ("for inference", "model.eval()"),
    ),
    Bad(
        "mixed batch with a prompt-tuning adapter",
        lambda w: two_loras(tp.PromptTuningConfig(num_virtual_tokens=2))(IDS, adapter_names=["first", "second"]),
        ConfigError,
        ("'second' (PROMPT_TUNING)", "linear layers only"),
    ),
]

SECTIONS = {
    "Configurations": CONFIG_CASES,
    "Method configurations": METHOD_CASES,
    "Several adapters, LoRA+ and LoRA-FA": SEVERAL_ADAPTER_CASES,
    "Call-time inputs": INPUT_CASES,
    "Model and adapter files": FILE_CASES,
    "Training checkpoints (resume)": CHECKPOINT_CASES,
    "Non-finite numbers": NUMERIC_CASES,
    "Command line": COMMAND_LINE_CASES,
}
CASES = [case for cases in SECTIONS.values() for case in cases]
# which test module checks which sections (test_catalogue.py: every section exactly once)
AREAS = {
    "config": ["Configurations", "Method configurations", "Several adapters, LoRA+ and LoRA-FA"],
    "input": ["Call-time inputs", "Non-finite numbers", "Command line"],
    "file": ["Model and adapter files"],
    "checkpoint": ["Training checkpoints (resume)"],
}


def cases_of(area: str) -> list[Bad]:
    return [case for section in AREAS[area] for case in SECTIONS[section]]


# ------------------------------------------------------------------ checking a case
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """The world the cases break, once per test module (import it there: `from catalogue import world`)."""
    return World.create(tmp_path_factory.mktemp("world"))


def assert_refused(world: World, case: Bad) -> None:
    """The case's call raises exactly its error type, a builtin's subclass, with every fragment in one line."""
    with pytest.raises(TinyPeftError) as info, time_bound(30):  # some cases guard against hangs
        case.call(world)
    error = info.value
    assert type(error) is case.error, f"{type(error).__name__}: {error}"
    assert isinstance(error, (ValueError, TypeError, RuntimeError))
    message = str(error)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message, "one line, so the CLI prints one line"


def ids(cases: list[Bad]) -> list[str]:
    return [c.when for c in cases]


# ------------------------------------------------------------------ docs/errors.md
def markdown(world: World) -> str:
    """docs/errors.md: every case of the catalogue with the message tinypeft gives for it."""
    lines = [
        "# Errors",
        "",
        "Every error tinypeft raises on purpose is one of the types in `tinypeft/errors.py`, all subclasses of",
        "`TinyPeftError` and of the builtin a caller would expect, so `except ValueError` keeps working:",
        "",
        "| type | base | for |",
        "|---|---|---|",
        "| `ConfigError` | `ValueError` | a model, method, optimizer or training configuration that cannot work |",
        "| `InputError` | `ValueError` | bad call-time input: token ids, labels, attention masks, generate arguments |",
        "| `InputTypeError` | `TypeError` | input of the wrong type (float or bool token ids, string masks) |",
        "| `CheckpointError` | `ValueError` | a file or folder that cannot be loaded: missing, truncated, corrupt, a "
        "pickle, wrong names/shapes/dtypes, written for another model, method or optimizer |",
        "| `MergeError` | `ValueError` | a merge that cannot be done (non-finite result, merged state) |",
        "| `TrainingError` | `RuntimeError` | a computation that became non-finite (training loss, weights before a "
        "checkpoint, logits when sampling) |",
        "",
        "Each message says what was wrong and what is allowed. A load that fails changes nothing (the model,",
        "adapter or optimizer is left as it was), and no pickle is ever unpickled. Every file is written to a",
        "temporary name in its folder, flushed, fsynced and renamed, so a killed process leaves the previous",
        "file whole. The command line prints the message on one line and exits with status 2 (an error of",
        "the operating system, such as a full disk or an unwritable --out, also in one line, with status 1).",
        "",
        "Every loader is fuzzed with damaged files (`tests/files/test_fuzz.py`; `TINYPEFT_FUZZ_EXAMPLES=N` for a",
        "longer run): only these error types may come out, never another exception, a crash or a hang.",
        "The command line is fuzzed too (`tests/e2e/test_cli_fuzz.py`; `TINYPEFT_CLI_FUZZ_EXAMPLES=N` for a longer",
        "run): an argv for every subcommand drawn from its own options with hostile values (numbers that are not",
        "sizes, bytes that are not UTF-8, FIFOs, links, missing files, ports that exit), each run in a process of",
        "its own under a time bound, must end with status 0, 1 or 2 (check-vectors: 1 when a case fails), one",
        "line on stderr when it fails, never a traceback or a hang.",
        "",
        "The catalogue below is generated from `tests/errors/catalogue.py`, where each row is a test",
        "(`PYTHONPATH=.:tests python tests/errors/catalogue.py > docs/errors.md`); paths are shortened to `<dir>`.",
        "The method configurations come from each method's file (`MethodSpec.error_cases`).",
        f"It has {len(CASES)} cases.",
    ]
    root = str(world.root)
    for section, cases in SECTIONS.items():
        lines += ["", f"## {section}", "", "| when | error | message |", "|---|---|---|"]
        for case in cases:
            try:
                case.call(world)
                message = "(no error: the catalogue test fails)"
            except TinyPeftError as e:
                message = str(e)
            message = re.sub(re.escape(root) + r"/[^/\s]*", "<dir>", message).replace("|", "\\|")
            lines.append(f"| {case.when} | `{case.error.__name__}` | {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        sys.stdout.write(markdown(World.create(Path(folder))))
