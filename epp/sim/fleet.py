"""Several independent simulated servers in one process and one event loop.

Each replica has its own port, engine, KV cache, adapters and metrics; they share
nothing but the loop. This is what tests, benchmarks and the demo start:

    fleet = await start_fleet([SimConfig(name="a", port=0), SimConfig(name="b", port=0)])
    try:
        ...  # fleet.urls == ["http://127.0.0.1:41231", "http://127.0.0.1:41232"]
    finally:
        await fleet.stop()

or `async with await start_fleet(configs) as fleet: ...`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

from epp.sim.config import ConfigError, SimConfig
from epp.sim.server import Replica

log = logging.getLogger(__name__)


@dataclass
class Fleet:
    """Running replicas, in config order."""

    replicas: list[Replica]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def hostports(self) -> list[str]:
        """`host:port` of each replica, the form the EPP puts on the wire."""
        return [r.url.removeprefix("http://") for r in self.replicas]

    def replica(self, name: str) -> Replica:
        for r in self.replicas:
            if r.name == name:
                return r
        raise KeyError(name)

    async def stop(self) -> None:
        """Stop every replica (open streams end with finish_reason `abort`)."""
        await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_fleet(configs: Iterable[SimConfig]) -> Fleet:
    """Start one server per config; on any failure, stop those started and raise."""
    configs = list(configs)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"replica names must be unique: {names}")
    started: list[Replica] = []
    try:
        for cfg in configs:
            replica = Replica(cfg)
            await replica.start()
            started.append(replica)
    except BaseException:
        await Fleet(started).stop()
        raise
    return Fleet(started)
