"""llm-d-inference-sim (Go, built by tests/tools.py) as a running process for a test.

Shared by the simulator cross-check (tests/sim/test_crosscheck.py) and the KV-event
cross-check (tests/sim/test_kv_events.py): start it on a free port with the test's flags,
its output in a log file under `tmp_path`, wait until `/health` answers, and stop it at
the end, killing it if SIGTERM is not enough."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.support import stop_process
from tests.tools import LLM_D_INFERENCE_SIM, require

HEALTHY_WITHIN = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


@asynccontextmanager
async def llm_d_inference_sim(tmp_path: Path, *flags: str,
                              env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """The simulator with `flags` (besides `--port`), healthy; yields its base URL."""
    binary = await asyncio.to_thread(require, LLM_D_INFERENCE_SIM)  # a cold build: minutes
    port = free_port()
    log_path = tmp_path / "llm-d-inference-sim.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(binary), "--port", str(port), *flags, stdout=log, stderr=log, cwd=tmp_path,
            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + HEALTHY_WITHIN
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.returncode is not None:
                    pytest.fail(f"llm-d-inference-sim exited {proc.returncode}: "
                                f"{log_path.read_text(errors='replace')[-2000:]}")
                try:
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"llm-d-inference-sim not healthy in {HEALTHY_WITHIN:g} s")
                await asyncio.sleep(0.1)
        yield url
    finally:
        await stop_process(proc)
