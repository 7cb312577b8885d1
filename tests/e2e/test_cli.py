"""The command line end to end on tiny settings: pretrain, finetune, eval, generate, merge, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinypeft as tp
from tinypeft.cli import main, method_defaults
from tinypeft.errors import ConfigError
from tinypeft.methods import METHODS

TINY = [
    "--steps",
    "6",
    "--batch_size",
    "2",
    "--seq_len",
    "32",
    "--eval_every",
    "3",
    "--eval_windows",
    "2",
    "--no_progress",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    assert (
        main(
            [
                "pretrain",
                "--n_layer",
                "1",
                "--n_embd",
                "16",
                "--n_head",
                "2",
                "--n_positions",
                "64",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    return out


def test_pretrain_writes_a_loadable_model_and_a_summary(pretrained):
    model = tp.GPT.from_pretrained(pretrained / "model")
    assert model.config.n_embd == 16
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["steps"] == 6 and np.isfinite(summary["val_loss"])
    assert [e["step"] for e in summary["evals"]] == [0, 3, 6]
    assert (pretrained / "loss.png").stat().st_size > 1000


def test_finetune_eval_generate_merge(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    base = str(pretrained / "model")
    assert (
        main(["finetune", "--base", base, "--method", "bitfit", "--out", str(out), "--sample_bytes", "8", *TINY]) == 0
    )
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "before" in printed and "after" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]) == {"task", "prose"} and summary["trainable_parameters"] > 0
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "loss.png").exists()

    assert (
        main(
            [
                "eval",
                "--model",
                base,
                "--adapter",
                str(out / "adapter"),
                "--corpus",
                "prose",
                "--seq_len",
                "32",
                "--eval_windows",
                "2",
            ]
        )
        == 0
    )
    assert "prose: validation loss" in capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                "--model",
                base,
                "--adapter",
                str(out / "adapter"),
                "--prompt",
                "def ",
                "--max_new_tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def ")
    assert main(["merge", "--model", base, "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = tp.GPT.from_pretrained(tmp_path / "merged")
    adapted = tp.PeftModel.from_pretrained(tp.GPT.from_pretrained(base), out / "adapter")
    ids = np.arange(20).reshape(1, 20)
    np.testing.assert_allclose(merged(ids), adapted(ids), rtol=1e-5, atol=1e-5)


def test_full_finetuning_saves_a_model(pretrained, tmp_path):
    out = tmp_path / "full"
    assert (
        main(
            [
                "finetune",
                "--base",
                str(pretrained / "model"),
                "--method",
                "full",
                "--out",
                str(out),
                "--sample_bytes",
                "4",
                *TINY,
            ]
        )
        == 0
    )
    assert tp.GPT.from_pretrained(out / "model").config.n_layer == 1


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinypeft generate: error:") and "Traceback" not in err
    assert main(["pretrain", "--n_embd", "10", "--n_head", "3", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "divisible" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", ["pretrain", "finetune", "eval", "generate", "merge", "export-vectors", "check-vectors"]
)
def test_help_is_complete(command):
    import argparse

    from tinypeft.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings}: no help"
    assert parser.description
    out = subprocess.run(
        [sys.executable, "-m", "tinypeft.cli", command, "--help"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("usage: tinypeft " + command)


def _subparsers() -> dict:
    import argparse

    from tinypeft.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", list(_subparsers()))
def test_every_option_shows_its_default(command, monkeypatch):
    """Each option of each subcommand: a default other than None (and a flag's False) is printed by --help
    beside that option, 0 and 0.0 included (argparse's formatter took them for False and hid them); an
    option whose default is None says in its help what happens without it, or that it is required."""
    import argparse

    monkeypatch.setenv("COLUMNS", "100")
    parser = _subparsers()[command]
    rendered = parser.format_help()
    text = " ".join(rendered[rendered.index("options:") :].split())  # one line: wrapping ignored
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    starts = {a.dest: text.index(" " + formatter._format_action_invocation(a) + " ") for a in options}
    for action in options:
        start = starts[action.dest]
        end = min([i for i in starts.values() if i > start] + [len(text)])
        says = text[start:end]
        if action.default is None:
            assert action.required or "default" in says or "required" in says, f"{command}: {says}"
        elif action.default is not False:
            assert f"(default: {action.default})" in says, f"{command} {action.option_strings}: {says}"


def test_method_help_lists_every_method_on_its_own_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    lines = _subparsers()["finetune"].format_help().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("--method {"))
    assert "(default: lora)" in lines[start + 1]
    for line, (name, spec) in zip(lines[start + 2 :], METHODS.items(), strict=False):
        assert line.split() == [name, *spec.help.split(), "(lr", f"{spec.default_lr:g})"], line


def test_version():
    import re

    done = subprocess.run([sys.executable, "-m", "tinypeft.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == f"tinypeft {tp.__version__}\n"
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"$', pyproject, flags=re.M).group(1) == tp.__version__


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_from_its_command_line_defaults(name):
    """`finetune --method NAME` with no other option trains the method's config at its rate, or the method says
    which of its own options it needs."""
    spec = METHODS[name]
    try:
        config, lr = method_defaults(name)
    except ConfigError as e:
        assert any(option in str(e) for flag in spec.flags for option in flag.names), str(e)
        return
    assert lr == spec.default_lr
    assert config is None or isinstance(config, tp.PeftConfig)
    assert method_defaults(name, "--lr", "0.5")[1] == 0.5


def _pretrain_positions(out, capsys, *seq_len: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(initial, trained) position embeddings of a 16-position model pretrained for 2 steps, and the output."""
    shape = ["--n_layer", "1", "--n_embd", "8", "--n_head", "2", "--n_positions", "16", "--seed", "3"]
    steps = ["--steps", "2", "--batch_size", "2", "--eval_every", "0", "--eval_windows", "1", "--no_progress"]
    assert main(["pretrain", *shape, *steps, *seq_len, "--out", str(out)]) == 0
    initial = tp.GPT(tp.GPTConfig(vocab_size=256, n_positions=16, n_embd=8, n_layer=1, n_head=2), seed=3)
    trained = tp.GPT.from_pretrained(out / "model")
    wpe = "transformer.wpe.weight"
    return initial.state_dict()[wpe], trained.state_dict()[wpe], capsys.readouterr().out


def test_pretrain_trains_every_position_by_default(tmp_path, capsys):
    # a base trained on shorter sequences than n_positions leaves the last position embeddings at their
    # random init, and a fine-tune that prepends virtual tokens (or a long sample) reads them
    # (the last position of a window predicts nothing, the labels being shifted, so its row gets no gradient)
    initial, trained, out = _pretrain_positions(tmp_path / "all", capsys)
    assert (np.abs(trained[:15] - initial[:15]).max(axis=1) > 0).all()
    assert "never seen" not in out
    initial, trained, out = _pretrain_positions(tmp_path / "short", capsys, "--seq_len", "10")
    assert (np.abs(trained[:9] - initial[:9]).max(axis=1) > 0).all()
    np.testing.assert_array_equal(trained[10:], initial[10:])  # no weight decay by default: untouched
    assert "position embeddings 10..15 are never seen in training" in out


def test_the_shipped_base_is_small_documented_and_trained_at_every_position():
    from tinypeft.experiment import SHIPPED_BASE

    model = tp.GPT.from_pretrained(SHIPPED_BASE)
    config = model.config
    assert (config.n_layer, config.n_embd, config.vocab_size) == (4, 128, 256)
    assert os.path.getsize(os.path.join(SHIPPED_BASE, "model.safetensors")) <= 5 * 2**20
    with open(os.path.join(SHIPPED_BASE, "provenance.json")) as f:
        provenance = json.load(f)
    command = provenance["command"].split()
    assert int(command[command.index("--seq_len") + 1]) == config.n_positions
    assert 0 < provenance["val_loss_nats_per_byte"] < 1.5


@pytest.mark.parametrize(
    ("method", "trained"),
    [
        (
            ["--method", "trainable_tokens", "--token_indices", "32", "101", "10"],
            {"transformer.wte.trainable_tokens_delta"},
        ),
        (["--method", "lora", "--target_modules", "wte", "c_attn"], {"transformer.wte.lora_embedding_A"}),
        (["--method", "lora", "--trainable_token_indices", "32", "10"], {"transformer.wte.token_adapter"}),
    ],
    ids=["trainable_tokens", "lora-wte", "lora-token-indices"],
)
def test_finetune_trains_the_token_table(pretrained, tmp_path, capsys, method, trained):
    """The token-table methods from the command line: they train, save PEFT's names, and load back."""
    out = tmp_path / "ft"
    base = str(pretrained / "model")
    assert main(["finetune", "--base", base, *method, "--out", str(out), "--sample_bytes", "4", *TINY]) == 0
    capsys.readouterr()
    model = tp.PeftModel.from_pretrained(tp.GPT.from_pretrained(base), out / "adapter")
    names = " ".join(model.adapter_state_dict())
    assert all(t in names for t in trained), names
    start = tp.GPT.from_pretrained(base)
    ids = np.frombuffer(b"def main():", dtype=np.uint8)[None].astype(np.int64)
    assert np.abs(np.asarray(model(ids)) - np.asarray(start(ids))).max() > 0  # trained: off the base


def test_a_second_run_in_one_out_folder_needs_overwrite_and_resume_refuses_another_run(pretrained, tmp_path, capsys):
    """Issue 15, items 1 and 2, from the command line: each refusal is one line and exit 2."""
    base, out = str(pretrained / "model"), str(tmp_path / "run")
    run = ["finetune", "--base", base, "--method", "lora", "--out", out, "--sample_bytes", "4", *TINY]
    assert main(run) == 0
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another run's checkpoints" in err and "--overwrite" in err
    assert main([*run, "--resume", "--lora_alpha", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method.lora_alpha: now 3.0, saved 16" in err
    assert main([*run, "--overwrite"]) == 0
    assert "overwriting the run" in capsys.readouterr().out


# ------------------------------------------------------------------ the reliability issue: numbers, bytes, one line
def run_cli(*argv: str | bytes, cwd=None) -> subprocess.CompletedProcess:
    """`tinypeft ARGV` in a process of its own, its output as bytes. PYTHONIOENCODING=utf-8:strict is what a
    UTF-8 desktop locale gives (this machine's C.UTF-8 would escape a lone surrogate on stdout by itself)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    command = [sys.executable, "-m", "tinypeft.cli", *argv]
    return subprocess.run(command, capture_output=True, env=env, cwd=cwd, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    err = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == status, err
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--batch_size", "0", "batch_size must be an integer >= 1; got 0"),
        ("--batch_size", "-1", "batch_size must be an integer >= 1; got -1"),  # once printed a loss of 0.0000
        ("--eval_windows", "0", "max_windows must be an integer >= 1; got 0"),
        ("--seq_len", "0", "seq_len must be an integer >= 2; got 0"),
    ],
)
def test_eval_refuses_numbers_that_are_not_sizes(pretrained, capsys, flag, value, says):
    assert main(["eval", "--model", str(pretrained / "model"), "--corpus", "prose", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and says in captured.err
    assert "validation loss" not in captured.out


def test_finetune_and_pretrain_refuse_bad_numbers_before_any_work(pretrained, tmp_path, capsys):
    base = ["finetune", "--base", str(pretrained / "model"), "--out", str(tmp_path / "ft"), *TINY]
    assert main([*base, "--prompt_bytes", "0"]) == 2
    assert "--prompt_bytes must be an integer >= 1" in capsys.readouterr().err
    assert main([*base, "--sample_bytes", "-1"]) == 2
    assert "--sample_bytes must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()  # refused before the run folder was made, the base loaded, or a step run
    assert main(["pretrain", "--seq_len", "0", "--out", str(tmp_path / "pre"), "--corpus", "prose"]) == 2
    captured = capsys.readouterr()
    assert "seq_len must be an integer >= 1; got 0" in captured.err
    assert "note:" not in captured.out  # it once noted "position embeddings 0..255 are never seen" first


def test_generate_takes_its_prompt_as_bytes_and_writes_the_model_s_bytes(pretrained, capsysbinary):
    """A prompt that is not UTF-8 (Latin-1 'café' and a 0xff byte) once raised UnicodeEncodeError: the bytes
    given are the bytes the model reads, and the bytes it writes, exactly."""
    model = str(pretrained / "model")
    prompt = b"caf\xe9 \xff\x00\x01"
    result = run_cli("generate", "--model", model, "--prompt", prompt[:-2], "--max_new_tokens", "0")
    assert result.returncode == 0 and result.stdout == prompt[:-2] + b"\n" and result.stderr == b""
    result = run_cli("generate", "--model", model, "--prompt", prompt[:-2], "--max_new_tokens", "7")
    assert result.returncode == 0 and result.stderr == b""
    assert result.stdout.startswith(prompt[:-2]) and len(result.stdout) == len(prompt) - 2 + 7 + 1
    model_bytes = tp.GPT.from_pretrained(model).generate(np.frombuffer(prompt[:-2], np.uint8)[None].astype(int), 7)
    assert result.stdout[:-1] == bytes(model_bytes[0].astype(np.uint8))
    # in process, main() as Python hands it the command line: each byte that is not UTF-8 a lone surrogate
    assert main(["generate", "--model", model, "--prompt", os.fsdecode(prompt), "--max_new_tokens", "0"]) == 0
    assert capsysbinary.readouterr().out == prompt + b"\n"


def test_file_names_that_are_not_utf8_are_printed_back_as_their_bytes(tmp_path):
    folder = os.fsencode(tmp_path) + b"/vectors-\xff"
    result = run_cli("export-vectors", folder, "--cases", "lora-rank1-float64")
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    assert b"wrote 1 golden cases to " + folder + b" (" in result.stdout
    result = run_cli("check-vectors", folder, "--impl", "tinypeft.vectors", "--report", folder + b"/r\xe9port.json")
    assert result.returncode == 0 and b" passed, 0 failed" in result.stdout  # the case and its merge
    assert os.path.isfile(folder + b"/r\xe9port.json")
    # a missing one: one line (stderr escapes the byte)
    err = one_line_error(run_cli("generate", "--model", os.fsencode(tmp_path) + b"/m\xe9"))
    assert "m\\udce9 is not a folder" in err


def test_a_corpus_file_name_that_is_not_utf8_is_one_line(tmp_path):
    """tinypeft/data.py splits a corpus by a hash of each file's name, as UTF-8, which a name that is not
    UTF-8 has not: until it hashes the name's bytes, the command says so in one line, not a traceback."""
    corpus = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(corpus, "wb") as f:
        f.write(b"some text to train on. " * 200)
    err = one_line_error(run_cli("eval", "--corpus", corpus, "--seq_len", "16", "--eval_windows", "1"))
    assert "caf\\udce9.txt' is not UTF-8, and tinypeft cannot use a name that is not here yet" in err


def test_every_error_is_one_line_parser_errors_and_newlines_included(tmp_path):
    """argparse printed its usage block (many lines) before a mistake's one line; a file name holding a newline
    split an error over two lines."""
    err = one_line_error(run_cli("pretrain", "--steps", "x"))
    assert err == "tinypeft pretrain: error: argument --steps: invalid int value: 'x' (see tinypeft pretrain --help)\n"
    err = one_line_error(run_cli())
    assert "the following arguments are required: COMMAND (see tinypeft --help)" in err
    err = one_line_error(run_cli("eval", "--bogus", "a\nb"))
    assert "unrecognized arguments: --bogus a\\nb" in err
    err = one_line_error(run_cli("generate", "--model", str(tmp_path / "two\nlines")))
    assert "two\\nlines is not a folder" in err


def test_a_run_that_overflows_says_so_in_one_line(tmp_path):
    """--weight_decay 1e308 overflows the weights in the first update: NumPy's RuntimeWarnings (two lines each)
    once came before tinypeft's own one-line error (found by tests/e2e/test_cli_fuzz.py)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"some text to train on. " * 200)
    shape = ["--n_layer", "1", "--n_embd", "8", "--n_head", "2", "--n_positions", "16", "--corpus", str(corpus)]
    steps = ["--steps", "3", "--batch_size", "2", "--eval_windows", "1", "--no_progress", "--out", str(tmp_path / "o")]
    err = one_line_error(run_cli("pretrain", *shape, *steps, "--weight_decay", "1e308"))
    assert err.startswith("tinypeft pretrain: error: the loss became non-finite at step 2")
