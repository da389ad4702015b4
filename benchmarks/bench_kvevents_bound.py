"""Event intake, bound vs connect: what one SUB socket for the whole pool costs.

Run: .venv/bin/python benchmarks/bench_kvevents_bound.py [--quick] [--rounds N]

The same load as bench_kvevents.py's intake (N endpoints, 64, each publishing R events/s,
2,000, in batches of 40 from a child process, the same payloads), received two ways in
one run, alternating round by round:
- connect (the default mode, the baseline): the EPP connects a SUB socket to each of the
  endpoints' PUB sockets (`KVEventsSubscriber`);
- bound (`kvEventsConfig.zmqEndpoint`, llm-d's deployment): each PUB connects to one SUB
  socket the EPP binds, topic `kv@<pod-ip>@<model>`, and the intake demultiplexes by topic
  (`BoundKVEventsSubscriber`).
Measured per mode: CPU time of this process per event (sockets, libzmq's I/O thread,
routing, decoding, indexing), whether every batch arrived, and how late the event loop ran
(p99; what a request would wait). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kvevents import (  # noqa: E402
    BATCH_EVENTS,
    BS,
    PORT_TAKEN_EXIT,
    _stream,
    free_ports,
    measure,
    publisher,
)

from epp.datastore import Datastore, Endpoint  # noqa: E402
from epp.kvevents.bound import BoundKVEventsSubscriber  # noqa: E402
from epp.kvevents.index import KVBlockIndex  # noqa: E402
from epp.kvevents.subscriber import PORT_LABEL, REPLAY_PORT_LABEL, KVEventsSubscriber  # noqa: E402
from tests.support import PortTaken, retry_port_taken  # noqa: E402


def _ip(i: int) -> str:
    return f"10.1.{i // 250}.{i % 250 + 1}"


async def run(mode: str, endpoints: int, rate: float, seconds: float,
              payloads: list[bytes]) -> dict[str, Any]:
    """One round of one mode, on new ports; `PortTaken` when another process took one of
    them after `free_ports` (the publisher's in connect mode, the EPP's in bound mode)."""
    ds = Datastore()
    index = KVBlockIndex()
    sub: KVEventsSubscriber
    if mode == "bound":
        ds.set_endpoints([Endpoint(f"pod-{i}", _ip(i), 8000) for i in range(endpoints)])
        bind = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        sub = BoundKVEventsSubscriber(index, block_size=BS, bind=bind)
        where = [bind] * endpoints
    else:
        ports = free_ports(endpoints)
        ds.set_endpoints([Endpoint(f"pod-{i}", "127.0.0.1", 8000 + i,
                                   {PORT_LABEL: str(p), REPLAY_PORT_LABEL: "0"})
                          for i, p in enumerate(ports)])
        sub = KVEventsSubscriber(index, block_size=BS)
        where = [f"tcp://127.0.0.1:{p}" for p in ports]
    mpctx = mp.get_context("spawn")
    ready, go = mpctx.Event(), mpctx.Event()
    topics = ([f"kv@{_ip(i)}@m".encode() for i in range(endpoints)] if mode == "bound"
              else None)
    pub = mpctx.Process(target=publisher, args=(where, payloads, rate / BATCH_EVENTS, ready,
                                                go, mode == "bound", topics))
    if mode == "connect":
        pub.start()
        deadline = time.monotonic() + 30
        while not ready.wait(0.05) and pub.exitcode is None and time.monotonic() < deadline:
            pass
        if pub.exitcode == PORT_TAKEN_EXIT:
            raise PortTaken(f"publisher: one of the ports {ports} in use")
    try:
        await sub.start(ds)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortTaken(str(e)) from None
        raise
    if mode == "bound":
        pub.start()
        while not ready.is_set():
            await asyncio.sleep(0.05)
    if mode == "connect":
        deadline = time.monotonic() + 10
        while not all(sub.healthy(e.name) for e in ds.endpoints()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # subscriptions reach the publishers
    m = await measure(sub, go, len(payloads), seconds)
    await sub.stop()
    await asyncio.to_thread(pub.join, 10)
    return {"mode": mode, "seconds": round(m.seconds, 2), "batches_sent": len(payloads) * endpoints,
            "batches_applied": m.batches, "events_per_s_total": round(m.events / m.seconds),
            "cores": round(m.cpu_seconds / m.seconds, 3),
            "cpu_us_per_event": round(m.cpu_seconds / max(1, m.events) * 1e6, 2),
            "loop_lag_p99_ms": m.loop_lag_p99_ms,
            "publisher_exit": pub.exitcode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short: CI")
    ap.add_argument("--endpoints", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2000.0, help="events/s per endpoint")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="rounds per mode")
    args = ap.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; python {platform.python_version()}; "
          f"index {type(KVBlockIndex()).__name__}")
    payloads = _stream(int(seconds * args.rate / BATCH_EVENTS))
    results: dict[str, list[dict[str, Any]]] = {"connect": [], "bound": []}
    for r in range(rounds):
        for mode in ("connect", "bound") if r % 2 == 0 else ("bound", "connect"):
            res = retry_port_taken(
                lambda: asyncio.run(run(mode, args.endpoints, args.rate, seconds, payloads)),
                f"{mode} intake")
            print(f"round {r}:", res, flush=True)
            results[mode].append(res)
    for mode, rs in results.items():
        med = {k: statistics.median(x[k] for x in rs)
               for k in ("cpu_us_per_event", "cores", "loop_lag_p99_ms", "events_per_s_total")}
        complete = sum(x["batches_applied"] == x["batches_sent"] for x in rs)
        print(f"median {mode}: {med}, complete in {complete}/{len(rs)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
