"""Standalone endpoint sources: a fixed `--endpoints` list or a watched `--endpoints-file`.

The Kubernetes source (`epp.k8s`) feeds the same `Datastore`; these serve local runs,
tests and gateways without Kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from epp.datastore import Datastore, Endpoint
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
    """Re-reads the endpoints file when its mtime or size changes; a bad edit keeps the last good set."""

    def __init__(self, datastore: Datastore, path: str, interval: float = 1.0) -> None:
        self.datastore = datastore
        self.path = Path(path)
        self.interval = interval
        self._stamp: tuple[float, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()

    async def load_once(self) -> bool:
        try:
            st = await asyncio.to_thread(os.stat, self.path)
        except OSError as e:
            if self._stamp is not None or not self.loaded.is_set():
                log.error("endpoints file %s unreadable: %s (keeping last good set)", self.path, e)
            self._stamp = None
            return False
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            text = await asyncio.to_thread(self.path.read_text)
            endpoints = parse_endpoints_yaml(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            log.error("endpoints file %s rejected: %s (keeping last good set)", self.path, e)
            return False
        self.datastore.set_endpoints(endpoints)
        log.info("endpoints file %s: %d endpoints", self.path, len(endpoints))
        self.loaded.set()
        return True

    async def start(self) -> None:
        await self.load_once()
        self._task = asyncio.create_task(self._run(), name="endpoints-file")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.load_once()
            except Exception:
                log.exception("endpoints file watch failed; retrying")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
