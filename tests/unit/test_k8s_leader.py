"""Leader election against a scripted Lease API: a leader cut off from the API server
steps down before a follower may take over (no two ready replicas)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace
from typing import Any

from kubernetes.client.exceptions import ApiException

from epp.k8s.leader import LeaderElector


class FakeLeases:
    """One Lease in memory. With `blackhole` set, every call hangs for its read timeout and
    then fails, as on a connection whose peer stopped answering."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.blackhole = threading.Event()

    def _call(self, kw: dict[str, Any]) -> None:
        if self.blackhole.is_set():
            t = kw.get("_request_timeout")
            time.sleep(t[1] if isinstance(t, tuple) else float(t or 30))
            raise TimeoutError("read timed out")

    def read_namespaced_lease(self, name: str, namespace: str, **kw: Any) -> Any:
        self._call(kw)
        if self.lease is None:
            raise ApiException(status=404)
        return SimpleNamespace(data=json.dumps(self.lease).encode())

    def create_namespaced_lease(self, namespace: str, body: Any, **kw: Any) -> None:
        self._call(kw)
        self.lease = body

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **kw: Any) -> None:
        self._call(kw)
        self.lease = body


async def test_a_leader_cut_off_steps_down_within_the_lease_duration():
    api = FakeLeases()
    el = LeaderElector(None, namespace="ns", name="lease", identity="a",
                       lease_duration=3.0, renew_deadline=0.5, retry_period=0.1)
    el._api = api  # type: ignore[assignment]
    await el.start()
    try:
        deadline = time.monotonic() + 5
        while not el.is_leader:
            assert time.monotonic() < deadline, "never became leader"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a few renewals
        api.blackhole.set()
        last_renew = el._last_renew
        while el.is_leader:
            await asyncio.sleep(0.02)
            if time.monotonic() - last_renew > 10:
                break
        stepped_down_after = time.monotonic() - last_renew
        # A follower may take the lease lease_duration after the last renewal it saw:
        # the leader must have stopped reporting ready before that.
        assert stepped_down_after < el.lease_duration, stepped_down_after
    finally:
        await el.stop(release=False)
