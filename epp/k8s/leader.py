"""Leader election over a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does.

Every replica runs the watches (a hot standby); only the leader reports ready, so the
gateway sends traffic to one EPP whose in-memory state (queues, prefix cache) is whole.

Each `retry_period` a thread reads the Lease:
- none, or its holder has not renewed for `lease_duration` as seen by *our* clock (we time
  how long the record stays unchanged, so clock skew between replicas does not matter),
  or it was released (empty holder): take it with an optimistic-concurrency update;
- we hold it: renew. If renewals keep failing for `renew_deadline`, step down, so that a
  partitioned leader stops serving before anyone else can take over.
A conflicting write (409) just means someone else won this round.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


def _now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for `namespace/name`; `is_leader` and listeners report the outcome."""

    def __init__(
        self,
        api_client: Any,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        from kubernetes import client

        self._api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.is_leader = False
        self.transitions = 0
        self._listeners: list[Callable[[bool], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0

    def add_listener(self, cb: Callable[[bool], None]) -> None:
        """`cb(is_leader)` runs on the event loop after every change."""
        self._listeners.append(cb)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.name}",
                                        daemon=True)
        self._thread.start()

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; if leading and `release`, hand the lease back at once."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        if release and self.is_leader:
            await asyncio.get_running_loop().run_in_executor(None, self._release)
        self._set(False)

    # -- thread side ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._try_once()
            except Exception as e:  # noqa: BLE001 - the campaign must survive anything
                log.warning("lease %s: %s: %s", self.name, type(e).__name__,
                            str(e).replace("\n", " ")[:200])
            if self.is_leader and time.monotonic() - self._last_renew > self.renew_deadline:
                log.warning("lease %s: could not renew for %.1fs; stepping down",
                            self.name, self.renew_deadline)
                self._set(False)
            self._stop.wait(self.retry_period)

    def _try_once(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._api.read_namespaced_lease(self.name, self.namespace,
                                                   _preload_content=False,
                                                   _request_timeout=self._timeout())
            lease = json.loads(resp.data)
        except ApiException as e:
            if e.status != 404:
                raise
            lease = None
        now_mono = time.monotonic()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(transitions=0, acquire=True),
            }
            if self._write(create=True, body=body):
                self._won(now_mono)
            return
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"),
                  spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, now_mono
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder == self.identity:
            new_spec = dict(spec, **self._spec(spec.get("leaseTransitions") or 0, acquire=False))
        elif holder and now_mono - self._observed_at < duration:
            self._set(False)  # someone else holds a live lease
            return
        else:
            new_spec = self._spec((spec.get("leaseTransitions") or 0) + 1, acquire=True)
        lease["spec"] = new_spec
        if self._write(create=False, body=lease):
            self._won(now_mono)

    def _timeout(self) -> float | tuple[float, float]:
        """Request timeout: while leading, no call may outlast the renew deadline.

        Otherwise a leader whose API server stopped answering would sit in a read for
        seconds past its deadline and keep reporting ready while a follower, seeing the
        lease unrenewed for `lease_duration`, takes over: two ready replicas. A total
        (connect + read) budget of what is left makes the step-down happen on time.
        """
        if not self.is_leader:
            return (3.0, self.retry_period + 3.0)
        left = self.renew_deadline - (time.monotonic() - self._last_renew)
        return max(0.1, min(self.retry_period + 3.0, left))

    def _spec(self, transitions: int, acquire: bool) -> dict[str, Any]:
        now = _now_micro()
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, int(round(self.lease_duration))),
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = now
        return spec

    def _write(self, *, create: bool, body: dict[str, Any]) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            if create:
                self._api.create_namespaced_lease(self.namespace, body,
                                                  _request_timeout=self._timeout())
            else:
                self._api.replace_namespaced_lease(self.name, self.namespace, body,
                                                   _request_timeout=self._timeout())
            return True
        except ApiException as e:
            if e.status in (409, 422):
                log.debug("lease %s: lost a race (%s)", self.name, e.status)
                return False
            raise

    def _won(self, now_mono: float) -> None:
        self._last_renew = now_mono
        if not self.is_leader:
            self.transitions += 1
            log.info("lease %s: %s is now the leader", self.name, self.identity)
        self._set(True)

    def _release(self) -> None:
        """Give the lease up so a follower need not wait out the duration."""
        try:
            resp = self._api.read_namespaced_lease(self.name, self.namespace,
                                                   _preload_content=False,
                                                   _request_timeout=(3, 5))
            lease = json.loads(resp.data)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=_now_micro())
            lease["spec"] = spec
            self._api.replace_namespaced_lease(self.name, self.namespace, lease,
                                               _request_timeout=(3, 5))
            log.info("lease %s: released", self.name)
        except Exception as e:  # noqa: BLE001 - best effort; the lease expires anyway
            log.warning("lease %s: release failed: %s", self.name, e)

    def _set(self, leading: bool) -> None:
        if leading == self.is_leader:
            return
        self.is_leader = leading
        loop = self._loop
        if loop is None:
            return

        def notify() -> None:
            for cb in list(self._listeners):
                try:
                    cb(leading)
                except Exception:  # noqa: BLE001
                    log.exception("leader listener failed")

        if threading.current_thread() is threading.main_thread() or _on_loop(loop):
            notify()
        else:
            try:
                loop.call_soon_threadsafe(notify)
            except RuntimeError:
                pass


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
