"""Fuzzing every loader: random bytes, truncations, bit flips, overwritten and deleted spans of
valid files, and structural edits of valid JSON. A loader may load the damaged file or refuse it
with one of tinypeft's error types; anything else that comes out (another exception, a crash of
the worker, or an example running past the time bound) fails the test.

The loaders: GPT.from_pretrained (config.json, model.safetensors), PeftModel.from_pretrained
(adapter_config.json, adapter_model.safetensors), resuming training from a checkpoint (latest.json,
state.json, trainable.safetensors, optimizer.safetensors), the golden vectors (index.json, and a case's
case.json, weights.safetensors, expected.safetensors), and the config parsers on arbitrary
JSON (GPTConfig.from_hf_dict, PeftConfig.from_dict then get_peft_model). Whatever loads is then
used (a forward pass, the resumed training steps, tinypeft run on the golden case and compared), so a
value that slips through a loader and breaks later is caught too.

Sizes: TINYPEFT_FUZZ_EXAMPLES examples per target (default 40: the bounded run in the normal
suite); TINYPEFT_FUZZ_SECONDS is the time bound per example (default 10). For example
`TINYPEFT_FUZZ_EXAMPLES=2000 python -m pytest tests/files/test_fuzz.py -n 2 -rP` (-rP prints the counts).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import TimeBoundExceeded, time_bound

import tinypeft as tp
from tinypeft.errors import TinyPeftError
from tinypeft.methods.base import CONFIG_TYPES
from tinypeft.train import TrainConfig, train
from tinypeft.vectors import compare, export_vectors, load_vectors, run_case

EXAMPLES = int(os.environ.get("TINYPEFT_FUZZ_EXAMPLES", "40"))
TIME_BOUND_S = float(os.environ.get("TINYPEFT_FUZZ_SECONDS", "10"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # the examples come from the seed alone: no replay of saved failures between runs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

CFG = tp.GPTConfig(vocab_size=32, n_positions=32, n_embd=8, n_layer=2, n_head=2)  # room for 20 virtual tokens
IDS = np.arange(6).reshape(2, 3)
DATA = np.random.default_rng(0).integers(0, 32, size=400).astype(np.uint8)
RUN = TrainConfig(steps=3, batch_size=2, seq_len=8, warmup_steps=0, eval_every=0, eval_windows=1, checkpoint_every=2)
CHECKPOINT = "checkpoints/step-000002"
# golden cases to damage: PiSSA with DoRA (an SVD of the loaded weights, a padding mask, a derived tensor) and
# prompt tuning from text (virtual tokens, a config the init reads)
VECTOR_CASES = ("pissa-rank1-float32", "prompt_tuning-text-float64")


def outcome(use: Callable[[], object]) -> str:
    """ "loaded" or "refused" (a tinypeft error); any other exception, or the time bound, propagates."""
    with time_bound(TIME_BOUND_S), np.errstate(all="ignore"):  # damaged weights may overflow: not an error
        try:
            use()
        except TinyPeftError:
            return "refused"
    return "loaded"


# ------------------------------------------------------------------ mutations
@st.composite
def damaged(draw, valid: bytes, header_end: int | None = None) -> bytes:
    """A damaged copy of `valid`. header_end, for safetensors, is where the JSON header ends:
    half of the bit flips land in it, where they change names, dtypes, shapes and offsets."""
    n = len(valid)
    kind = draw(st.sampled_from(["random", "truncate", "flip", "overwrite", "delete", "insert", "header-prefix"]))
    if kind == "random":
        return draw(st.binary(max_size=2 * n))
    if kind == "truncate":
        return valid[: draw(st.integers(0, n - 1))]
    if kind == "header-prefix":  # a valid header, then garbage: past the first checks
        cut = header_end or n // 2
        return valid[:cut] + draw(st.binary(max_size=n - cut + 64))
    data = bytearray(valid)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            end = header_end if header_end and draw(st.booleans()) else n
            at = draw(st.integers(0, end - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    start = draw(st.integers(0, n - 1))
    length = draw(st.integers(1, 64))
    if kind == "overwrite":
        data[start : start + length] = draw(st.binary(min_size=length, max_size=length))
    elif kind == "delete":
        del data[start : start + length]
    else:  # insert
        data[start:start] = draw(st.binary(min_size=1, max_size=length))
    return bytes(data)


def json_values(max_leaves: int = 8) -> st.SearchStrategy:
    """Any JSON value, with the numbers a config can go wrong with."""
    scalars = (
        st.none()
        | st.booleans()
        | st.sampled_from([0, 1, -1, 2, 3, 8, 16, 10**12, 10**18, 2**64, -(2**63), 0.5, 1e-5, 1e308])
        | st.integers()
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.sampled_from(["", "gpt2", "float32", "float64", "BITFIT", "LN_TUNING", "SELECTIVE", "step-000002"])
        | st.text(max_size=12)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=max_leaves,
    )


def json_paths(value: object, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (keys and indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, (*prefix, i))


@st.composite
def edited_json(draw, valid: object) -> object:
    """`valid` with one value replaced or removed somewhere, or a key added, or replaced whole."""
    doc = copy.deepcopy(valid)
    path = draw(st.sampled_from(list(json_paths(doc))))
    kind = draw(st.sampled_from(["replace", "remove", "add"]))
    if not path:
        return draw(json_values())
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if kind == "replace":
        parent[path[-1]] = draw(json_values())
    elif kind == "remove":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=12))] = draw(json_values())
    else:
        parent.insert(draw(st.integers(0, len(parent))), draw(json_values()))
    return doc


# ------------------------------------------------------------------ targets
# a config for each method whose defaults do not apply to any model; every other registered method is
# fuzzed with its default config, so a method file joins these tests when it registers
METHOD_CONFIGS: dict[str, Callable[[], tp.PeftConfig]] = {
    "SELECTIVE": lambda: tp.SelectiveConfig(["*.ln_1.*"]),
    "OFT": lambda: tp.OFTConfig(oft_block_size=4),  # the default blocks of 32 are wider than the fuzz model
    # AdaLoRA needs its run's length; a rank pattern makes the file a pruned one (ranks 2 and 1 of init_r 3)
    "ADALORA": lambda: tp.AdaLoraConfig(
        init_r=3,
        target_r=1,
        total_step=10,
        rank_pattern={f"transformer.h.{i}.attn.c_attn.lora_E": [True, i == 0, False] for i in range(CFG.n_layer)},
    ),
    "TRAINABLE_TOKENS": lambda: tp.TrainableTokensConfig(token_indices=[3, 0]),  # no default: ids are required
}


@dataclass
class Valid:
    """Valid files to damage: a saved model, a saved adapter of every method, a run checkpointed at step 2."""

    root: Path
    base: tp.GPT
    folders: dict[str, Path]
    unusable: dict[str, str]  # peft_type -> why its default config does not apply to the fuzz model

    def source(self, folder: str) -> Path:
        if folder in self.unusable:
            pytest.fail(f"{folder}'s default config does not fit the fuzz model ({self.unusable[folder]}); "
                        "give it one in METHOD_CONFIGS")  # fmt: skip
        return self.folders[folder]

    def copy(self, source: Path, rel: str, content: bytes) -> Path:
        dest = Path(tempfile.mkdtemp(dir=self.root))
        shutil.copytree(source, dest, dirs_exist_ok=True)
        (dest / rel).write_bytes(content)
        return dest


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    root = tmp_path_factory.mktemp("fuzz")
    base = tp.GPT(CFG, seed=0)
    base.save_pretrained(root / "model")
    folders = {"model": root / "model", "run": root / "run"}
    unusable = {}
    for peft_type, config_type in CONFIG_TYPES.items():
        try:
            adapter = tp.get_peft_model(base, METHOD_CONFIGS.get(peft_type, config_type)())
        except TinyPeftError as e:
            unusable[peft_type] = str(e)
            continue
        rng = np.random.default_rng(0)  # tensors away from their initial values (LoRA's B = 0, say)
        for p in adapter.trainable_parameters().values():
            p += 0.1 * rng.standard_normal(p.shape).astype(p.dtype)
        adapter.save_pretrained(root / peft_type)
        folders[peft_type] = root / peft_type
    train(tp.GPT(CFG, seed=0), DATA, RUN, run_dir=str(root / "run"), progress=False, stop_after=2)
    train(lora_with_dropout(), DATA, RUN, run_dir=str(root / "lora-run"), progress=False, stop_after=2)
    folders["lora-run"] = root / "lora-run"
    export_vectors(root / "vectors", VECTOR_CASES)
    folders["vectors"] = root / "vectors"
    return Valid(root, base, folders, unusable)


def use_model(v: Valid, folder: Path) -> None:
    tp.GPT.from_pretrained(folder)(IDS)


def use_adapter(v: Valid, folder: Path) -> None:
    tp.PeftModel.from_pretrained(v.base, folder)(IDS)


def use_run(v: Valid, folder: Path) -> None:
    train(tp.GPT(CFG, seed=0), DATA, RUN, run_dir=str(folder), resume=True, progress=False)


def lora_with_dropout() -> tp.PeftModel:
    return tp.get_peft_model(tp.GPT(CFG, seed=0), tp.LoraConfig(r=2, lora_dropout=0.1))


def use_lora_run(v: Valid, folder: Path) -> None:
    train(lora_with_dropout(), DATA, RUN, run_dir=str(folder), resume=True, progress=False)


def use_vectors(v: Valid, folder: Path) -> None:
    for case in load_vectors(folder):
        compare(case, run_case(case.port_input()))


# name -> (folder, file in it, how to load and use the folder). Damaged bytes of a JSON file mostly stop
# at the JSON parser, which is the same for every method: one adapter_config.json has them.
FILE_TARGETS = {
    "model config.json": ("model", "config.json", use_model),
    "model.safetensors": ("model", "model.safetensors", use_model),
    "adapter_config.json": ("BITFIT", "adapter_config.json", use_adapter),
    **{
        f"{peft_type} adapter_model.safetensors": (peft_type, "adapter_model.safetensors", use_adapter)
        for peft_type in sorted(CONFIG_TYPES)
    },
    "checkpoint latest.json": ("run", "checkpoints/latest.json", use_run),
    "checkpoint state.json": ("run", f"{CHECKPOINT}/state.json", use_run),
    "checkpoint trainable.safetensors": ("run", f"{CHECKPOINT}/trainable.safetensors", use_run),
    "checkpoint optimizer.safetensors": ("run", f"{CHECKPOINT}/optimizer.safetensors", use_run),
    "vectors index.json": ("vectors", "index.json", use_vectors),
    **{
        f"vectors {file}": ("vectors", f"{VECTOR_CASES[0]}/{file}", use_vectors)
        for file in ("case.json", "weights.safetensors", "expected.safetensors")
    },
}
JSON_TARGETS = {
    "model config.json": ("model", "config.json", use_model),
    **{
        f"{peft_type} adapter_config.json": (peft_type, "adapter_config.json", use_adapter)
        for peft_type in sorted(CONFIG_TYPES)
    },
    "checkpoint latest.json": ("run", "checkpoints/latest.json", use_run),
    "checkpoint state.json": ("run", f"{CHECKPOINT}/state.json", use_run),
    "LoRA-with-dropout checkpoint state.json": ("lora-run", f"{CHECKPOINT}/state.json", use_lora_run),
    "vectors index.json": ("vectors", "index.json", use_vectors),
    **{f"vectors {case} case.json": ("vectors", f"{case}/case.json", use_vectors) for case in VECTOR_CASES},
}


def header_end(data: bytes) -> int | None:
    return 8 + int.from_bytes(data[:8], "little") if len(data) >= 8 else None


def report(name: str, counts: Counter) -> None:
    total = sum(counts.values())
    print(f"fuzz {name}: {total} examples, {counts['loaded']} loaded, {counts['refused']} refused, 0 escaped")
    assert counts["refused"] > 0, "no example was refused: the damage does not reach the loader"


@pytest.mark.parametrize("name", FILE_TARGETS)
def test_damaged_files(valid, name):
    """Bytes-level damage to one file of a valid folder."""
    folder, rel, use = FILE_TARGETS[name]
    source = valid.source(folder)
    original = (source / rel).read_bytes()
    counts = Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        content = data.draw(damaged(original, header_end(original) if rel.endswith(".safetensors") else None))
        folder = valid.copy(source, rel, content)
        try:
            counts[outcome(lambda: use(valid, folder))] += 1
        finally:
            shutil.rmtree(folder)

    run()
    report(f"{name} (bytes)", counts)


@pytest.mark.parametrize("name", JSON_TARGETS)
def test_edited_json(valid, name):
    """Structural damage to one JSON file: a value replaced by any JSON value, removed, or a key added."""
    folder, rel, use = JSON_TARGETS[name]
    source = valid.source(folder)
    original = json.loads((source / rel).read_text())
    counts = Counter()

    @FUZZ
    @given(data=st.data())
    def run(data):
        content = json.dumps(data.draw(edited_json(original))).encode()
        folder = valid.copy(source, rel, content)
        try:
            counts[outcome(lambda: use(valid, folder))] += 1
        finally:
            shutil.rmtree(folder)

    run()
    report(f"{name} (JSON edits)", counts)


REMOVE = object()
GPT_KEYS = ["model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "dtype",
            "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "scale_attn_weights"]  # fmt: skip


def test_gpt_config_parser_on_any_json():
    """Any JSON document, or a valid config.json with several keys set to any JSON value or removed."""
    counts = Counter()
    valid_config = CFG.to_hf_dict()
    overrides = st.dictionaries(st.sampled_from(GPT_KEYS), json_values() | st.just(REMOVE), max_size=4)
    edited = overrides.map(lambda o: {k: v for k, v in (valid_config | o).items() if v is not REMOVE})

    @FUZZ
    @given(doc=json_values(16) | edited)
    def run(doc):
        counts[outcome(lambda: tp.GPTConfig.from_hf_dict(doc))] += 1

    run()
    report("GPTConfig.from_hf_dict", counts)


def test_peft_config_parser_on_any_json(valid):
    """Any values for the fields of every registered method's config (and for peft_type)."""
    counts = Counter()
    keys = sorted({f.name for config_type in CONFIG_TYPES.values() for f in dataclasses.fields(config_type)})

    @FUZZ
    @given(
        peft_type=st.sampled_from(sorted(CONFIG_TYPES)) | json_values(),
        fields=st.dictionaries(st.sampled_from(keys), json_values(), max_size=4),
    )
    def run(peft_type, fields):
        doc = {"peft_type": peft_type, **fields}
        counts[outcome(lambda: tp.get_peft_model(valid.base, tp.PeftConfig.from_dict(doc))(IDS))] += 1

    run()
    report("PeftConfig.from_dict + get_peft_model", counts)


def test_golden_vectors_loader():
    """The golden vectors' loader is among the targets: every file of a case, bytes and JSON edits."""
    import importlib.util

    found = [m for m in ("tinypeft.vectors", "tinypeft.golden", "tinypeft.io.vectors") if importlib.util.find_spec(m)]
    assert found == ["tinypeft.vectors"], f"a golden-vectors module {found} that the fuzz targets do not know"
    fuzzed = {rel.rsplit("/", 1)[-1] for folder, rel, use in FILE_TARGETS.values() if use is use_vectors}
    assert fuzzed == {"index.json", "case.json", "weights.safetensors", "expected.safetensors"}
    edited = {rel for folder, rel, use in JSON_TARGETS.values() if use is use_vectors}
    assert edited == {"index.json", *(f"{case}/case.json" for case in VECTOR_CASES)}


def test_time_bound_catches_a_hang():
    """The bound itself works, and an `except Exception` inside a loader cannot swallow it."""
    import time

    def hangs():
        try:
            time.sleep(5)
        except Exception:  # what a loader's catch-all would do
            raise TinyPeftError("swallowed") from None

    with pytest.raises(TimeBoundExceeded), time_bound(0.2):
        hangs()
