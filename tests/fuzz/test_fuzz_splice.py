"""Property: a prompt tokenized in pieces (the prefix cache) has exactly the ids of the
whole prompt tokenized at once, for every tokenizer kind splicing is enabled for.

The tokenizers: the project's own (`epp.sim.tinytok`, byte-level BPE, Llama 3 template)
and the kinds of `tests/local_tokenizers.py` (GPT-2/Qwen byte-level BPE, Llama 2 / Mistral
`Metaspace` "first", Llama 2 normalizer-prepend, Unigram). Texts mix the anchors the
pieces are cut at, the other added tokens (rstrip, single_word, normalized), whitespace
runs and arbitrary Unicode, so cuts land next to everything that could merge across them.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.sim import tinytok
from epp.tokenization import ModelTokenizer, Prompt, TokenizerPool
from tests import local_tokenizers

KINDS = ["tinytok", *local_tokenizers.KINDS]


@functools.cache
def _loaded(kind: str) -> tuple[ModelTokenizer, TokenizerPool, list[str]]:
    d = Path(tempfile.mkdtemp(prefix=f"epp-tok-{kind}-"))
    if kind == "tinytok":
        tinytok.write(d)
    else:
        local_tokenizers.write(kind, d)
    # splice_min_chars=0: every prompt with an anchor is cut, however short.
    pool = TokenizerPool({kind: str(d)}, splice_min_chars=0)
    tok = pool.get(kind)
    sp = tok.splicer()
    assert sp is not None, f"{kind}: splicing off ({tok.splice_off_reason})"
    added = [a.content for a in tok._tok.get_added_tokens_decoder().values()]
    return tok, pool, list(sp.anchors) + added


_TEXTY = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", "a", "_", "x_y", "xyz", " xyz",
                          "cafe", "Café", "it's", "123", "▁", "\u00a0", "漢字", "🙂", "<", "[",
                          "You are a helpful assistant.", " the quick brown fox "])


def _texts(kind: str) -> st.SearchStrategy[str]:
    specials = _loaded(kind)[2]
    part = st.one_of(st.sampled_from(specials), _TEXTY, st.text(max_size=6))
    return st.lists(part, max_size=24).map("".join)


def _messages(kind: str) -> st.SearchStrategy[list[dict[str, str]]]:
    content = _texts(kind)
    role = st.sampled_from(["system", "user", "assistant"])
    return st.lists(st.fixed_dictionaries({"role": role, "content": content}),
                    min_size=1, max_size=5)


@pytest.mark.parametrize("kind", KINDS)
def test_spliced_ids_equal_whole_ids_for_any_text(kind: str) -> None:
    tok, pool, _ = _loaded(kind)

    @given(text=_texts(kind), add_special=st.booleans())
    def check(text: str, add_special: bool) -> None:
        whole = tok.encode(text, add_special)
        assert pool.encode(kind, Prompt(text, add_special)) == whole
        # Again, now mostly from cached pieces.
        pool._cache.pop((kind, text, add_special), None)
        assert pool.encode(kind, Prompt(text, add_special)) == whole

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_spliced_ids_equal_whole_ids_for_chats_sharing_a_system_prompt(kind: str) -> None:
    tok, pool, _ = _loaded(kind)

    @given(system=_texts(kind), turns=_messages(kind))
    def check(system: str, turns: list[dict[str, str]]) -> None:
        text = tok.render_chat([{"role": "system", "content": system}, *turns])
        assert pool.encode(kind, Prompt(text, False)) == tok.encode(text, False)

    check()
