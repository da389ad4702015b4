"""Property tests of the OpenAI body parser: any bytes give a parsed body or a 400."""

from __future__ import annotations

import json
import math

from hypothesis import example, given
from hypothesis import strategies as st

from epp.errors import EppError, ErrorCode
from epp.labels import safe
from epp.request import parse_request_body, with_model

PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                         "/v1/responses", "/v1/models", "/other?x=1"])
# Any JSON value, floats included (NaN and infinities too: Python writes them as
# NaN/Infinity, which a hostile client can send).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
PROMPTS = st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                    st.lists(st.integers(0, 50000), max_size=5), JSON)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                           "content": st.text(max_size=30)}), max_size=3) | JSON


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Mostly plausible OpenAI bodies, with hostile values mixed in, in several encodings."""
    body: dict = {}
    if draw(st.booleans()):
        body["model"] = draw(st.text(max_size=30) | JSON)  # lone surrogates included
    for key, values in (("prompt", PROMPTS), ("messages", MESSAGES), ("input", PROMPTS),
                        ("stream", JSON), ("temperature", JSON)):
        if draw(st.booleans()):
            body[key] = draw(values)
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    encoding = draw(st.sampled_from(["utf-8"] * 4 + ["utf-16", "utf-32"]))
    if encoding != "utf-8":
        raw = raw.decode("utf-8", "surrogatepass").encode(encoding, "surrogatepass")
    return raw


def check(path: str, body: bytes) -> None:
    try:
        parsed = parse_request_body(path, body)
    except EppError as e:
        assert e.code is ErrorCode.BadRequest and e.message
        return
    if parsed is None:
        assert body == b""
        return
    parsed.model.encode("utf-8")  # no lone surrogate gets through
    safe(parsed.model).encode("utf-8")
    assert isinstance(parsed.prompt_text, str)
    # A rewrite re-serialises the body: it must be strict JSON again.
    out = with_model(parsed, "rewritten")
    data = json.loads(out, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))
    assert data["model"] == "rewritten"
    assert all(math.isfinite(v) for v in _floats(data))


def _floats(v):
    if isinstance(v, float):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _floats(x)
    elif isinstance(v, list):
        for x in v:
            yield from _floats(x)


@given(PATHS, bodies())
@example("/v1/completions", b'{"model": "bad\\ud800model", "prompt": "x"}')
@example("/v1/completions", b'{"model": "m", "prompt": "x", "t": NaN}')
@example("/v1/completions", b'{"model": "m", "prompt": "x", "t": 1e999}')
@example("/v1/completions", b"")
def test_openai_bodies_parse_or_are_400(path: str, body: bytes) -> None:
    check(path, body)


@given(PATHS, st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_are_400(path: str, body: bytes) -> None:
    check(path, body)


@given(st.text())
def test_any_string_becomes_an_exposable_label(value: str) -> None:
    label = safe(value)
    label.encode("utf-8")
    assert len(label) <= 128
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in label)
