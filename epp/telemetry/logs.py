"""Log set-up: the usual text lines, or one JSON object per line (`--log-format json`).

The request being handled is a context variable, set by the gRPC edge when a request's
id is known; every line logged while handling it (in its task) carries `request_id`.
A `logging` call may attach structured fields with `extra={"fields": {...}}` (the routing
decision line does); JSON output merges them into the object, text output appends them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from epp.telemetry.records import clip

REQUEST_ID: ContextVar[str] = ContextVar("epp_request_id", default="")

LOG_FORMATS = ("text", "json")


def set_request_id(request_id: str) -> None:
    """Tag the current task's log lines with this request (clipped: the id is a client header)."""
    REQUEST_ID.set(clip(request_id))


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, then any fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname).1s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        fields = getattr(record, "fields", None)
        extra = [f"request_id={rid}"] if rid else []
        if isinstance(fields, dict):
            extra += [f"{k}={json.dumps(v, ensure_ascii=False, default=str)}"
                      for k, v in fields.items() if k != "request_id"]
        return f"{line} [{' '.join(extra)}]" if extra else line


def setup_logging(verbosity: int, fmt: str = "text") -> None:
    """Root logging as the flags say: -v 4 and above is debug (the decision lines)."""
    level = logging.DEBUG if verbosity >= 4 else logging.INFO if verbosity >= 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
