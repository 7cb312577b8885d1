"""Hugging Face GPT-2 folders made here, offline: a transformers GPT2LMHeadModel, randomly initialised
and saved with `save_pretrained` (config.json, model.safetensors in float32), with a GPT-2-style
byte-level BPE tokenizer trained here by the `tokenizers` library on the pydoc topics Python ships
(ByteLevel pre-tokenizer and decoder, `<|endoftext|>` as the last id, bos = eos = it), saved by
transformers' GPT2TokenizerFast (tokenizer.json, tokenizer_config.json): the files of a hub folder
such as gpt2 or distilgpt2, with a smaller vocabulary where asked."""

from __future__ import annotations

import functools
from pathlib import Path

EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=4)
def trained_bpe(vocab_size: int):
    """A byte-level BPE of at most vocab_size tokens, the last of them `<|endoftext|>` (GPT-2's layout),
    trained on the pydoc topics in sorted order (deterministic)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def make_gpt2_folder(
    folder: Path,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_positions: int,
    tokenizer_size: int,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """A GPT2LMHeadModel folder with its tokenizer; vocab_size defaults to the tokenizer's ids, as in gpt2."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = trained_bpe(tokenizer_size)
    eos = tokenizer.token_to_id(EOS)
    config = GPT2Config(
        vocab_size=vocab_size or tokenizer.get_vocab_size(),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS).save_pretrained(folder)
    return folder
