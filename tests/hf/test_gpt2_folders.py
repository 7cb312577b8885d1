"""A Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer.json, as `save_pretrained`
writes them for gpt2 or distilgpt2) works like the shipped base, with the folder's own tokenizer:
the tokenization is the `tokenizers` library's and transformers' own, the logits transformers', and
finetune, eval, generate, merge and resume run on it from the command line. The folders are made
offline in tests/gpt2_folders.py: a small one here, and one of gpt2's 124M shape for one step."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from hf_utils import hf_causal_lm_loss
from transformers import AutoTokenizer, GPT2LMHeadModel

import tinypeft as tp
from tinypeft import experiment
from tinypeft.cli import main
from tinypeft.gradcheck import relative_error
from tinypeft.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

TEXT = "def área(r):\n    return 3.14159 * r ** 2  # the area of a circle, in m²\n<|endoftext|>Next: ünïcödé 😀"
TINY = ["--steps", "4", "--batch_size", "2", "--seq_len", "24", "--eval_every", "2", "--eval_windows", "2"]


def finetune_argv(folder, out, *more: str) -> list[str]:
    return ["finetune", "--base", str(folder), "--corpus", "prose", "--prose_corpus", "prose", "--out", str(out),
            "--sample_bytes", "6", "--no_progress", *TINY, *more]  # fmt: skip


def test_a_folder_with_tokenizer_json_gets_it_and_the_shipped_base_keeps_bytes(gpt2_small):
    tokenizer = load_tokenizer(gpt2_small)
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.unit == "token"
    config = json.loads((gpt2_small / "config.json").read_text())
    assert tokenizer.vocab_size == config["vocab_size"] == 512  # every id of the file, <|endoftext|> last
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == config["eos_token_id"] == 511
    assert isinstance(load_tokenizer(tp.SHIPPED_BASE), ByteTokenizer)


def test_tokenization_equals_the_tokenizers_library_s_and_transformers(gpt2_small):
    from tokenizers import Tokenizer

    ours = load_tokenizer(gpt2_small)
    ids = ours.encode(TEXT)
    library = Tokenizer.from_file(str(gpt2_small / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    hf = AutoTokenizer.from_pretrained(gpt2_small)
    assert ids.tolist() == library == hf(TEXT)["input_ids"]
    assert 511 in ids.tolist()  # the special token in the text is the special token, as in transformers
    assert ours.decode(ids) == TEXT == hf.decode(ids.tolist())
    assert ours.decode_bytes(ids) == TEXT.encode("utf-8")


def test_a_corpus_is_its_documents_tokenized_and_joined_by_eos(gpt2_small):
    from pydoc_data.topics import topics

    from tinypeft.data import is_validation

    corpus = tp.load_corpus("prose", load_tokenizer(gpt2_small))
    assert corpus.unit == "token" and corpus.val.dtype == np.int64
    hf = AutoTokenizer.from_pretrained(gpt2_small)
    expected = []
    for name in sorted(topics):
        if is_validation(name):
            expected += [hf.eos_token_id, *hf(topics[name])["input_ids"]]
    assert corpus.val.tolist() == expected[1:]
    assert corpus.describe().endswith("val tokens")


def test_logits_and_loss_equal_transformers_in_float64_on_bpe_text(gpt2_small):
    ours = tp.GPT.from_pretrained(gpt2_small, dtype="float64")
    hf = GPT2LMHeadModel.from_pretrained(gpt2_small, dtype=torch.float64).eval()
    ids = load_tokenizer(gpt2_small).encode(TEXT)[None]
    ref = hf(input_ids=torch.tensor(ids)).logits
    assert np.ptp(ref.detach().numpy()) > 0.1  # random N(0, 0.02) weights, yet logits far from uniform
    assert relative_error(ours(ids), ref.detach().numpy()) <= 1e-10
    loss = hf_causal_lm_loss(ref, torch.tensor(ids)).item()  # in float64 (transformers' own casts to float32)
    assert abs(ours.loss(ids, ids) - loss) <= 1e-10 * loss


def test_finetune_eval_generate_and_merge_on_a_gpt2_folder(gpt2_small, tmp_path, capsysbinary):
    out = tmp_path / "ft"
    assert main(finetune_argv(gpt2_small, out)) == 0
    printed = capsysbinary.readouterr().out.decode()
    assert f"tokenizer: {gpt2_small / 'tokenizer.json'}" in printed and "val tokens" in printed and " bpt" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unit"] == "token" and "bits_per_token" in summary["after"]["task"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(gpt2_small)

    # eval measures the windows finetune measured, per token
    argv = ["eval", "--model", str(gpt2_small), "--adapter", str(out / "adapter"), "--corpus", "prose"]
    assert main([*argv, "--seq_len", "24", "--eval_windows", "2", "--batch_size", "2"]) == 0
    assert capsysbinary.readouterr().out.decode() == (
        f"prose: validation loss {summary['after']['task']['loss']:.4f} nats/token = "
        f"{summary['after']['task']['bits_per_token']:.4f} bits/token\n"
    )

    # generate writes the text of the tokens the model chose, through the folder's tokenizer
    model = tp.PeftModel.from_pretrained(tp.GPT.from_pretrained(gpt2_small), out / "adapter")
    tokenizer = load_tokenizer(gpt2_small)
    prompt = "The following"
    ids = model.generate(tokenizer.encode(prompt)[None], 12)[0]
    argv = ["generate", "--model", str(gpt2_small), "--adapter", str(out / "adapter"), "--prompt", prompt]
    assert main([*argv, "--max_new_tokens", "12"]) == 0
    written = capsysbinary.readouterr().out
    assert written == tokenizer.decode_bytes(ids) + b"\n" and written.startswith(prompt.encode())

    # merge: a folder transformers loads, model and tokenizer, computing what the adapter did
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(gpt2_small), "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(merged))
    hf = GPT2LMHeadModel.from_pretrained(merged).eval()
    text_ids = AutoTokenizer.from_pretrained(merged)(TEXT)["input_ids"]
    assert text_ids == tokenizer.encode(TEXT).tolist()
    ref = hf(input_ids=torch.tensor([text_ids])).logits.detach().numpy()
    assert relative_error(model(np.array([text_ids])), ref) <= 1e-5  # float32 on both sides


def test_generate_ends_the_text_at_the_folder_s_eos(gpt2_small, tmp_path, capsysbinary):
    """A model that always predicts <|endoftext|>: generate writes the prompt alone, as transformers
    stops there (its final LayerNorm outputs its bias v alone, and eos's embedding row is 10 v)."""
    model = tp.GPT.from_pretrained(gpt2_small)
    v = np.linspace(-1.0, 1.0, model.config.n_embd, dtype=np.float32)
    model.params["transformer.ln_f.weight"] = np.zeros_like(v)
    model.params["transformer.ln_f.bias"] = v
    model.params["transformer.wte.weight"] = model.params["transformer.wte.weight"].copy()
    model.params["transformer.wte.weight"][511] = 10 * v
    model.save_pretrained(tmp_path / "eos")
    load_tokenizer(gpt2_small).save(tmp_path / "eos")
    assert main(["generate", "--model", str(tmp_path / "eos"), "--prompt", "The end", "--max_new_tokens", "5"]) == 0
    assert capsysbinary.readouterr().out == b"The end\n"
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "eos").eval()
    ids = torch.tensor([load_tokenizer(gpt2_small).encode("The end").tolist()])
    assert hf.generate(ids, max_new_tokens=5, do_sample=False).tolist()[0][ids.shape[1] :] == [511]


def test_an_interrupted_run_on_a_gpt2_folder_resumes_to_the_same_adapter(gpt2_small, tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(finetune_argv(gpt2_small, whole, "--checkpoint_every", "2")) == 0

    real_train = experiment.train

    def interrupted(*args):  # finetune's call, stopped after 2 of its 4 steps (train's stop_after)
        return real_train(*args[:8], 2, *args[9:])

    monkeypatch.setattr(experiment, "train", interrupted)
    assert main(finetune_argv(gpt2_small, cut, "--checkpoint_every", "2")) == 0
    monkeypatch.setattr(experiment, "train", real_train)
    assert json.loads((cut / "summary.json").read_text())["evals"][-1]["step"] == 2
    assert main([*finetune_argv(gpt2_small, cut, "--checkpoint_every", "2"), "--resume"]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (cut / "adapter" / name).read_bytes() == (whole / "adapter" / name).read_bytes(), name


def test_full_fine_tuning_saves_the_tokenizer_with_the_model(gpt2_small, tmp_path):
    out = tmp_path / "full"
    assert main(finetune_argv(gpt2_small, out, "--method", "full")) == 0
    assert isinstance(load_tokenizer(out / "model"), BPETokenizer)
    assert (
        AutoTokenizer.from_pretrained(out / "model")(TEXT)["input_ids"]
        == load_tokenizer(gpt2_small).encode(TEXT).tolist()
    )


def test_peft_s_auto_class_loads_an_adapter_trained_on_a_gpt2_folder(gpt2_small, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "ft"
    assert main(finetune_argv(gpt2_small, out, "--method", "lora", "--target_modules", "c_attn", "c_fc")) == 0
    theirs = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    ours = tp.PeftModel.from_pretrained(tp.GPT.from_pretrained(gpt2_small), out / "adapter")
    ids = load_tokenizer(gpt2_small).encode(TEXT)[None]
    assert relative_error(ours(ids), theirs(input_ids=torch.tensor(ids)).logits.detach().numpy()) <= 1e-5


def test_prompt_tuning_s_text_init_tokenizes_with_the_folder_s_tokenizer_as_peft_does(gpt2_small):
    import peft

    text = "Classify the sentiment: "
    config = tp.PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    ours = tp.get_peft_model(tp.GPT.from_pretrained(gpt2_small), config)
    assert ours.peft_config["default"].tokenizer_name_or_path == os.path.abspath(gpt2_small)
    theirs = peft.get_peft_model(
        GPT2LMHeadModel.from_pretrained(gpt2_small),
        peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=20,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=ours.peft_config["default"].tokenizer_name_or_path,  # PEFT loads it
        ),
    )
    table = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert len(load_tokenizer(gpt2_small).encode(text)) == 12  # 12 tokens tiled to 20, as PEFT does
    np.testing.assert_array_equal(ours.trainable_parameters()["prompt_embeddings"], table)


def test_prefix_tuning_s_text_init_reads_the_text_with_the_folder_s_tokenizer(gpt2_small):
    """On a BPE folder the prefix starts as the base reading the text's tokens, not its bytes: the adapted
    model on ids computes what the base computes on concat(text tokens, ids). (With byte ids the prefix
    would be the keys and values of other tokens: the test fails that way.)"""
    base = tp.GPT.from_pretrained(gpt2_small, dtype="float64")
    text = "def main():\n    return 0\n"
    text_ids = load_tokenizer(gpt2_small).encode(text)
    NV = len(text_ids)
    assert NV < len(text.encode())  # BPE merged some bytes: bytes and tokens differ
    model = tp.get_peft_model(
        base, tp.PrefixTuningConfig(num_virtual_tokens=NV, prefix_init="TEXT", prefix_init_text=text)
    )
    ids = load_tokenizer(gpt2_small).encode("x = 1\n")[None]
    full = base(np.concatenate([text_ids[None], ids], axis=1))[:, NV:]
    assert relative_error(model(ids), full) <= 1e-12


@pytest.mark.slow
def test_a_gpt2_124m_folder_fine_tunes_with_lora(gpt2_124m, tmp_path, capsys):
    """gpt2's own shape (12 layers, n_embd 768, 12 heads, 50,257 tokens, 1,024 positions): the folder
    loads with its tokenizer and two LoRA steps train on it from the command line."""
    config = tp.GPT.from_pretrained(gpt2_124m).config
    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.n_positions) == (
        12, 768, 12, 50257, 1024,
    )  # fmt: skip
    assert sum(int(np.prod(s)) for s in tp.model.parameter_shapes(config).values()) == 124_439_808
    out = tmp_path / "ft"
    t0 = time.perf_counter()
    argv = ["finetune", "--base", str(gpt2_124m), "--corpus", "prose", "--prose_corpus", "prose", "--out", str(out),
            "--steps", "2", "--batch_size", "1", "--seq_len", "32", "--eval_every", "0", "--eval_windows", "1",
            "--sample_bytes", "2", "--target_modules", "c_attn", "c_proj", "c_fc", "--no_progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unit"] == "token" and summary["train_config"]["steps"] == 2
    assert "trainable params: 1,179,648 || all params: 125,619,456" in capsys.readouterr().out
    assert time.perf_counter() - t0 < 300
