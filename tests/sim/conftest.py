"""Fixtures for the simulator tests: real fleets on 127.0.0.1 and a metrics reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.sim import Fleet, SimConfig, start_fleet

BASE = "meta-llama/Llama-3.1-8B-Instruct"

StartSim = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """`await start_sim(replicas=1, **SimConfig fields)` -> a running Fleet, stopped after."""
    fleets: list[Fleet] = []

    async def start(replicas: int = 1, **fields: object) -> Fleet:
        base = replace(SimConfig(port=0, model=BASE), **fields)  # type: ignore[arg-type]
        configs = [replace(base, name=f"{base.name}-{i}" if replicas > 1 else base.name,
                           seed=base.seed + i) for i in range(replicas)]
        fleet = await start_fleet(configs)
        fleets.append(fleet)
        return fleet

    yield start
    for f in fleets:
        await f.stop()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    """A /metrics page parsed by prometheus_client: {(sample name, labels): value}."""
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels` (sums if several)."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert found, f"no sample {name}{labels}"
    return sum(found)


async def wait_until(cond: Callable[[], bool], what: str = "condition",
                     timeout: float = 10.0) -> None:
    """Poll `cond` every 5 ms; fail the test (never hang it) after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)
