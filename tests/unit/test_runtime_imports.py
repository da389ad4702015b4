"""The EPP's runtime stands alone: the simulator, the demo and the Envoy config generator
are tools beside it, never loaded by a running EPP."""

from __future__ import annotations

import subprocess
import sys


def test_the_epp_runtime_imports_no_tool() -> None:
    probe = (
        "import sys, epp.app, epp.cli\n"
        "tools = sorted(m for m in sys.modules if m == 'epp.sim' or m.startswith('epp.sim.')"
        " or m in ('epp.demo', 'epp.envoyconfig', 'envoy_data_plane'))\n"
        "print(','.join(tools))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
