"""A port another process holds stops the EPP at start with one clear line, for every
listener: grpcio would otherwise share ext_proc's or health's port (SO_REUSEPORT) and
silently take half the streams; the bound KV-events socket (kvEventsConfig.zmqEndpoint)
used to end in a traceback. And the other side: a start whose port another process took
between `free_port` and the child's bind is retried with new ports."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from tests import support
from tests.support import ROOT, free_port, start_epp

FLAGS = ("--grpc-port", "--grpc-health-port", "--metrics-port")
BOUND_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {{blockSize: 16, kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{port}"}}}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
"""


def _start_fails_clearly(*extra: str, taken: dict[str, int] | None = None) -> str:
    """Start an EPP (its ports free unless `taken`); expect exit 2 and one error line."""
    args = [sys.executable, "-m", "epp", "--bind-address", "127.0.0.1",
            "--secure-serving=false", "--endpoints", "127.0.0.1:8000", *extra]
    for flag in FLAGS:
        args += [flag, str((taken or {}).get(flag) or free_port())]
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if " E epp.app: " in line]
    assert len(errors) == 1 and "cannot start: [Errno 98]" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    return errors[0]


@pytest.mark.parametrize("taken", FLAGS)
def test_a_port_in_use_fails_the_start_clearly(taken: str) -> None:
    first = start_epp(endpoints="127.0.0.1:8000")
    try:
        held = dict(zip(FLAGS, (first.grpc_port, first.health_port, first.metrics_port)))
        _start_fails_clearly(taken={taken: held[taken]})
    finally:
        first.proc.stop()


def test_a_bound_kv_events_address_in_use_fails_the_start_clearly(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "bound.yaml"
        config.write_text(BOUND_CONFIG.format(port=port))
        line = _start_fails_clearly("--config-file", str(config))
    assert "kvEventsConfig.zmqEndpoint" in line


@pytest.mark.parametrize("start", [lambda: support.start_epp(endpoints="127.0.0.1:8000"),
                                   lambda: support.start_envoy(1)], ids=["epp", "envoy"])
def test_a_port_taken_before_the_child_binds_it_is_retried_with_new_ports(
        start: Callable[[], Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The race every "free port, then bind" start has with the rest of the machine: the
    first port handed out is one another process holds by the time the child binds."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        handed = iter([held])
        monkeypatch.setattr(support, "free_port", lambda: next(handed, None) or free_port())
        started = start()
        try:
            assert held not in (getattr(started, "grpc_port", None), getattr(started, "port", None))
        finally:
            started.proc.stop()
    assert "starting again with new ports (2/3)" in capsys.readouterr().err


def test_a_port_taken_at_every_start_gives_up_with_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        monkeypatch.setattr(support, "free_port", lambda: holder.getsockname()[1])
        with pytest.raises(support.PortTaken, match="taken between free_port.. and the bind "
                                                    "in 3 starts in a row"):
            support.start_envoy(1)
