"""`make demo` keeps working: the same script, with free ports, sending its requests once."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from epp.demo import REQUESTS
from tests.support import ROOT, PortTaken, retry_port_taken, says_port_taken

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _demo_once() -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "epp.demo", "--once", "--free-ports"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    if r.returncode != 0 and says_port_taken(r.stdout + r.stderr):
        raise PortTaken("demo exited:\n" + r.stdout + r.stderr)
    return r


def test_demo_routes_every_request_to_a_pod_that_can_serve_it() -> None:
    # --free-ports races like every "free port, then bind" start: run it again then.
    r = retry_port_taken(_demo_once, "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    served = re.findall(r"model='([^']+)'.*\n    -> 200 served by (\S+):", r.stdout)
    assert len(served) == len(REQUESTS)
    for model, pod in served:
        if model in ("food-review", "cad-fabricator"):
            assert pod in ("vllm-llama3-8b-0", "vllm-llama3-8b-1")  # only they hold adapters
    assert "why (EPP Explain" in r.stdout
