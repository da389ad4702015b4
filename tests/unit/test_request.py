"""OpenAI bodies in, routing fields out."""

from __future__ import annotations

import json

import pytest

from epp.errors import ErrorCode, EppError
from epp.request import ApiKind, api_kind, parse_body, parse_usage, with_model


def body(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def test_completion_with_a_string_prompt() -> None:
    p = parse_body("/v1/completions", body(model="food-review", prompt="Hello", max_tokens=5))
    assert (p.api, p.model, p.prompt_text, p.stream) == (ApiKind.COMPLETIONS, "food-review", "Hello", False)


@pytest.mark.parametrize("prompt, text", [
    (["a", "b"], "a\nb"),
    ([1, 2, 3], "1 2 3"),
    ([[1, 2], [3]], "1 2\n3"),
])
def test_completion_prompt_forms(prompt: object, text: str) -> None:
    assert parse_body("/v1/completions", body(model="m", prompt=prompt)).prompt_text == text


def test_chat_messages_serialise_so_earlier_turns_are_a_prefix() -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    longer = first + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    a = parse_body("/v1/chat/completions", body(model="m", messages=first)).prompt_text
    b = parse_body("/v1/chat/completions", body(model="m", messages=longer, stream=True))
    assert b.prompt_text.startswith(a)
    assert b.stream is True


def test_embeddings_and_responses() -> None:
    assert parse_body("/v1/embeddings", body(model="e", input="text")).prompt_text == "text"
    r = parse_body("/v1/responses", body(model="m", input="q", instructions="sys: "))
    assert (r.api, r.prompt_text) == (ApiKind.RESPONSES, "sys: q")


def test_path_with_query_and_trailing_slash() -> None:
    assert api_kind("/v1/chat/completions/?x=1") is ApiKind.CHAT_COMPLETIONS
    assert api_kind("/v2/other") is ApiKind.OTHER


@pytest.mark.parametrize("raw, message", [
    (b'{"model": "m", "prompt": ', "invalid JSON body"),
    (b"\xff\xfe", "invalid JSON body"),
    (b"[1, 2]", "request body must be a JSON object"),
    (body(prompt="p"), "model not found in request body"),
    (body(model=7, prompt="p"), "model must be a non-empty string"),
    (body(model="", prompt="p"), "model must be a non-empty string"),
    (body(model="m"), "prompt not found in request body"),
    (body(model="m", prompt={"x": 1}), "prompt must be a string"),
    (body(model="m", prompt="p", stream="yes"), "stream must be a boolean"),
])
def test_bad_completion_bodies_are_400(raw: bytes, message: str) -> None:
    with pytest.raises(EppError) as e:
        parse_body("/v1/completions", raw)
    assert e.value.code is ErrorCode.BadRequest
    assert message in e.value.message
    assert e.value.body.startswith("inference error: BadRequest - ")


@pytest.mark.parametrize("messages", [None, [], "hi", [1]])
def test_bad_chat_messages_are_400(messages: object) -> None:
    payload = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    with pytest.raises(EppError) as e:
        parse_body("/v1/chat/completions", json.dumps(payload).encode())
    assert e.value.code is ErrorCode.BadRequest


def test_unknown_path_needs_only_a_model() -> None:
    assert parse_body("/v1/audio/transcriptions", body(model="whisper")).prompt_text == ""


def test_with_model_rewrites_only_the_model() -> None:
    p = parse_body("/v1/completions", body(model="food-review", prompt="p", max_tokens=3))
    assert json.loads(with_model(p, "food-review-v2")) == {"model": "food-review-v2", "prompt": "p", "max_tokens": 3}


def test_usage_from_json_and_from_sse() -> None:
    assert parse_usage(body(usage={"prompt_tokens": 11, "completion_tokens": 4})).completion_tokens == 4
    sse = (b'data: {"choices":[{"text":"a"}]}\n\n'
           b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
           b"data: [DONE]\n\n")
    u = parse_usage(sse)
    assert (u.prompt_tokens, u.completion_tokens) == (5, 2)
    assert parse_usage(b"data: [DONE]\n\n") is None
    assert parse_usage(b"<html>oops</html>") is None
    assert parse_usage(b'{"usage": "lots"}') is None


def test_deeply_nested_body_is_400_not_a_crash() -> None:
    # The C JSON decoder raises RecursionError (not ValueError) on deep nesting.
    deep = b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(EppError) as e:
        parse_body("/v1/completions", deep)
    assert e.value.code is ErrorCode.BadRequest
    assert parse_usage(b'{"usage":' + b"[" * 100_000 + b"]" * 100_000 + b"}") is None
    # Near the recursion limit some depths decode but are too deep for the canonical
    # re-encoding of chat messages: each depth is either parsed or a 400, never a crash.
    outcomes = set()
    for depth in range(600, 1100, 2):
        chat = b'{"model":"m","messages":[{"content":' + b"[" * depth + b"]" * depth + b"}]}"
        try:
            parse_body("/v1/chat/completions", chat)
            outcomes.add("parsed")
        except EppError as e:
            assert e.code is ErrorCode.BadRequest
            outcomes.add("400")
    assert outcomes == {"parsed", "400"}


def test_with_model_keeps_lone_surrogates_as_json_escapes() -> None:
    # "\ud800" is legal JSON; re-serialising it must not raise UnicodeEncodeError.
    p = parse_body("/v1/completions", b'{"model":"m","prompt":"a\\ud800 \xc3\xa9"}')
    out = with_model(p, "m2")
    assert json.loads(out) == {"model": "m2", "prompt": "a\ud800 \u00e9"}
    # Bodies without surrogates keep their non-ASCII text unescaped (smaller bodies).
    p2 = parse_body("/v1/completions", body(model="m", prompt="\u00e9t\u00e9"))
    assert "\u00e9t\u00e9".encode() in with_model(p2, "m2")
