"""Fuzzing the command line: hypothesis draws an argv for every subcommand from that subcommand's real
options (read from the parser in tinypeft/cli_args.py, so a new option is fuzzed the day it is added),
with hostile values, and runs `python -m tinypeft.cli` on it in a process of its own. Every run must
end with exit status 0, 1 or 2; on a failure, exactly one line on stderr, starting "tinypeft"; on a
success, nothing on stderr (a progress bar aside, when --no_progress is left out); never a traceback;
and within the time bound (a run past it is killed and counted as a hang).

What is drawn, into a temporary folder (every path the runs see, and every folder they write, is
inside it; each run's working folder is a fresh one there, so the default --out lands there too):
- integers: 0, negatives, 20-, 401- and 4,301-digit ones, floats, nan, inf, words, "", " 3", "0x10",
  "1_0" and non-ASCII digits, or a small valid one; floats: nan, inf, 1e400, -0, subnormals, words;
  a choice: one of its choices or one it does not have;
- paths: a model, an adapter, a corpus, golden vectors, or a missing path, a FIFO, a file where a
  folder belongs and a folder where a file does, a symbolic link (to a folder, dangling, a loop), a
  name that is not UTF-8 (existing or not), a name holding a newline, a name too long for the file
  system, the empty string;
- text (prompts, globs, module names): bytes that are not UTF-8, the empty string, more bytes than
  the model has positions, regular expressions that do not compile;
- ports for check-vectors: one that calls sys.exit(0), raises, returns garbage or an object that
  cannot become an array, or a module without run_case;
- and sometimes an option that does not exist, or a required one left out.
Each example changes up to four options of a small valid invocation (a model of one block and 8
dimensions, two steps), so that what is not hostile runs to the end in a second.

One choice is left out on purpose: a huge but valid --steps (a run of 10**20 steps is a long run,
not a hang), so --steps draws only small or invalid counts.

Sizes: TINYPEFT_CLI_FUZZ_EXAMPLES runs per subcommand (default 48: about 50 s for the seven with
-n 2 on two cores, the bounded run in the normal suite); TINYPEFT_CLI_FUZZ_SECONDS bounds each run
(default 60). The larger run, with fresh examples:

    HYPOTHESIS_PROFILE=dev TINYPEFT_CLI_FUZZ_EXAMPLES=300 python -m pytest tests/e2e/test_cli_fuzz.py -n 2 -rP

(-rP prints each subcommand's counts: runs, and how many ended with status 0, 1 and 2).

What it found (development runs of 175, 1,750 and 2,100 drawn argv, before this file was committed):
- check-vectors exited 1 with nothing on stderr when a case failed (the table is on stdout): it now says
  so in one line there (tests/vectors/test_vectors.py, test_a_gradient_wrong_by_a_millionth_...);
- a training run whose weights overflow (--lr or --weight_decay 1e308) printed NumPy's RuntimeWarnings,
  two lines each, before tinypeft's one-line error: the command runs under np.errstate(all="ignore"),
  since tinypeft checks the loss, weights and logits itself (tests/e2e/test_cli.py,
  test_a_run_that_overflows_says_so_in_one_line);
- a 401-digit --n_embd (or another size) made tinypeft/memory.py's refusal raise OverflowError while
  wording its message: fixed (memory.gib words a size past float's range by its order of magnitude), and
  run again by test_escapes_the_fuzz_found_stay_fixed (FIXED_ESCAPES, below).
The escapes found before it, by hand (argparse's usage block, a file name holding a newline, a prompt or
a file name that is not UTF-8, check-vectors' ports), are the regression tests of tests/e2e/test_cli.py and
tests/vectors/test_vectors.py and the "Command line" cases of the error catalogue.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinypeft as tp
from tinypeft.cli_args import build_parser
from tinypeft.vectors import export_vectors

EXAMPLES = int(os.environ.get("TINYPEFT_CLI_FUZZ_EXAMPLES", "48"))
TIME_BOUND_S = float(os.environ.get("TINYPEFT_CLI_FUZZ_SECONDS", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
ROOT = Path(__file__).resolve().parents[2]
CFG = tp.GPTConfig(vocab_size=256, n_positions=32, n_embd=8, n_layer=1, n_head=2)


# ------------------------------------------------------------------ the world the runs see
PORTS = {
    "exits.py": "import sys\n\n\ndef run_case(case):\n    sys.exit(0)\n",
    "raises.py": "def run_case(case):\n    raise RuntimeError('not ported')\n",
    "garbage.py": "def run_case(case):\n    return {'logits': 'x', 'loss': None, 'grads': [1]}\n",
    "unconvertible.py": (
        "class T:\n    def __array__(self, dtype=None, copy=None):\n        raise RuntimeError('requires grad')\n\n\n"
        "def run_case(case):\n    return {'logits': T(), 'loss': T(), 'grads': {'x': T()}, 'derived': T()}\n"
    ),
    "exits_at_import.py": "import sys\n\nsys.exit(0)\n",
    "no_run_case.py": "x = 1\n",
}


@dataclass
class World:
    """Everything a drawn path may name, under one temporary folder."""

    root: Path
    paths: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path) -> World:
        w = cls(root)
        base = tp.GPT(CFG, seed=0)
        base.save_pretrained(root / "model")
        tp.get_peft_model(base, tp.LoraConfig(r=1, target_modules=["c_attn"])).save_pretrained(root / "adapter")
        text = b"The quick brown fox jumps over the lazy dog; caf\xe9 \xff\xfe and more text.\n" * 60
        (root / "corpus.txt").write_bytes(text)
        (root / "corpus_dir").mkdir()
        for i in range(3):
            (root / "corpus_dir" / f"doc{i}.txt").write_bytes(text[i * 50 :])
        export_vectors(root / "vectors", ["lora-rank1-float64", "bitfit-odd-float32"])
        for name, source in PORTS.items():
            (root / name).write_text(source)
        os.mkfifo(root / "fifo")
        (root / "file.txt").write_bytes(b"just a file\n")
        (root / "empty_dir").mkdir()
        (root / "link_to_model").symlink_to(root / "model")
        (root / "dangling").symlink_to(root / "nowhere")
        (root / "loop").symlink_to(root / "loop")
        raw = os.fsencode(root)
        with open(raw + b"/corpus-\xe9.txt", "wb") as f:
            f.write(text)
        w.paths = {
            "model": raw + b"/model",
            "adapter": raw + b"/adapter",
            "corpus": raw + b"/corpus.txt",
            "corpus_dir": raw + b"/corpus_dir",
            "vectors": raw + b"/vectors",
            "missing": raw + b"/missing",
            "fifo": raw + b"/fifo",
            "file": raw + b"/file.txt",
            "empty_dir": raw + b"/empty_dir",
            "link_to_model": raw + b"/link_to_model",
            "dangling": raw + b"/dangling",
            "loop": raw + b"/loop",
            "under_a_file": raw + b"/file.txt/below",
            "not_utf8": raw + b"/corpus-\xe9.txt",
            "not_utf8_missing": raw + b"/m\xff\xfe",
            "newline": raw + b"/two\nlines",
            "too_long": raw + b"/" + b"n" * 300,
            "empty": b"",
            **{f"port {name}": raw + b"/" + name.encode() for name in PORTS},
        }
        return w


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World.create(tmp_path_factory.mktemp("cli-fuzz"))


# ------------------------------------------------------------------ values
INTEGERS = ["0", "-1", "-7", "99999999999999999999", "1" + "0" * 400, "9" * 4301, "-" + "9" * 30, "1.5", "1e3",
            "nan", "inf", "", "abc", " 3", "0x10", "1_0", "\u0663", "+2", "-0"]  # fmt: skip
FLOATS = ["nan", "inf", "-inf", "1e400", "-1e400", "0", "-0", "-1", "1e-320", "5e-324", "1e308", "abc", "", "1_0",
          "0x1p3", "2", "0.5", "1e-3"]  # fmt: skip
TEXT = st.one_of(
    st.binary(max_size=24).filter(lambda b: b"\0" not in b),
    st.sampled_from([b"", b"\xff\xfe", b"caf\xe9", b"x" * 100, b"(", b"[", b".*", b"c_attn", b"mlp.c_fc", b"*"]),
)
GLOBS = st.sampled_from([b"*", b"lora-rank1-float64", b"bitfit-*", b"*-float32", b"nothing", b"[", b"", b"\xff"])
MODULES = st.sampled_from([b"tinypeft.vectors", b"json", b"no_such_module_anywhere", b"", b"\xff", b"tinypeft.nope"])
PATH_OPTIONS = {"base", "model", "adapter", "corpus", "prose_corpus", "out", "dir", "report"}


def path_values(w: World, dest: str) -> st.SearchStrategy[bytes]:
    named = st.sampled_from(sorted(w.paths)).map(w.paths.__getitem__)
    fresh = st.sampled_from([b"out", b"out/deeper", b".", b"o\xff"])  # relative: inside the run's own folder
    if dest in ("corpus", "prose_corpus"):
        return st.one_of(named, st.sampled_from([b"prose", b"code"]), fresh)
    return st.one_of(named, fresh)


def values(w: World, action: argparse.Action) -> st.SearchStrategy[bytes]:
    """Hostile (and sometimes valid) command-line words for one option."""
    if action.choices is not None:
        own = [str(c).encode() for c in action.choices]
        return st.sampled_from([*own, b"bogus", b"", b"LORA", b"\xff"])
    if action.type is int:
        if action.dest == "steps":  # a huge valid count is a long run, not a hang: small or invalid only
            return st.sampled_from([b"1", b"2", *(v.encode() for v in INTEGERS if not v.lstrip("+").isdigit())])
        return st.one_of(st.sampled_from([v.encode() for v in INTEGERS]), st.integers(1, 3).map(lambda i: b"%d" % i))
    if action.type is float:
        return st.sampled_from([v.encode() for v in FLOATS])
    if action.dest in PATH_OPTIONS:
        return path_values(w, action.dest)
    if action.dest == "impl":
        ports = [w.paths[k] for k in sorted(w.paths) if k.startswith("port ")]
        return st.one_of(MODULES, st.sampled_from([*ports, w.paths["missing"] + b".py", w.paths["empty_dir"]]))
    if action.dest == "cases":
        return GLOBS
    return TEXT


# ------------------------------------------------------------------ invocations
def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def base_argv(w: World, command: str) -> list[bytes]:
    """A small valid invocation of `command`, to which the hostile options are added."""
    p = w.paths
    train = [b"--steps", b"2", b"--batch_size", b"2", b"--seq_len", b"16", b"--eval_windows", b"1", b"--no_progress"]
    return {
        "pretrain": [b"--corpus", p["corpus"], b"--n_layer", b"1", b"--n_embd", b"8", b"--n_head", b"2",
                     b"--n_positions", b"16", b"--out", b"out", *train],
        "finetune": [b"--base", p["model"], b"--corpus", p["corpus"], b"--prose_corpus", p["corpus"], b"--out",
                     b"out", b"--sample_bytes", b"4", *train],
        "eval": [b"--model", p["model"], b"--corpus", p["corpus"], b"--seq_len", b"16", b"--eval_windows", b"2"],
        "generate": [b"--model", p["model"], b"--max_new_tokens", b"4"],
        "merge": [b"--model", p["model"], b"--adapter", p["adapter"], b"--out", b"merged"],
        "export-vectors": [b"vectors", b"--cases", b"lora-rank1-float64"],
        "check-vectors": [p["vectors"], b"--impl", b"tinypeft.vectors", b"--cases", b"lora-*"],
    }[command]  # fmt: skip


@st.composite
def invocations(draw, w: World, command: str) -> list[bytes]:
    parser = subcommands()[command]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    options = [a for a in actions if a.option_strings and a.nargs != 0]
    flags = [a for a in actions if a.option_strings and a.nargs == 0]
    positionals = [a for a in actions if not a.option_strings]
    argv = list(base_argv(w, command))
    if positionals and draw(st.integers(0, 4)) == 0:  # the positional replaced
        argv[0] = draw(values(w, positionals[0]))
    for action in draw(st.lists(st.sampled_from(options), max_size=4)):
        name = draw(st.sampled_from(action.option_strings)).encode()
        if action.nargs == "+":
            argv += [name, *draw(st.lists(values(w, action), min_size=0, max_size=3))]
        else:
            argv += [name, draw(values(w, action))]
    if flags:
        argv += [a.option_strings[0].encode() for a in draw(st.lists(st.sampled_from(flags), max_size=2, unique=True))]
    extra = draw(st.integers(0, 9))
    if extra == 0:
        argv.append(draw(st.sampled_from([b"--no_such_option", b"stray", b"--", b"-x"])))
    elif extra == 1 and len(argv) > 1:  # an option's value (or the option) left out
        del argv[draw(st.integers(0, len(argv) - 1))]
    return argv


# ------------------------------------------------------------------ running one
def run(w: World, command: str, argv: list[bytes], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TINYPEFT_BACKEND"}
    env |= {"PYTHONIOENCODING": "utf-8:strict", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cwd.mkdir(parents=True)
    return subprocess.run(
        [sys.executable, "-m", "tinypeft.cli", command.encode(), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=TIME_BOUND_S,
    )


# Escapes found whose fix is in a file this test's author could not change: each is counted apart (not
# silently passed) by its traceback's last line (none today). Escapes found and fixed are run again by
# test_escapes_the_fuzz_found_stay_fixed below.
KNOWN_ESCAPES: dict[str, tuple[bytes, list[str], str]] = {}

FIXED_ESCAPES = {
    "memory.gib on a size past float's range": (
        ["pretrain", "--n_embd", "1" + "0" * 400, "--n_head", "1", "--steps", "1", "--out", "out"],
        "tinypeft/memory.py gib() divided the byte count, an int, by GiB in float: an estimate past 1.8e308 bytes "
        "(a 401-digit --n_embd, --bottleneck_size or --batch_size) raised OverflowError while the refusal was worded",
    ),
}


def known(result: subprocess.CompletedProcess) -> str | None:
    lines = result.stderr.rstrip().splitlines()
    last = lines[-1] if lines else b""
    return next((name for name, (signature, _, _) in KNOWN_ESCAPES.items() if last == signature), None)


PROGRESS_BAR = re.compile(rb"\s*\d+%\|")  # tqdm's, on stderr when --no_progress is left out: "50%|#####  | 1/2 ..."


def escape(result: subprocess.CompletedProcess) -> str | None:
    """What breaks the contract, or None. Progress-bar updates (tqdm's, separated by carriage returns) are
    not messages: what else is on stderr must be nothing after a success, one line after a failure."""
    err = result.stderr
    if result.returncode not in (0, 1, 2):
        return f"exit status {result.returncode}"
    if b"Traceback" in err:
        return "a traceback"
    lines = [line for line in re.split(rb"[\r\n]", err) if line.strip() and not PROGRESS_BAR.match(line)]
    if result.returncode == 0:
        return None if not lines else "output on stderr after a success"
    if not (len(lines) == 1 and lines[0].startswith(b"tinypeft") and err.endswith(lines[0] + b"\n")):
        return "stderr is not one line starting 'tinypeft'"
    return None


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_the_command_line_on_hostile_arguments(world, tmp_path, command):
    counts: Counter = Counter()
    numbers = itertools.count()

    @FUZZ
    @given(argv=invocations(world, command))
    def one(argv):
        cwd = tmp_path / f"run-{next(numbers)}"
        try:
            result = run(world, command, argv, cwd)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tinypeft {command} {argv!r} ran past {TIME_BOUND_S} s: it hangs")
        counts[result.returncode] += 1
        problem = escape(result)
        if problem and known(result):
            counts["known"] += 1
            return
        assert problem is None, f"tinypeft {command} {argv!r}: {problem}:\n{result.stderr.decode(errors='replace')}"

    one()
    total = counts[0] + counts[1] + counts[2]
    print(
        f"cli fuzz {command}: {total} runs; status 0: {counts[0]}, 1: {counts[1]}, 2: {counts[2]}; "
        f"0 escaped ({counts['known']} of them a known escape: KNOWN_ESCAPES)"
    )
    assert counts[2] > 0, "no run was refused: the hostile values do not reach the command"


@pytest.mark.parametrize("name", FIXED_ESCAPES)
def test_escapes_the_fuzz_found_stay_fixed(world, tmp_path, name):
    """Each escape the fuzz found, run as found (the reason beside it in FIXED_ESCAPES): one line now."""
    argv, _ = FIXED_ESCAPES[name]
    result = run(world, argv[0], [os.fsencode(a) for a in argv[1:]], tmp_path / "run")
    assert result.returncode in (1, 2), result.stderr.decode(errors="replace")
    assert escape(result) is None, result.stderr.decode(errors="replace")
