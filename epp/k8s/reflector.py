"""List-then-watch of one Kubernetes collection, on a thread, delivered to the event loop.

The `kubernetes` client is synchronous, so each collection gets one daemon thread that
lists (paginated), then watches from the list's resourceVersion, and hands every result to
the asyncio loop with `loop.call_soon_threadsafe`. All state lives on the loop side.

Failure rules, as in client-go's reflector:
- the watch ends normally (server timeout): watch again from the last resourceVersion;
- connection lost or API server away: back off (exponential, jittered), then resume the
  watch from the last resourceVersion, so nothing that happened meanwhile is missed;
- 410 Gone (the resourceVersion was compacted away) or any other watch ERROR: list again
  and deliver the whole set, which the consumer diffs against what it had;
- 404 on list (a CRD not installed) counts as an empty, synced list when `optional`,
  and is retried at the slow `absent_retry` pace; so does 403 (RBAC written for another
  EPP that lacks this collection), with a warning naming it.
Nothing is cleared while the API server is away: the consumer keeps its last state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

Obj = dict[str, Any]
ListFn = Callable[..., Any]
"""A `kubernetes` client list method with its positional args bound (functools.partial)."""


class _Gone(Exception):
    """The resourceVersion we hold is too old: relist."""


class _Stopped(Exception):
    pass


@dataclass(slots=True)
class ReflectorStats:
    """Counters the tests (and logs) use to tell what happened."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    gone: int = 0
    errors: int = 0


class Backoff:
    """Exponential backoff with jitter: each delay is uniform in [d/2, d], d doubling to max."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None):
        self.initial, self.maximum = initial, maximum
        self._rng = rng or random.Random()
        self._next = initial

    def next(self) -> float:
        d = self._next
        self._next = min(self.maximum, d * 2)
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self._next = self.initial


class Reflector:
    """Keeps a consumer on the event loop in step with one collection.

    `on_replace(items)` receives the full list after every (re)list; `on_event(type, obj)`
    each ADDED / MODIFIED / DELETED after it. Both run on `loop`.
    """

    def __init__(
        self,
        name: str,
        list_fn: ListFn,
        loop: asyncio.AbstractEventLoop,
        on_replace: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        optional: bool = False,
        watch_timeout: int = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        absent_retry: float = 30.0,
        page_size: int = 500,
    ) -> None:
        self.name = name
        self._list = list_fn
        self._loop = loop
        self._on_replace = on_replace
        self._on_event = on_event
        self._selectors: dict[str, str] = {}
        if label_selector:
            self._selectors["label_selector"] = label_selector
        if field_selector:
            self._selectors["field_selector"] = field_selector
        self._optional = optional
        self._watch_timeout = watch_timeout
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._absent_retry = absent_retry
        self._page_size = page_size
        self._stop = threading.Event()
        self._resp: Any = None
        self._thread: threading.Thread | None = None
        self.stats = ReflectorStats()
        self.resource_version: str | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"k8s-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and break any blocked read; does not wait."""
        self._stop.set()
        _abort(self._resp)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- thread side ---------------------------------------------------------------

    def _run(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            pause = 0.0
            try:
                if rv is None:
                    rv = self._relist()
                    if rv is None:  # optional collection absent
                        pause = self._absent_retry
                else:
                    started, events = time.monotonic(), self.stats.events
                    rv = self._watch(rv)
                    if self.stats.events == events and time.monotonic() - started < 1.0:
                        # Closed at once with nothing said: do not spin on such a server.
                        pause = self._backoff.next()
                    else:
                        self._backoff.reset()
            except _Stopped:
                break
            except _Gone as e:
                self.stats.gone += 1
                log.info("k8s %s: %s; listing again", self.name, e)
                rv = None
                # Only a healthy watch resets the backoff (not the relist), so a server
                # that fails every watch right after each relist is not sent a full
                # LIST twice a second: the pauses grow as for any other failure.
                pause = self._backoff.next()
            except Exception as e:  # noqa: BLE001 - the thread must survive anything
                if self._stop.is_set():
                    break
                self.stats.errors += 1
                pause = self._backoff.next()
                log.warning("k8s %s: %s: %s; retrying in %.1fs", self.name,
                            type(e).__name__, _short(e), pause)
            if pause and self._stop.wait(pause):
                break
        log.debug("k8s %s: stopped", self.name)

    def _relist(self) -> str | None:
        """List every page; deliver the set; return its resourceVersion (None if absent)."""
        from kubernetes.client.exceptions import ApiException

        items: list[Obj] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = dict(self._selectors, limit=self._page_size,
                                          _preload_content=False, _request_timeout=(5, 60))
            if cont:
                kwargs["_continue"] = cont
            try:
                resp = self._list(**kwargs)
            except ApiException as e:
                if e.status in (403, 404) and self._optional:
                    self.stats.lists += 1
                    if e.status == 404:
                        log.info("k8s %s: not served (CRD not installed?); treating as empty",
                                 self.name)
                    else:
                        log.warning("k8s %s: list forbidden (the Role lacks it); treating "
                                    "as empty", self.name)
                    self._deliver(self._on_replace, [])
                    return None
                if e.status == 410:  # continue token expired mid-list
                    raise _Gone("list continuation expired") from e
                raise
            data = json.loads(resp.data)
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                rv = str(meta.get("resourceVersion") or "")
                break
        self.stats.lists += 1
        self.resource_version = rv
        self._deliver(self._on_replace, items)
        return rv

    def _watch(self, rv: str) -> str:
        """One watch call from `rv`; returns the last resourceVersion seen."""
        from kubernetes.client.exceptions import ApiException

        timeout = int(self._watch_timeout * random.uniform(1.0, 1.5)) or 1
        self.stats.watches += 1
        try:
            resp = self._list(**self._selectors, watch=True, resource_version=rv,
                              allow_watch_bookmarks=True, timeout_seconds=timeout,
                              _preload_content=False, _request_timeout=(5, timeout + 30))
        except ApiException as e:
            if e.status == 410:
                raise _Gone("resourceVersion too old") from e
            raise
        self._resp = resp
        try:
            if self._stop.is_set():
                raise _Stopped
            for line in _lines(resp):
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise _Gone(obj.get("message") or "410 Gone")
                    raise _Gone(f"watch error {code}: {obj.get('message')}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                    self.resource_version = rv
                if etype == "BOOKMARK":
                    continue
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    self.stats.events += 1
                    self._deliver(self._on_event, etype, obj)
                if self._stop.is_set():
                    raise _Stopped
        finally:
            self._resp = None
            try:
                resp.release_conn()
            except Exception:  # noqa: BLE001
                pass
        if self._stop.is_set():
            raise _Stopped
        return rv

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()
            raise _Stopped from None


def _lines(resp: Any):
    """Yield complete JSON lines from a streaming urllib3 response."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _abort(resp: Any) -> None:
    """Wake a thread blocked reading `resp`: shut its socket down, then close it."""
    if resp is None:
        return
    conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        resp.close()
    except Exception:  # noqa: BLE001
        pass


def _short(e: BaseException) -> str:
    text = str(e).replace("\n", " ")
    return text[:200]
