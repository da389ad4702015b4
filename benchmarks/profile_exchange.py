"""Our Python per ext_proc exchange, without gRPC: where the EPP's own code spends it.

Drives the EPP's ext_proc state machine (`epp/server/extproc.py`'s `_Stream`), director and
default scheduling profile, built by `EppApp` from the default config over 3 endpoints,
with the benchmark's exchange (request headers without an id + a 1,112-byte completions
body, as `bench_extproc.py` sends it) decoded from wire bytes and the replies encoded
back, in one process with no sockets. A scrape is simulated every 50 exchanges (50 ms
scrapes at ~1,000 exchanges/s). Prints µs per exchange, then a cProfile by own time.
The difference between this and the server's CPU per exchange in `bench_extproc.py` is
grpcio's and asyncio's share.

    .venv/bin/python benchmarks/profile_exchange.py [--exchanges 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "ghz"))

import make_data  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from epp.app import EppApp  # noqa: E402
from epp.datastore import EndpointMetrics  # noqa: E402
from epp.server.extproc import _Stream  # noqa: E402
from epp.settings import parse_settings  # noqa: E402
from epp.sources import parse_endpoint_list  # noqa: E402

HOSTS = "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003"


def exchange_bytes() -> list[bytes]:
    msgs = json.loads((make_data.HERE / "process-data.json").read_text())
    hm = msgs[0]["request_headers"]["headers"]
    hm["headers"] = [h for h in hm["headers"] if h["key"] != "x-request-id"]
    return [json_format.ParseDict(m, ep.ProcessingRequest()).SerializeToString() for m in msgs]


async def run(app: EppApp, raw: list[bytes], count: int) -> None:
    names = [e.name for e in app.datastore.snapshot().endpoints]
    for i in range(count):
        if i % 50 == 0:
            for n in names:
                app.datastore.update_metrics(n, EndpointMetrics(waiting=0, scraped_at=time.monotonic()))
        stream = _Stream(app.director, 1 << 24)
        for r in raw:
            for out in await stream.handle(ep.ProcessingRequest.FromString(r)):
                out.SerializeToString()
        stream.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exchanges", type=int, default=3000)
    a = p.parse_args()
    make_data.write()
    app = EppApp(parse_settings(["--endpoints", HOSTS, "--secure-serving=false"]))
    app.datastore.set_endpoints(parse_endpoint_list(HOSTS))
    raw = exchange_bytes()
    await run(app, raw, a.exchanges)  # warm up
    t0 = time.perf_counter()
    await run(app, raw, a.exchanges)
    print(f"{(time.perf_counter() - t0) / a.exchanges * 1e6:.0f} µs per exchange (our Python, no gRPC)")
    prof = cProfile.Profile()
    prof.enable()
    await run(app, raw, a.exchanges)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"epp/(server|director|scheduling|request)", 25)


if __name__ == "__main__":
    asyncio.run(main())
