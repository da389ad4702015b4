"""Bounds on ext_proc streams: how many may be open, and how long one may wait for
Envoy's next message (`--extproc-max-streams`, `--extproc-*-idle-timeout`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from time import monotonic as _monotonic


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Bounds on ext_proc streams, so that idle or abandoned streams cannot pile up (3,000
    idle streams were once held open with no timeout)."""

    max_streams: int = 8192
    """Concurrent streams; more are refused with RESOURCE_EXHAUSTED."""
    request_idle: float = 30.0
    """Longest wait for the next message until the request is routed (from the stream's
    start: for its headers, then between body chunks)."""
    response_idle: float = 600.0
    """Longest wait for the next message after routing: the response headers (a non-streamed
    completion sends them only when done) and each response chunk."""



class IdleTimeout(Exception):
    """The stream waited longer than its phase allows for Envoy's next message."""


class IdleWatch:
    """Ends a stream's wait for Envoy's next message after a timeout.

    One timer per stream, re-armed only when it fires while time is left, and two
    attribute writes per message: asyncio.timeout rescheduled per message cost ~50 µs a
    message here, more than handling the message."""

    __slots__ = ("loop", "task", "timeout", "since", "is_waiting", "fired", "handle")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timeout = 0.0
        self.since = 0.0
        self.is_waiting = False
        self.fired = False
        self.handle: asyncio.TimerHandle | None = None

    def waiting(self, timeout: float) -> None:
        self.timeout = timeout
        # time.monotonic, a C call: loop.time() is a Python frame around it (2.5% of the
        # busy samples in a profile, once per message); the timer runs on relative delays.
        self.since = _monotonic()
        self.is_waiting = True
        if self.handle is None:
            self.handle = self.loop.call_later(timeout, self._check)

    def received(self) -> None:
        self.is_waiting = False

    def raise_if_idle(self) -> None:
        """In the CancelledError handler of the wait: the cancel was this watch's."""
        if self.fired and self.task is not None:
            self.task.uncancel()
            raise IdleTimeout from None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _check(self) -> None:
        self.handle = None
        if not self.is_waiting or self.task is None:
            return  # re-armed by the next wait
        left = self.since + self.timeout - _monotonic()
        if left > 0:
            self.handle = self.loop.call_later(left, self._check)
            return
        self.fired = True
        self.task.cancel()
