"""`/debug/status` in a real browser: headless Chromium (Debian's `chromium` package,
installed by `make test-tools`) loads the page while `make demo` serves traffic, and the
rendered DOM lists the demo's endpoints and its recent routing decisions with their
per-scorer scores. A screenshot is saved in the test's temp directory."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support import ROOT, post_json, stop_processes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (make test-tools installs Debian's package)")


def headless(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    # --no-sandbox: CI and this machine run as root, where Chromium's sandbox cannot start.
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1400,1100", *args, url],
        capture_output=True, text=True, timeout=90)


class DomRows(HTMLParser):
    """Collects the rendered table rows by class, with their text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.tags: list[str] = []
        self._row: tuple[str, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        cls = (dict(attrs).get("class") or "").split()
        if tag == "tr" and cls:
            self._row = (cls[0], [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.rows.setdefault(self._row[0], []).append(" ".join(self._row[1]))
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and data.strip():
            self._row[1].append(data.strip())


def test_status_page_in_chromium_while_the_demo_serves(tmp_path: Path) -> None:
    chromium()
    demo = subprocess.Popen([sys.executable, "-m", "epp.demo", "--free-ports"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out: list[str] = []
    stop = threading.Event()
    t: threading.Thread | None = None
    try:
        deadline = time.monotonic() + 150
        status_url = envoy_url = ""
        assert demo.stdout is not None
        while time.monotonic() < deadline and not status_url:
            line = demo.stdout.readline()
            if not line:
                break
            out.append(line)
            if m := re.search(r"curl (http://\S+)/v1/completions", line):
                envoy_url = m.group(1)
            if m := re.search(r"EPP status:\s+(http://\S+)", line):
                status_url = m.group(1)
        assert status_url and envoy_url, "demo did not print its URLs:\n" + "".join(out)
        threading.Thread(target=lambda: demo.stdout.read(), daemon=True).start()  # drain

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                post_json(envoy_url + "/v1/completions",
                          {"model": "food-review" if i % 2 else "meta-llama/Llama-3.1-8B-Instruct",
                           "prompt": f"Write as if you were a critic: city {i}", "max_tokens": 10})
                time.sleep(0.05)

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        time.sleep(2.0)  # a few sampled decisions, picks per second above zero

        r = headless(status_url, "--dump-dom")
        assert r.returncode == 0, r.stderr[-2000:]
        dom = DomRows()
        dom.feed(r.stdout)
        assert "script" not in dom.tags  # no JavaScript on the page
        endpoints = dom.rows.get("endpoint", [])
        assert len(endpoints) == 4, dom.rows
        for i in range(4):
            assert any(row.startswith(f"vllm-llama3-8b-{i} ") for row in endpoints), endpoints
        decisions = dom.rows.get("decision", [])
        assert decisions, "no routing decisions rendered"
        # A decision names the endpoint picked and each candidate's per-scorer scores.
        assert any(re.search(r"vllm-llama3-8b-\d: \d+\.\d\d \(queue \d", d) for d in decisions), decisions[:2]
        assert any(re.search(r"food-review", d) for d in decisions)

        shot = tmp_path / "status.png"
        r = headless(status_url, f"--screenshot={shot}")
        assert r.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    finally:
        stop.set()
        if t is not None:
            t.join(30)  # the last request finishes before the demo stops
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        stop_processes([demo], 20)
