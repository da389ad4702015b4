"""Tokenizers of the common real-world kinds, built here with `tokenizers` (no download).

Each is small (trained on a fixed corpus, so deterministic) but configured like a family
of real ones, because what decides whether a prompt may be tokenized in pieces is the
configuration (pre-tokenizer, normalizer, added tokens and their flags, post-processor),
not the vocabulary:

- `byte_level`: GPT-2/Qwen style. Byte-level BPE with `add_prefix_space`, ChatML special
  tokens, an added token with `rstrip` in the template, a `single_word` added token, a
  normalized added token, and a post-processor that appends EOS.
- `metaspace_first`: sentencepiece BPE as older Llama 2 / Mistral `tokenizer.json`s have
  it: `Metaspace` with `prepend_scheme: first` and `split: false`, byte fallback, BOS
  added by the post-processor, `[INST]`/`[/INST]` as special tokens (Mistral style; Llama
  2 itself has them as plain text).
- `llama2_normalizer`: newer Llama 2 conversions: no pre-tokenizer, the normalizer
  prepends `▁` and replaces spaces.
- `unigram`: T5/ALBERT style Unigram with `Metaspace` (always, split).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

CORPUS = [
    "You are a helpful assistant. Answer the question below in one short paragraph.",
    "The quick brown fox jumps over the lazy dog; it's 2025 and the cache holds 16 blocks.",
    "Write as if you were a critic: San Francisco food review, great tasty design.",
    "  indented  text\twith tabs\nand new lines\n\nand more  spaces   here.",
    "Résumé, naïve café, 漢字 and emoji 🙂 are text too.",
    "def f(x_y): return x_y + 1  # code is common in prompts",
] * 8

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% if message['role'] == 'system' %}{{ '<|sep|>   ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% endfor %}"
)


def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken("<|sep|>", rstrip=True, normalized=False)])
    tok.add_tokens([AddedToken("xyz", single_word=True, normalized=False),
                    AddedToken("cafe", normalized=True)])
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|endoftext|>", eos)])
    return tok


def _sentencepiece_bpe(normalizer: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if normalizer:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials + alphabet, show_progress=False))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def metaspace_first() -> Tokenizer:
    return _sentencepiece_bpe(normalizer=False)


def llama2_normalizer() -> Tokenizer:
    return _sentencepiece_bpe(normalizer=True)


def unigram() -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<pad>", "</s>", "<unk>", "<extra_id_0>"]
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    return tok


TEMPLATES = {"byte_level": CHATML, "metaspace_first": INST, "llama2_normalizer": INST,
             "unigram": INST.replace("[INST]", "<extra_id_0>").replace("[/INST]", "</s>")}
KINDS: dict[str, Callable[[], Tokenizer]] = {
    "byte_level": byte_level, "metaspace_first": metaspace_first,
    "llama2_normalizer": llama2_normalizer, "unigram": unigram}
BOS_EOS = {"byte_level": ("", "<|endoftext|>"), "metaspace_first": ("<s>", "</s>"),
           "llama2_normalizer": ("<s>", "</s>"), "unigram": ("", "</s>")}


def write(kind: str, directory: str | Path) -> Path:
    """Build tokenizer `kind` into `directory` (tokenizer.json + tokenizer_config.json)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    KINDS[kind]().save(str(d / "tokenizer.json"))
    bos, eos = BOS_EOS[kind]
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "chat_template": TEMPLATES[kind]}))
    return d
