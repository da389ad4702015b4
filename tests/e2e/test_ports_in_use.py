"""A port another process holds stops the EPP at start with one clear line, for every
listener: grpcio would otherwise share ext_proc's or health's port (SO_REUSEPORT) and
silently take half the streams."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, free_port, start_epp

FLAGS = ("--grpc-port", "--grpc-health-port", "--metrics-port")


@pytest.mark.parametrize("taken", FLAGS)
def test_a_port_in_use_fails_the_start_clearly(taken: str) -> None:
    first = start_epp(endpoints="127.0.0.1:8000")
    try:
        held = dict(zip(FLAGS, (first.grpc_port, first.health_port, first.metrics_port)))
        args = [sys.executable, "-m", "epp", "--bind-address", "127.0.0.1",
                "--secure-serving=false", "--endpoints", "127.0.0.1:8000"]
        for flag in FLAGS:
            args += [flag, str(held[flag] if flag == taken else free_port())]
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if " E epp.app: " in line]
        assert len(errors) == 1 and "cannot start: [Errno 98]" in errors[0], done.stderr
        assert "Traceback" not in done.stderr
    finally:
        first.proc.stop()
