"""A small deterministic tokenizer the project builds itself, for tests and the demo.

Real tokenizers are downloads; this one is trained here, with the `tokenizers` library, on
a fixed built-in corpus: byte-level BPE (any text encodes, no unknown tokens) with ~1,000
tokens, Llama-3-style special tokens and a Llama-3-style chat template. Training on the
same corpus gives the same `tokenizer.json` every time, so the simulator and the EPP,
each loading the directory, cut prompts into the same tokens, as vLLM and a real EPP
would with a model's tokenizer.

    python -m epp.sim.tinytok DIR      # writes DIR/tokenizer.json, DIR/tokenizer_config.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
VOCAB_SIZE = 1024

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

_CORPUS = """\
The model server keeps a cache of key and value tensors for every token of a prompt.
A request that shares a prefix with an earlier one reuses those blocks and skips their
prefill, so routing it to the server that holds the blocks saves time to first token.
You are a helpful assistant. Answer the question below in one short paragraph.
Write as if you were a critic: San Francisco food review, great tasty design part cad metal.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 2025.
Summarise the following document, then list three questions a reader might ask about it.
System prompt: the assistant speaks politely, cites its sources and never guesses.
queue batch route fast slow data pod of and to is a for with on in at by from this that.
"""


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return tok


def write(directory: str | Path) -> Path:
    """Build the tokenizer into `directory` (created); returns the directory.

    Each file is written beside its final name and then renamed over it, so that a
    process loading the directory while another (re)writes it (two benchmarks sharing
    one directory) reads the old file or the new one, never half of one."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "bos_token": BOS,
        "eos_token": "<|eot_id|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _replace(d / "tokenizer.json", build().to_str(pretty=True))  # as Tokenizer.save writes it
    _replace(d / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return d


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m epp.sim.tinytok DIR", file=sys.stderr)
        return 2
    print(write(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
