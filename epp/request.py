"""OpenAI-style request bodies in, plain dataclasses out; usage out of responses.

The EPP routes on a few fields of the body (model, prompt, stream flag). Everything here
is pure and synchronous so that it can be tested and benchmarked without gRPC.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from epp.errors import bad_request

# Request headers the EPP reads (upstream names).
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_ID_HEADER = "x-gateway-inference-fairness-id"
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
REQUEST_ID_HEADER = "x-request-id"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
"""Key in the `envoy.lb` metadata of response messages: the endpoint that served."""
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
TICKET_NAMESPACE = "epp.response"
"""Dynamic metadata the routing reply sets so that the response filters' streams find the
request's routing decision (`--response-path=observed`); clients cannot set it."""
TICKET_KEY = "ticket"
RESTORE_MODEL_HEADER = "x-gateway-model-name-restore"
"""Set by the EPP on requests whose model it rewrote: routes them to the filter that
restores the client's model name in the response. Removed before the model server."""
RESPONSE_PATH_METADATA = "x-epp-response-path"
"""gRPC metadata on the routing filter's streams: `observed` when another filter follows
the response, so the routing stream's end is not the request's end."""

DEFAULT_FAIRNESS_ID = "default"


class ApiKind(str, enum.Enum):
    COMPLETIONS = "completions"
    CHAT_COMPLETIONS = "chat/completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    OTHER = "other"


_PATHS = {
    "/v1/completions": ApiKind.COMPLETIONS,
    "/v1/chat/completions": ApiKind.CHAT_COMPLETIONS,
    "/v1/embeddings": ApiKind.EMBEDDINGS,
    "/v1/responses": ApiKind.RESPONSES,
}


def api_kind(path: str) -> ApiKind:
    """The API a request path names; query strings and trailing slashes are ignored."""
    p = path.split("?", 1)[0].rstrip("/")
    return _PATHS.get(p, ApiKind.OTHER)


class ParsedBody:
    """What the scheduler needs from an OpenAI request body.

    `prompt_text` is derived on first use: only prefix-aware plugins read it, and for chat
    requests it means serialising every message."""

    __slots__ = ("api", "model", "stream", "data", "_prompt")

    def __init__(self, api: ApiKind, model: str, stream: bool, data: dict[str, Any]) -> None:
        self.api = api
        self.model = model
        self.stream = stream
        self.data = data
        """The decoded JSON object, kept so that a model rewrite can re-serialise it."""
        self._prompt: str | None = None

    @property
    def prompt_text(self) -> str:
        """The prompt as text, for prefix hashing: completions prompt, or chat messages
        serialised canonically so that a conversation's earlier turns are a text prefix."""
        if self._prompt is None:
            try:
                self._prompt = _prompt_text(self.api, self.data)
            except RecursionError:  # decodable, but too deep to re-encode: no prefix to share
                self._prompt = ""
        return self._prompt

    def token_estimate(self) -> int:
        """Prompt tokens plus the requested output, at ~4 characters a token: what the
        concurrency detector's token mode counts (no tokenizer on the request path)."""
        d = self.data
        max_tokens = d.get("max_tokens") or d.get("max_completion_tokens")
        out = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0 else 0
        return len(self.prompt_text) // 4 + out


@dataclass(slots=True)
class InferenceRequest:
    """One request as the director sees it; no protobuf types past this point."""

    request_id: str
    path: str = "/"
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    parsed: ParsedBody | None = None
    subset: tuple[str, ...] | None = None
    """The gateway's subset hint (ip:port list); None means every endpoint."""

    @property
    def objective(self) -> str | None:
        return self.headers.get(OBJECTIVE_HEADER) or None

    @property
    def fairness_id(self) -> str:
        return self.headers.get(FAIRNESS_ID_HEADER) or DEFAULT_FAIRNESS_ID

    @property
    def model_rewrite(self) -> str | None:
        return self.headers.get(MODEL_REWRITE_HEADER) or None

    @property
    def model(self) -> str:
        return self.parsed.model if self.parsed else ""

    @property
    def prompt_text(self) -> str:
        return self.parsed.prompt_text if self.parsed else ""


def parse_request_body(path: str, body: bytes) -> ParsedBody | None:
    """The parsed body of a request; None for a request that needs none (`/v1/models`).

    A request to an inference API with an empty body is a 400: it names no model (it was
    routed with model "")."""
    if body:
        return parse_body(path, body)
    if api_kind(path) is not ApiKind.OTHER:
        raise bad_request("request body is empty: model not found in request body")
    return None


def parse_body(path: str, body: bytes) -> ParsedBody:
    """Decode and validate an OpenAI request body; raises a 400 `EppError` when invalid.

    The body must be JSON as RFC 8259 says: UTF-8 (`json.loads` on bytes would also take
    UTF-16 and UTF-32), and numbers finite (`NaN`, `Infinity` and `1e999` decode to
    floats that re-serialise as `NaN`/`Infinity`, which are not JSON)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"invalid JSON body: not UTF-8 (bad byte at offset {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except _NonFinite as e:
        raise bad_request(f"invalid JSON body: number {e} is not finite") from None
    except ValueError as e:
        raise bad_request(f"invalid JSON body: {e}") from None
    except RecursionError:  # the C decoder's answer to very deep nesting
        raise bad_request("invalid JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    model = data.get("model")
    if model is None:
        raise bad_request("model not found in request body")
    if not isinstance(model, str) or not model:
        raise bad_request("model must be a non-empty string")
    if not model.isascii() and _LONE_SURROGATE.search(model):
        # Legal as a JSON escape, but no UTF-8 string can carry it (it broke /metrics).
        raise bad_request("model must be valid Unicode (it holds a lone surrogate escape)")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean")
    kind = api_kind(path)
    _check_prompt(kind, data)
    return ParsedBody(kind, model, stream, data)


class _NonFinite(ValueError):
    pass


def _non_finite(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NonFinite(text[:32])
    return value


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_prompt(kind: ApiKind, data: dict[str, Any]) -> None:
    """Reject a body without the prompt its API needs (cheap: builds no text)."""
    if kind is ApiKind.COMPLETIONS or kind is ApiKind.EMBEDDINGS:
        name = "prompt" if kind is ApiKind.COMPLETIONS else "input"
        if name not in data:
            raise bad_request(f"{name} not found in request body")
        if not _is_completion_prompt(data[name]):
            raise bad_request(f"{name} must be a string, a list of strings, or token ids")
    elif kind is ApiKind.CHAT_COMPLETIONS:
        messages = data.get("messages")
        if messages is None:
            raise bad_request("messages not found in request body")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages must be a non-empty list")
        if not all(isinstance(m, dict) for m in messages):
            raise bad_request("each message must be an object")
    elif kind is ApiKind.RESPONSES:
        if "input" not in data:
            raise bad_request("input not found in request body")
        if not isinstance(data["input"], (str, list)):
            raise bad_request("input must be a string or a list")


def _prompt_text(kind: ApiKind, data: dict[str, Any]) -> str:
    """The prompt of a body that passed `_check_prompt`."""
    if kind is ApiKind.COMPLETIONS:
        return _completion_prompt(data["prompt"])
    if kind is ApiKind.EMBEDDINGS:
        return _completion_prompt(data["input"])
    if kind is ApiKind.CHAT_COMPLETIONS:
        return "".join(_canonical(m) for m in data["messages"])
    if kind is ApiKind.RESPONSES:
        instructions = data.get("instructions")
        prefix = instructions if isinstance(instructions, str) else ""
        inp = data["input"]
        if isinstance(inp, str):
            return prefix + inp
        return prefix + "".join(_canonical(x) for x in inp)
    return ""


def _is_completion_prompt(prompt: Any) -> bool:
    """A prompt may be a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list):
        return False
    return (
        all(isinstance(p, str) for p in prompt)
        or all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
        or all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt)
    )


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    if all(isinstance(p, int) for p in prompt):
        return " ".join(map(str, prompt))
    return "\n".join(" ".join(map(str, p)) for p in prompt)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def with_model(parsed: ParsedBody, model: str) -> bytes:
    """The body re-serialised with another `model` (a rewrite); other fields unchanged."""
    data = dict(parsed.data)
    data["model"] = model
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        try:
            return text.encode()
        except UnicodeEncodeError:
            # Lone surrogates ("\ud800" is legal JSON) cannot be UTF-8: keep them as escapes.
            return json.dumps(data, separators=(",", ":")).encode()
    except RecursionError:  # decodable, but too deep to re-encode
        raise bad_request("invalid JSON body: nested too deeply") from None


# -- responses ---------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ResponseReader:
    """Follows one response body: puts back the model name the client sent after a
    rewrite, and keeps the tail where the token usage is (the last SSE events, or the
    end of a JSON body).

    The restoration rewrites `"model":"<target>"` to `"model":"<original>"` and holds back
    an incomplete line between chunks, so that a name split across two chunks is found.
    """

    __slots__ = ("_restore", "_carry", "_tail")

    TAIL = 64 * 1024

    def __init__(self, target_model: str = "", client_model: str = "") -> None:
        self._restore = (
            (target_model.encode("utf-8", "surrogatepass"), client_model.encode("utf-8", "surrogatepass"))
            if target_model != client_model
            else None
        )
        self._carry = b""
        self._tail = bytearray()

    @property
    def rewrites(self) -> bool:
        """True when the body may change (and its content-length with it)."""
        return self._restore is not None

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """The chunk to send on (the same object when nothing changed)."""
        self._tail += chunk
        if len(self._tail) > 2 * self.TAIL:
            del self._tail[: len(self._tail) - self.TAIL]
        if self._restore is None:
            return chunk
        data = self._carry + chunk
        if not end_of_stream:
            cut = data.rfind(b"\n") + 1
            data, self._carry = data[:cut], data[cut:]
        else:
            self._carry = b""
        target, original = self._restore
        for sep in (b'":"', b'": "'):
            data = data.replace(b'"model' + sep + target + b'"', b'"model' + sep + original + b'"')
        return data

    def usage(self) -> Usage | None:
        return parse_usage(bytes(self._tail))


def parse_usage(body: bytes) -> Usage | None:
    """Token usage from a JSON response, or from the SSE `data:` lines of a streamed one.

    Returns None when the response carries no usage (for example a stream without
    `stream_options.include_usage`). Never raises: a response is not the EPP's to reject.
    """
    text = body.lstrip()
    if text.startswith(b"{"):
        try:
            return _usage_of(json.loads(text))
        except (ValueError, RecursionError):
            return None
    found: Usage | None = None
    for line in body.splitlines():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload.startswith(b"{") or b'"usage"' not in payload:
            continue
        try:
            usage = _usage_of(json.loads(payload))
        except (ValueError, RecursionError):
            continue
        if usage is not None:
            found = usage
    return found


def _usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    # The Responses API says input/output tokens.
    p = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    c = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(p, int) or not isinstance(c, int):
        return None
    return Usage(p, c)
