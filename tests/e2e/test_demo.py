"""`make demo` keeps working: the same script, with free ports, sending its requests once."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from epp.demo import REQUESTS
from tests.support import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_routes_every_request_to_a_pod_that_can_serve_it() -> None:
    r = subprocess.run([sys.executable, "-m", "epp.demo", "--once", "--free-ports"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    served = re.findall(r"model='([^']+)'.*\n    -> 200 served by (\S+):", r.stdout)
    assert len(served) == len(REQUESTS)
    for model, pod in served:
        if model in ("food-review", "cad-fabricator"):
            assert pod in ("vllm-llama3-8b-0", "vllm-llama3-8b-1")  # only they hold adapters
    assert "why (EPP Explain" in r.stdout
