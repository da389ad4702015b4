"""Bodies that are not what they claim are 400 with a clear message, never routed
(issue 12, defect 4)."""

from __future__ import annotations

import json

import pytest

from epp.errors import EppError, ErrorCode
from epp.request import parse_body, parse_request_body, with_model

COMPLETION = {"model": "m", "prompt": "hi"}


def rejected(path: str, body: bytes) -> str:
    with pytest.raises(EppError) as e:
        parse_request_body(path, body)
    assert e.value.code is ErrorCode.BadRequest
    return e.value.message


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                  "/v1/responses"])
def test_an_empty_body_to_an_inference_api_names_no_model(path: str) -> None:
    assert "model not found" in rejected(path, b"")


def test_a_request_that_needs_no_body_still_routes_without_one() -> None:
    assert parse_request_body("/v1/models", b"") is None


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_json_that_is_not_utf8_is_rejected(encoding: str) -> None:
    body = json.dumps(COMPLETION).encode(encoding)
    assert json.loads(body)["model"] == "m"  # what json.loads alone would accept
    assert "not UTF-8" in rejected("/v1/completions", body) or "invalid JSON" in rejected(
        "/v1/completions", body)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_rejected(number: str) -> None:
    body = b'{"model": "m", "prompt": "hi", "temperature": %s}' % number.encode()
    assert f"number {number} is not finite" in rejected("/v1/completions", body)


def test_finite_numbers_survive_a_rewrite_as_json() -> None:
    body = b'{"model": "m", "prompt": "hi", "temperature": 0.7, "top_p": 1e-3, "n": 2}'
    out = with_model(parse_body("/v1/completions", body), "other")
    assert json.loads(out, parse_constant=lambda c: pytest.fail(c)) == {
        "model": "other", "prompt": "hi", "temperature": 0.7, "top_p": 0.001, "n": 2}


def test_a_byte_order_mark_is_rejected() -> None:
    assert "invalid JSON body" in rejected("/v1/completions",
                                           b"\xef\xbb\xbf" + json.dumps(COMPLETION).encode())
