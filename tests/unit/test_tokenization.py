"""Tokenizers loaded from directories, chat templates rendered as vLLM does, and faults."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from epp.sim import tinytok
from epp.tokenization import ModelTokenizer, Prompt, TokenizerError, TokenizerPool, prompt_of

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinytok.write(tmp_path_factory.mktemp("tok"))


def test_the_project_tokenizer_is_deterministic(tokdir: Path, tmp_path: Path) -> None:
    again = tinytok.write(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (tokdir / "tokenizer.json").read_bytes()


def _rewrite(directory: str, times: int) -> None:
    for _ in range(times):
        tinytok.write(directory)


def test_a_directory_rewritten_meanwhile_always_loads(tmp_path: Path) -> None:
    # Benchmarks share one tokenizer directory and each writes it at start: a process
    # loading it then must read the old files or the new ones, never half of one.
    tinytok.write(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_rewrite, args=(str(tmp_path), 15)) for _ in range(2)]
    for w in writers:
        w.start()
    loads = 0
    while any(w.is_alive() for w in writers) or loads < 20:
        ModelTokenizer(MODEL, tmp_path)  # raises TokenizerError on a torn file
        loads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0


def test_chat_is_rendered_with_the_template_then_tokenized_without_extra_specials(tokdir: Path) -> None:
    tok = ModelTokenizer(MODEL, tokdir)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    text = tok.render_chat(messages)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "You are a helpful assistant.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
                    "<|end_header_id|>\n\n")
    ids = tok.encode(text, add_special_tokens=False)
    bos = tok._tok.token_to_id(tinytok.BOS)
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS, not a second one
    # A completion prompt gets the tokenizer's BOS.
    assert tok.encode("Hi", add_special_tokens=True)[0] == bos
    assert tok.encode_unlocked(text, False) == ids
    # An earlier turn's tokens are a prefix of the next turn's (what the cache reuses).
    longer = tok.encode(tok.render_chat(messages + [{"role": "assistant", "content": "Hello"}]), False)
    assert longer[: len(ids) - 5] == ids[: len(ids) - 5]


def test_prompt_of_request_bodies(tokdir: Path) -> None:
    tok = ModelTokenizer(MODEL, tokdir)
    chat = prompt_of(tok, "chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert chat is not None and not chat.add_special_tokens and chat.text.endswith("\n\n")
    assert prompt_of(tok, "completions", {"prompt": "abc"}) == Prompt("abc", True)
    assert prompt_of(tok, "completions", {"prompt": ["abc"]}) == Prompt("abc", True)
    assert prompt_of(tok, "completions", {"prompt": [1, 2, 3]}) is None
    assert prompt_of(tok, "responses", {"input": "abc"}) is None
    # chat_template_kwargs reach the template, but cannot replace the messages.
    kw = prompt_of(tok, "chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                              "chat_template_kwargs": {"messages": "oops"}})
    assert kw == chat


def test_hostile_templates_are_sandboxed(tmp_path: Path, tokdir: Path) -> None:
    d = tmp_path / "evil"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tokdir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ messages.__class__.__mro__ }}{{ raise_exception('no') }}"}))
    tok = ModelTokenizer(MODEL, d)
    with pytest.raises(TokenizerError) as e:
        tok.render_chat([{"role": "user", "content": "x"}])
    assert e.value.reason == "chat_template_error"


def test_missing_and_corrupt_files(tmp_path: Path, tokdir: Path) -> None:
    with pytest.raises(TokenizerError) as e:
        ModelTokenizer(MODEL, tmp_path / "nowhere")
    assert e.value.reason == "tokenizer_missing"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(TokenizerError) as e:
        ModelTokenizer(MODEL, bad)
    assert e.value.reason == "tokenizer_corrupt"
    badcfg = tmp_path / "badcfg"
    badcfg.mkdir()
    (badcfg / "tokenizer.json").write_bytes((tokdir / "tokenizer.json").read_bytes())
    (badcfg / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError) as e:
        ModelTokenizer(MODEL, badcfg)
    assert e.value.reason == "tokenizer_corrupt"
    # No template: a chat request cannot be rendered (the scorer falls back).
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((tokdir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError) as e:
        ModelTokenizer(MODEL, plain).render_chat([{"role": "user", "content": "x"}])
    assert e.value.reason == "no_chat_template"


async def test_pool_loads_once_caches_and_offloads_long_prompts(tokdir: Path, tmp_path: Path) -> None:
    pool = TokenizerPool({MODEL: str(tokdir), "broken": str(tmp_path / "nowhere")},
                         inline_max_chars=100)
    try:
        assert set(pool.load_all()) == {"broken"}
        with pytest.raises(TokenizerError) as e:
            pool.get("broken")
        assert e.value.reason == "tokenizer_missing"
        with pytest.raises(TokenizerError) as e:
            pool.get("unknown-model")  # two tokenizers configured: no guessing
        assert e.value.reason == "no_tokenizer"
        long = Prompt("The model server keeps a cache. " * 50, True)
        ids = await pool.encode_async(MODEL, long)  # in the worker thread
        assert ids == pool.get(MODEL).encode(long.text, True)
        assert pool.cached(MODEL, long) is ids
        assert pool.encode(MODEL, long) is ids
        short = Prompt("hi", True)
        assert await pool.encode_async(MODEL, short) == pool.get(MODEL).encode("hi", True)
    finally:
        pool.close()
    # One tokenizer serves every model name (adapters use their base model's).
    single = TokenizerPool({MODEL: str(tokdir)})
    assert single.get("food-review") is single.get(MODEL)


async def test_text_the_tokenizer_cannot_take_is_a_tokenizer_error(tokdir: Path) -> None:
    # "\ud800" is a legal JSON string escape; the Rust tokenizer refuses lone surrogates.
    pool = TokenizerPool({MODEL: str(tokdir)}, inline_max_chars=4)
    try:
        for p in (Prompt("a\ud800b", True), Prompt("long \ud800 text", True)):
            with pytest.raises(TokenizerError) as e:
                await pool.encode_async(MODEL, p)
            assert e.value.reason == "untokenizable"
    finally:
        pool.close()
