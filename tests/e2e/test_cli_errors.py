"""Bad configuration stops the EPP at start with exit 2 and a message that names the fault."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, free_port

pytestmark = pytest.mark.e2e


def run_epp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epp", "--secure-serving=false", "--bind-address", "127.0.0.1",
         "--grpc-port", str(free_port()), "--grpc-health-port", str(free_port()),
         "--metrics-port", str(free_port()), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_unknown_plugin_type() -> None:
    r = run_epp("--endpoints", "127.0.0.1:1", "--config-text",
                "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
                "plugins:\n- type: queue-scorerr\n")
    assert r.returncode == 2
    assert "queue-scorerr" in r.stderr


def test_malformed_objectives_file(tmp_path) -> None:
    f = tmp_path / "objectives.yaml"
    f.write_text("apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
                 "metadata: {name: broken}\nspec: {priority: high}\n")
    r = run_epp("--endpoints", "127.0.0.1:1", "--objectives-file", str(f))
    assert r.returncode == 2
    assert "broken" in r.stderr


def test_bad_flag_value() -> None:
    r = run_epp("--refresh-metrics-interval", "fast")
    assert r.returncode == 2
    assert "invalid duration 'fast'" in r.stderr


def test_missing_kubeconfig(tmp_path) -> None:
    r = run_epp("--pool-name", "pool", "--kubeconfig", str(tmp_path / "absent-kubeconfig"))
    assert r.returncode == 2, r.stderr
    assert "absent-kubeconfig" in r.stderr and "Traceback" not in r.stderr
