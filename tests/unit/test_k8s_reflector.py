"""The reflector's retry pacing, with a scripted list function instead of an API server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from epp.k8s.reflector import Reflector


class _Resp:
    def __init__(self, payload: bytes) -> None:
        self.data = payload

    def stream(self, amt: Any = None, decode_content: bool = False):
        yield self.data

    def release_conn(self) -> None:
        pass


class _Stop:
    """Stands in for the reflector's stop event: records each pause, ends after `n` of them."""

    def __init__(self, n: int) -> None:
        self.n, self.pauses = n, []

    def is_set(self) -> bool:
        return len(self.pauses) >= self.n

    def wait(self, timeout: float) -> bool:
        self.pauses.append(timeout)
        return self.is_set()

    def set(self) -> None:
        self.n = 0


def test_a_watch_that_keeps_failing_after_each_relist_backs_off():
    """The list works but every watch answers an ERROR event at once (say, a 500 from the
    storage layer): each round relists. The pauses between rounds must grow, or the EPP
    sends a full LIST to the API server every half second for as long as it lasts."""
    calls = {"list": 0, "watch": 0}

    def list_fn(**kw: Any) -> _Resp:
        if kw.get("watch"):
            calls["watch"] += 1
            event = {"type": "ERROR", "object": {"kind": "Status", "code": 500,
                                                 "message": "internal error"}}
            return _Resp(json.dumps(event).encode() + b"\n")
        calls["list"] += 1
        return _Resp(json.dumps({"items": [], "metadata": {"resourceVersion": "5"}}).encode())

    loop = asyncio.new_event_loop()
    try:
        r = Reflector("pods", list_fn, loop, lambda items: None, lambda t, o: None,
                      backoff_initial=0.5, backoff_max=30.0)
        stop = _Stop(8)
        r._stop = stop  # type: ignore[assignment]
        r._run()
    finally:
        loop.close()
    assert calls["list"] == calls["watch"] == 8
    assert r.stats.gone == 8
    # Exponential: the last pause is far above the first (0.25-0.5 s, then doubling).
    assert stop.pauses[0] <= 0.5
    assert stop.pauses[-1] >= 8.0, stop.pauses


def test_a_healthy_watch_resets_the_backoff():
    """After a watch that delivered events, the next failure waits only the initial pause."""
    rounds = {"n": 0}

    def list_fn(**kw: Any) -> _Resp:
        if not kw.get("watch"):
            return _Resp(json.dumps({"items": [], "metadata": {"resourceVersion": "5"}}).encode())
        rounds["n"] += 1
        if rounds["n"] == 4:  # one good watch among failures
            added = {"type": "ADDED", "object": {"metadata": {"name": "p", "resourceVersion": "6"}}}
            return _Resp(json.dumps(added).encode() + b"\n")
        event = {"type": "ERROR", "object": {"code": 500, "message": "boom"}}
        return _Resp(json.dumps(event).encode() + b"\n")

    loop = asyncio.new_event_loop()
    try:
        r = Reflector("pods", list_fn, loop, lambda items: None, lambda t, o: None,
                      backoff_initial=0.5, backoff_max=30.0)
        stop = _Stop(5)
        r._stop = stop  # type: ignore[assignment]
        r._run()
    finally:
        loop.close()
    # pauses: 3 growing ones, then (after the good watch) the next is from the start again
    assert stop.pauses[2] >= 1.0
    assert stop.pauses[3] <= 0.5, stop.pauses
