"""Log lines for expected faults, at most one per key every few seconds.

A peer that keeps sending bad input must not be able to flood the log: each kind of
fault (a bounded key, such as a metric reason) is logged once, then again only after
`interval` seconds, saying how many were left out meanwhile. No tracebacks: these faults
are expected, and the message says what was wrong.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, key: str, level: int, msg: str, *args: Any) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` ago; True if logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return False
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            msg += " (%d more like it in the last %.0fs)"
            args = (*args, skipped, now - last if last is not None else 0.0)
        self._log.log(level, msg, *args)
        return True
