"""Where an ext_proc exchange's time goes: py-spy on the EPP under h2load load.

Starts 3 upstreams and the EPP as in bench_extproc.py, drives it with h2load (one
headers + ~1 KB body exchange per stream, `--concurrency` streams on one connection) and
samples the EPP's main thread with py-spy (`py-spy record --format raw`, non-blocking so
the EPP is never paused). Each sample is charged to the innermost Python frame that
belongs to a known part (below); the summary gives the share of busy samples per part
("self") and the share of samples with that part anywhere on the stack ("inclusive"),
and the hottest leaf functions.

    .venv/bin/python benchmarks/profile_extproc.py --seconds 20 --concurrency 16

py-spy comes from PyPI (the `bench` extra). grpcio's core is Cython/C++: its work shows
up under the frames that call into it (the `Process` generator's reads and writes, and
asyncio's `_run_once` running grpc's callbacks), so "grpcio + event loop" is the floor's
share, the rest is the EPP's own. (py-spy's `--native` would split that C time, but it
must pause the EPP for every sample: tried here, it cut the rate from ~700 to ~46
exchanges/s and counted epoll waits as busy, so it is not offered.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_extproc as bx

from tests.support import UpstreamFleet, start_epp

# (part, path fragments of a frame's file); checked in this order for each frame.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("metrics (prometheus_client, epp/observability)", ("prometheus_client/", "epp/observability")),
    ("protobuf (message building/parsing)", ("google/protobuf/",)),
    ("scheduler (epp/scheduling)", ("epp/scheduling/",)),
    ("flow control / admission (epp/flowcontrol)", ("epp/flowcontrol/",)),
    ("director (epp/director.py)", ("epp/director.py",)),
    ("request parsing (epp/request.py)", ("epp/request.py",)),
    ("ext_proc edge (epp/server)", ("epp/server/",)),
    ("datastore / snapshots", ("epp/datastore.py",)),
    ("data layer (scraper)", ("epp/datalayer/",)),
    ("other epp", ("epp/",)),
    ("grpcio (grpc/ Python + Cython callers)", ("grpc/", "_cython", "cygrpc")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
    ("json / stdlib", ("json/", "python3.11/")),
)


# Leaf frames that say what the C code under them is (py-spy sees Python frames only).
IDLE = "waiting in epoll (not busy)"
LEAF_RULES: tuple[tuple[str, str], ...] = (
    ("selectors.py", IDLE),
    ("Thread.run (threading.py", "grpcio poller thread (C++ core, outside the loop thread)"),
    ("Handle._run (asyncio/events.py", "loop callbacks in C (grpcio Cython, task steps)"),
)


# Frames on every stack of the loop thread (the entry point): no part of their own.
ENTRY = ("<frozen runpy>", "epp/__main__.py", "epp/cli.py", "serve (epp/app.py",
         "asyncio/runners.py", "run_forever (asyncio/base_events.py",
         "run_until_complete (asyncio/base_events.py")


def part_of(frame: str) -> str | None:
    if any(f in frame for f in ENTRY):
        return None
    for name, frags in PARTS:
        if any(f in frame for f in frags):
            return name
    return None


def summarize(raw: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per part of the busy samples (py-spy's raw output)."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        leaf_part = next((name for frag, name in LEAF_RULES if frag in frames[-1]), None)
        if leaf_part == IDLE:
            idle += count
            continue
        total += count
        leaf_part = leaf_part or next((p for p in map(part_of, reversed(frames)) if p),
                                      "unattributed")
        self_counts[leaf_part] += count
        for p in {part_of(f) for f in frames} - {None}:
            incl[p] += count  # type: ignore[index]
        leaves[frames[-1]] += count
    return {"samples": total, "idle_samples": idle,
            "self": {p: c / total for p, c in self_counts.most_common()} if total else {},
            "inclusive": {p: c / total for p, c in incl.most_common()} if total else {},
            "top_leaves": [(f, c / total) for f, c in leaves.most_common(top)] if total else []}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out", type=Path, help="summary JSON (default benchmarks/results/"
                   "profile-extproc-<time>.json); the raw stacks go beside it (.txt)")
    p.add_argument("--from-raw", type=Path, help="only summarize an earlier run's raw stacks")
    a = p.parse_args()
    if a.from_raw:
        print_summary(summarize(a.from_raw.read_text()))
        return 0
    h2load = shutil.which("h2load")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if h2load is None:
        raise SystemExit(f"h2load not found; install: {bx.H2LOAD_INSTALL}")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy not found: pip install 'py-spy>=0.3.14,<1' (the bench extra)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = a.out or ROOT / "benchmarks" / "results" / f"profile-extproc-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    raw_path = out.with_suffix(".txt")
    with UpstreamFleet(3) as fleet:
        hosts = [u.hostport for u in fleet.upstreams]
        epp = start_epp(endpoints=",".join(hosts))
        try:
            bx.check_direct(epp.grpc_port, set(hosts))
            with tempfile.NamedTemporaryFile(suffix=".grpc", delete=False) as f:
                f.write(bx.grpc_frames())
                data = f.name
            spy = subprocess.Popen([pyspy, "record", "--pid", str(epp.proc.p.pid), "--rate",
                                    str(a.rate), "--duration", str(int(a.seconds) + 1),
                                    "--nonblocking", "--format", "raw", "--output",
                                    str(raw_path)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            try:
                load = bx.run_h2load(h2load, epp.grpc_port, data, a.concurrency, a.seconds,
                                     epp.proc.p.pid)
            finally:
                os.unlink(data)
            _, err = spy.communicate(timeout=a.seconds + 60)
            if spy.returncode != 0 or not raw_path.exists():
                raise RuntimeError(f"py-spy failed ({spy.returncode}): {err}")
        finally:
            epp.proc.stop()
    summary = summarize(raw_path.read_text())
    summary.update(load=load, machine=bx.machine(), command=" ".join(sys.argv))
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"load: {load['rps']:,.0f} exchanges/s at c={a.concurrency}, server CPU "
          f"{load['server_cpu_us'] or 0:,.0f} µs/exchange; {summary['samples']} busy samples")
    print_summary(summary)
    print(f"\nsummary: {out}\nraw stacks: {raw_path}")
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    print("\n| part | self (innermost known frame) | inclusive (anywhere on stack) |\n|---|---:|---:|")
    for part, share in summary["self"].items():
        print(f"| {part} | {share * 100:.1f}% | {summary['inclusive'].get(part, 0) * 100:.1f}% |")
    print("\nhottest leaf frames:")
    for frame, share in summary["top_leaves"]:
        print(f"  {share * 100:5.1f}%  {frame}")


if __name__ == "__main__":
    raise SystemExit(main())
