"""A simulated fleet in its own process, with its engine counters readable over stdin.

    python -m benchmarks.routing.fleet_proc CONFIG.json [--oracle]

CONFIG.json is a list of SimConfig field dicts (see epp/sim/config.py). Once every
replica listens, one JSON line `{"ports": [...]}` goes to stdout (with `--oracle`, also
`"oracle": port` of the in-process oracle router, see oracle.py). Then each stdin line
`stats` is answered with one JSON line: per replica, the engine counters (prefill and
prefix-cache tokens, adapter loads, preemptions). Adapter swaps are not on the
simulator's /metrics page (vLLM has no such series), hence this side channel. EOF or
`quit` stops the fleet.

Own process because the simulator, the EPP, Envoy and the load client must not share an
event loop: a busy client would otherwise delay the engines' steps and look like GPU time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys

from benchmarks.routing.oracle import OracleRouter
from epp.sim.config import SimConfig
from epp.sim.fleet import start_fleet


async def main(configs: list[SimConfig], oracle: bool = False) -> int:
    fleet = await start_fleet(configs)
    router = OracleRouter(fleet.replicas) if oracle else None
    try:
        hello: dict[str, object] = {
            "ports": [r.port for r in fleet.replicas],
            "kv_events": [[r.kv_events.port, r.kv_events.replay_port]
                          if r.kv_events is not None else None for r in fleet.replicas]}
        if router is not None:
            hello["oracle"] = await router.start()
        print(json.dumps(hello), flush=True)
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            cmd = line.strip()
            if not line or cmd == "quit":
                break
            if cmd == "stats":
                out = []
                for r in fleet.replicas:
                    s = dataclasses.asdict(r.engine.stats)
                    s["name"] = r.name
                    out.append(s)
                print(json.dumps(out), flush=True)
    finally:
        if router is not None:
            await router.stop()
        await fleet.stop()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    with open(sys.argv[1]) as f:
        raw = json.load(f)
    sys.exit(asyncio.run(main([SimConfig(**c) for c in raw], "--oracle" in sys.argv[2:])))
