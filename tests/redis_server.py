"""A real `redis-server` for the state-sync tests (Debian package `redis-server`).

`make test` and `.ci/run` install it when missing (`make redis-server`). Without it the
tests that need it are skipped on a developer machine and FAIL under CI (`CI=true`), so a
broken set-up can never pass as green.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import Proc, free_port, scratch_dir


def redis_binary() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if path is None:
        message = "redis-server is not installed (make redis-server, or apt-get install redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence; `restart()` keeps the port and, like
    a real restart without persistence, loses every key."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.proc: Proc | None = None
        self.dir = Path(scratch_dir()) / f"redis-{self.port}"
        self.dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = Proc(args, "redis")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.p.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        out = self.proc.output()
        self.stop()
        pytest.fail(f"redis-server did not start:\n{out}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.p.kill()
            self.proc.p.wait(5)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def command(self, *args: str) -> str:
        """One command through redis-cli's plain protocol, for assertions."""
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        cmd = [cli, "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        return subprocess.run(cmd + list(args), capture_output=True, text=True,
                              timeout=10).stdout.strip()


def redis_fixture(password: str | None = None) -> Iterator[RedisServer]:
    server = RedisServer(password=password).start()
    try:
        yield server
    finally:
        server.stop()
