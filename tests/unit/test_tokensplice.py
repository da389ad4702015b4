"""The prefix cache of tokenized prompts: where prompts are cut, when splicing is refused,
and that a shared system prompt is tokenized once. (The property that spliced ids equal
whole ids for any text is in tests/fuzz/test_fuzz_splice.py.)"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from tokenizers import AddedToken

from epp import tokensplice
from epp.sim import tinytok
from epp.tokenization import ModelTokenizer, Prompt, TokenizerError, TokenizerPool
from tests import local_tokenizers

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SYSTEM = "You are a helpful assistant. Answer the question below in one short paragraph. " * 60


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinytok.write(tmp_path_factory.mktemp("tok"))


def _chat(tok: ModelTokenizer, question: str) -> str:
    return tok.render_chat([{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": question}])


def test_a_prompt_is_cut_in_front_of_the_templates_special_tokens(tokdir: Path) -> None:
    tok = ModelTokenizer(MODEL, tokdir)
    sp = tok.splicer()
    assert sp is not None and tok.splice_off_reason is None
    assert set(sp.anchors) == {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"}  # <|end_of_text|> is not in the template
    text = tok.render_chat([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi"}])
    pieces = [p for _, p in sp.pieces(text)]
    assert pieces == ["<|begin_of_text|>", "<|start_header_id|>system",
                      "<|end_header_id|>\n\nBe brief.", "<|eot_id|>", "<|start_header_id|>user",
                      "<|end_header_id|>\n\nHi", "<|eot_id|>", "<|start_header_id|>assistant",
                      "<|end_header_id|>\n\n"]
    assert "".join(pieces) == text
    assert [p for _, p in sp.pieces("no anchor here")] == ["no anchor here"]
    assert sp.pieces("") == []
    # Completion prompts get BOS from the post-processor, put in front of the joined pieces.
    assert sp.specials == ((tok._tok.token_to_id(tinytok.BOS),), ())


def test_pieces_are_tokenized_with_their_anchor_because_alone_they_differ(tmp_path: Path) -> None:
    # Why a piece keeps its anchor: Metaspace "first" (Llama 2) prepends "▁" only at
    # offset 0, so a piece tokenized alone is not what it is inside the whole text.
    tok = ModelTokenizer("llama2", local_tokenizers.write("metaspace_first", tmp_path))
    text = "<s>[INST] Hi [/INST]Hello there"
    whole = tok.encode(text, False)
    cut = text.index("Hello")
    naive = tok.encode(text[:cut], False) + tok.encode(text[cut:], False)
    assert naive != whole
    anchored = tok.encode(text[:text.index("[/INST]")], False) + tok.encode(text[text.index("[/INST]"):], False)
    assert anchored == whole


def test_which_added_tokens_may_be_anchors() -> None:
    tok = local_tokenizers.byte_level()
    tok.add_special_tokens([
        AddedToken("<|left|>", lstrip=True, normalized=False),   # eats whitespace before it
        AddedToken("<|a|>", normalized=False),
        AddedToken("<|a|>x<|b|>", normalized=False),             # contains <|a|>: wins over it
        AddedToken("<|c|", normalized=False),                    # overlaps <|c|...
        AddedToken("|c|>", normalized=False),
        AddedToken("tool>", normalized=False),                   # starts with a word char
        AddedToken("<|norm|>", normalized=True),
    ])
    got = tokensplice.anchor_candidates(tok)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|sep|>", "<|a|>x<|b|>"} <= set(got)
    for refused in ("<|left|>", "<|a|>", "<|c|", "|c|>", "tool>", "<|norm|>",
                    "xyz", "cafe"):
        assert refused not in got, refused


def test_the_load_time_check_refuses_an_unsafe_cut() -> None:
    # Forced to cut in front of an lstrip token, the pieces differ from the whole text
    # ("a  <|left|>" matches the token with the spaces): the self-check must notice.
    tok = local_tokenizers.byte_level()
    tok.add_special_tokens([AddedToken("<|left|>", lstrip=True, normalized=False)])
    unsafe = {"<|left|>": tok.token_to_id("<|left|>")}
    assert tokensplice.plan(tok, ["x  <|left|>y"], anchors=unsafe) == "self_check_failed"
    # The same tokenizer with its safe anchors passes.
    assert isinstance(tokensplice.plan(tok, ["<|im_start|>x<|im_end|>"]), tokensplice.Splicer)


def test_splicing_off_is_said_once_and_prompts_are_then_cached_whole(
        tokdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = tmp_path / "plain"  # no chat template: no anchors known
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((tokdir / "tokenizer.json").read_bytes())
    pool = TokenizerPool({MODEL: str(plain)}, splice_min_chars=0)
    with caplog.at_level(logging.INFO, logger="epp.tokenization"):
        pool.load_all()
        tok = pool.get(MODEL)
        text = "<|begin_of_text|>" + SYSTEM + "<|eot_id|>"
        assert pool.encode(MODEL, Prompt(text, False)) == tok.encode(text, False)
    said = [r.getMessage() for r in caplog.records if "cached whole only" in r.getMessage()]
    assert len(said) == 1 and "no_anchor_in_chat_template" in said[0]
    assert list(pool._cache) == [(MODEL, text, False)]
    # A tokenizer that encodes special tokens as text has no anchors at all.
    raw = local_tokenizers.byte_level()
    raw.encode_special_tokens = True
    assert tokensplice.plan(raw, ["<|im_start|>x"]) == "encodes_special_tokens_as_text"


async def test_a_shared_system_prompt_is_tokenized_once(
        tokdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenized: list[tuple[str, list[str]]] = []
    real = ModelTokenizer.encode_pieces

    def spy(self: ModelTokenizer, texts: list[str], unlocked: bool = False) -> list[list[int]]:
        tokenized.append((threading.current_thread().name, list(texts)))
        return real(self, texts, unlocked)

    monkeypatch.setattr(ModelTokenizer, "encode_pieces", spy)
    pool = TokenizerPool({MODEL: str(tokdir)}, inline_max_chars=2048)
    try:
        tok = pool.get(MODEL)
        first = _chat(tok, "What is a KV cache?")
        assert await pool.encode_async(MODEL, Prompt(first, False)) == tok.encode(first, False)
        (thread, texts), = tokenized
        assert thread.startswith("epp-tokenize") and any(SYSTEM in t for t in texts)
        tokenized.clear()
        second = _chat(tok, "Why route by prefix?")
        assert await pool.encode_async(MODEL, Prompt(second, False)) == tok.encode(second, False)
        # Only the new question, on the event loop's thread (short).
        assert tokenized == [(threading.current_thread().name,
                              ["<|end_header_id|>\n\nWhy route by prefix?"])]
        # Below SPLICE_MIN_CHARS a prompt is tokenized whole, as before.
        tokenized.clear()
        short = tok.render_chat([{"role": "user", "content": "hi"}])
        assert pool.encode(MODEL, Prompt(short, False)) == tok.encode(short, False)
        assert tokenized == []
        # A completion prompt with the same text gets BOS in front, as the whole would.
        tokenized.clear()
        text = "<|eot_id|>" + SYSTEM
        assert pool.encode(MODEL, Prompt(text, True)) == tok.encode(text, True)
    finally:
        pool.close()


async def test_an_untokenizable_piece_is_a_tokenizer_error(tokdir: Path) -> None:
    pool = TokenizerPool({MODEL: str(tokdir)}, splice_min_chars=0, inline_max_chars=4)
    try:
        text = "<|begin_of_text|>ok<|eot_id|>bad \ud800 text"
        with pytest.raises(TokenizerError) as e:
            pool.encode(MODEL, Prompt(text, False))
        assert e.value.reason == "untokenizable"
        with pytest.raises(TokenizerError) as e:
            await pool.encode_async(MODEL, Prompt(text, False))  # in the worker thread
        assert e.value.reason == "untokenizable"
    finally:
        pool.close()


def test_a_template_that_refuses_the_probe_chats_still_gets_a_plan(tmp_path: Path, tokdir: Path) -> None:
    d = tmp_path / "strict"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tokdir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}")}))
    tok = ModelTokenizer(MODEL, d)
    sp = tok.splicer()
    assert sp is not None and set(sp.anchors) == {"<|start_header_id|>", "<|eot_id|>"}
