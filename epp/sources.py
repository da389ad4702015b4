"""Standalone endpoint sources: a fixed `--endpoints` list or a watched `--endpoints-file`.

The Kubernetes source (`epp.k8s`) feeds the same `Datastore`; these serve local runs,
tests and gateways without Kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import yaml

from epp.datastore import Datastore, Endpoint
from epp.filewatch import DEFAULT_SETTLE, FileStamp, NotReady, read_settled
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def parse_endpoint_list(text: str) -> list[Endpoint]:
    """`10.0.0.1:8000,10.0.0.2:8000` (IPv6 as `[::1]:8000`) → endpoints named by address."""
    out = []
    for i, item in enumerate(s.strip() for s in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--endpoints entry {i} {item!r}: expected ip:port")
        host = host.strip("[]")
        out.append(Endpoint(name=f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                            address=host, port=int(port)))
    return out


def parse_endpoints_yaml(text: str) -> list[Endpoint]:
    """A YAML list of {name, address, port, labels}; `endpoints:` at the top is accepted too."""
    data: Any = yaml.safe_load(text) or []
    if isinstance(data, dict):
        data = data.get("endpoints", [])
    if not isinstance(data, list):
        raise ValueError("endpoints file must be a list of {name, address, port, labels}")
    out: list[Endpoint] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"entry {i}: expected a mapping")
        address = item.get("address")
        port = item.get("port")
        if not isinstance(address, str) or not address:
            raise ValueError(f"entry {i}: address must be a non-empty string")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"entry {i} ({address}): port must be an integer 1-65535")
        name = item.get("name") or f"{address}:{port}"
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError(f"entry {i} ({name}): labels must be a mapping")
        out.append(Endpoint(str(name), address, port, {str(k): str(v) for k, v in labels.items()}))
    names = [e.name for e in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate endpoint names: {', '.join(sorted(dup))}")
    return out


class EndpointsFileSource:
    """Re-reads the endpoints file when it changes; a bad, empty or half-written file keeps
    the last good set (see `epp.filewatch`). An empty pool is written as `[]`."""

    def __init__(self, datastore: Datastore, path: str, interval: float = 1.0,
                 settle: float = DEFAULT_SETTLE) -> None:
        self.datastore = datastore
        self.path = Path(path)
        self.interval = interval
        self.settle = settle
        self._stamp: FileStamp | None = None
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None
        self.writing = False
        """The last look found a write in progress: look again soon."""
        self.loaded = asyncio.Event()

    async def load_once(self) -> bool:
        try:
            stamp = await asyncio.to_thread(FileStamp.of, self.path)
        except OSError as e:
            self._report(f"unreadable: {e}")
            self._stamp = None
            return False
        if stamp == self._stamp:
            return False
        try:
            stamp, text = await asyncio.to_thread(read_settled, self.path, self.settle)
            endpoints = parse_endpoints_yaml(text)
        except NotReady as e:
            self.writing = not e.empty
            self._report(f"not applied: {e}", quiet=self.writing)  # no stamp kept: retried
            return False
        except (OSError, ValueError, yaml.YAMLError) as e:
            self._stamp = stamp
            self._report(f"rejected: {e}")
            return False
        self._stamp = stamp
        self.writing = False
        self._problem = None
        self.datastore.set_endpoints(endpoints)
        log.info("endpoints file %s: %d endpoints", self.path, len(endpoints))
        self.loaded.set()
        return True

    def _report(self, problem: str, quiet: bool = False) -> None:
        """Log a problem once, not once per poll."""
        if problem != self._problem:
            self._problem = problem
            log.log(logging.INFO if quiet else logging.ERROR,
                    "endpoints file %s %s (keeping the last good set)", self.path, problem)

    async def start(self) -> None:
        await self.load_once()
        self._task = asyncio.create_task(self._run(), name="endpoints-file")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(min(self.interval, 2 * self.settle) if self.writing
                                else self.interval)
            try:
                await self.load_once()
            except Exception:
                log.exception("endpoints file watch failed; retrying")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
