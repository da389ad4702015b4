"""Approximate tokens: the simulator has no tokenizer.

A text prompt counts one token per 4 characters (rounded up), which is close to what
BPE tokenizers give for English; token-id prompts count one token per id. These counts
are what `usage` reports and what the cost model charges, so they are approximations
of the real model's numbers, by design.

Prefix caching works on full blocks of `block_size` tokens, as in vLLM: block k is
identified by a hash chained over all blocks before it (and the adapter, whose KV
differs from the base model's), so two prompts share cached blocks exactly as far as
they share a prefix, in whole blocks.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

CHARS_PER_TOKEN = 4

_VOCAB = (
    " the", " model", " server", " token", " cache", " batch", " queue", " route",
    " fast", " slow", " data", " pod", " of", " and", " to", " is", " a", " for",
    " food", " review", " great", " tasty", " design", " part", " cad", " metal",
)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the engine sees it: its length and the hashes of its full blocks."""

    num_tokens: int
    block_hashes: tuple[int, ...]
    token_ids: Sequence[int] | None = None
    """The ids, when known (a token-id prompt, or text with a tokenizer): KV events carry them."""


def count_text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def text_prompt(text: str, block_size: int, salt: str = "") -> Prompt:
    """A text prompt: ~4 characters per token; blocks are `block_size`*4 characters."""
    n = count_text_tokens(text)
    span = block_size * CHARS_PER_TOKEN
    data = text.encode("utf-8", "surrogatepass")
    if len(data) == len(text):  # ASCII: bytes index like characters
        chunks = [data[i * span:(i + 1) * span] for i in range(n // block_size)]
    else:
        chunks = [text[i * span:(i + 1) * span].encode("utf-8", "surrogatepass")
                  for i in range(n // block_size)]
    return Prompt(n, _chain(chunks, salt))


def ids_prompt(ids: Sequence[int], block_size: int, salt: str = "") -> Prompt:
    """A token-id prompt: one token per id."""
    n = len(ids)
    arr = array("q", ids)
    raw = arr.tobytes()
    width = block_size * arr.itemsize
    chunks = [raw[i * width:(i + 1) * width] for i in range(n // block_size)]
    return Prompt(n, _chain(chunks, salt), ids)


def _chain(chunks: list[bytes], salt: str) -> tuple[int, ...]:
    parent = xxhash.xxh3_64_intdigest(("sim-root:" + salt).encode())
    out = []
    for chunk in chunks:
        parent = xxhash.xxh3_64_intdigest(chunk, seed=parent)
        out.append(parent)
    return tuple(out)


def chat_template(messages: list[dict[str, Any]]) -> str:
    """Render chat messages as one text, like a chat template does (role headers + content).

    Earlier turns of a conversation render to a text prefix of later ones, so multi-turn
    chats hit the prefix cache as they do on a real server.
    """
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict)
            )
        elif content is None:
            content = ""
        parts.append(f"<|start_header_id|>{m.get('role', 'user')}<|end_header_id|>\n\n"
                     f"{content}<|eot_id|>")
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


class TextGenerator:
    """Made-up output text, one vocabulary word per token, repeatable from a seed."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def tokens(self, n: int) -> list[str]:
        choice = self._rng.choice
        return [choice(_VOCAB) for _ in range(n)]
