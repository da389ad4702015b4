"""Open-loop replay of a schedule over HTTP, timing each streamed response.

Each request is sent at its scheduled time whether or not earlier ones have finished
(open loop, as real users do), so a slow server builds a queue instead of slowing the
arrivals. Per request: TTFT = time from send to the first body chunk of the SSE stream
(the first token, for /v1/completions), end-to-end latency = time to the end of the
stream, output tokens from the final `usage` chunk, and the `x-sim-replica` header that
says which server answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from benchmarks.routing.workload import Request


@dataclass
class Result:
    """What one request measured; times in wall seconds."""

    index: int
    at: float
    status: int = 0
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    replica: str = ""
    error: str = ""
    done_at: float | None = None
    """Seconds from the schedule start to the end of the response."""
    lag: float = 0.0
    """How late the client sent it (a lagging client would hide the servers' delays)."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.latency is not None and not self.error


def _usage_of(chunk_lines: list[bytes]) -> dict | None:
    for line in reversed(chunk_lines):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                obj = json.loads(line[6:])
            except ValueError:
                continue
            if obj.get("usage"):
                return obj["usage"]
    return None


async def _one(session: aiohttp.ClientSession, url: str, req: Request, index: int,
               start: float, timeout: float) -> Result:
    res = Result(index=index, at=req.at)
    t0 = time.perf_counter()
    res.lag = (t0 - start) - req.at
    tail = b""
    try:
        async with session.post(url, json=req.body(),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            res.status = resp.status
            res.replica = resp.headers.get("x-sim-replica", "")
            first = True
            async for chunk in resp.content.iter_any():
                if first:
                    res.ttft = time.perf_counter() - t0
                    first = False
                tail = (tail + chunk)[-4096:]  # the usage chunk is near the end
            end = time.perf_counter()
        if res.status == 200:
            res.latency = end - t0
            res.done_at = end - start
            usage = _usage_of(tail.split(b"\n"))
            if usage:
                res.output_tokens = int(usage.get("completion_tokens", 0))
                details = usage.get("prompt_tokens_details") or {}
                res.cached_tokens = int(details.get("cached_tokens") or 0)
            else:
                res.error = "no usage chunk"
        else:
            res.error = f"HTTP {res.status}"
    except TimeoutError:
        res.error = "timeout"
    except aiohttp.ClientError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def replay(url: str, schedule: list[Request], timeout: float = 120.0,
                 connections: int = 0) -> tuple[list[Result], float]:
    """Send every request at its time; return the results and the wall time taken."""
    conn = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(schedule):
            delay = req.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(_one(session, url, req, i, start, timeout)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start
