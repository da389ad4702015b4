"""Errors that end a request with a status the client can act on.

Every error raised on the request path is an `EppError`; the ext_proc edge turns it into an
ImmediateResponse whose body follows the upstream EPP's wire format
``inference error: <Code> - <message>``.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Upstream error code names with their HTTP status."""

    BadRequest = 400
    NotFound = 404
    RequestTimeout = 408
    PayloadTooLarge = 413
    ResourceExhausted = 429
    Internal = 500
    ServiceUnavailable = 503

    @property
    def http_status(self) -> int:
        return self.value


class EppError(Exception):
    """A request failed in a way the client should see."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def body(self) -> str:
        return f"inference error: {self.code.name} - {self.message}"

    def __repr__(self) -> str:
        return f"EppError({self.code.name}, {self.message!r})"


def bad_request(message: str) -> EppError:
    return EppError(ErrorCode.BadRequest, message)


def unavailable(message: str) -> EppError:
    return EppError(ErrorCode.ServiceUnavailable, message)
