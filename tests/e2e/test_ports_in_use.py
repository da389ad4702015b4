"""A port another process holds stops the EPP at start with one clear line, for every
listener: grpcio would otherwise share ext_proc's or health's port (SO_REUSEPORT) and
silently take half the streams; the bound KV-events socket (kvEventsConfig.zmqEndpoint)
used to end in a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
