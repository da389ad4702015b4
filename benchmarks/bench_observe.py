"""Request-path cost of observing decisions: the director without an observer (as before
issue 16), with the observer and tracing off (the default), and with tracing on at the
default 10% sampling and at 100%.

Run: .venv/bin/python benchmarks/bench_observe.py [--requests 4000] [--rounds 7]

Setup: the default scheduling profile over 8 endpoints with fresh metrics; each request is
a 2 KB completion (one of 8 shared 1 KB system prompts plus a unique tail) through
`Director.route()` and `Director.finished()` with usage, i.e. everything the director does
per request, without gRPC. The cases run interleaved in every round (the order rotates);
reported are the median µs per request over rounds and the median ratio to the
no-observer baseline of the same round. Also the observer's hooks alone with tracing off
(best of 5 loops), which the ratios cannot resolve on a busy machine.

Tracing exports with the real pipeline up to the wire: spans are queued by
`DroppingBatchProcessor`, and its thread encodes each batch to OTLP protobuf bytes
(`encode_spans(...).SerializeToString()`, what the gRPC exporter sends) and discards them,
so the GIL time of encoding is counted (each case's timing ends when its spans are
exported); the network is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

from epp.config import load_config  # noqa: E402
from epp.datastore import Datastore, Endpoint, EndpointMetrics  # noqa: E402
from epp.director import Director  # noqa: E402
from epp.request import InferenceRequest, Usage, parse_body  # noqa: E402
from epp.scheduling import Scheduler  # noqa: E402
from epp.scheduling.inflight import InFlightTracker  # noqa: E402
from epp.telemetry import RequestObserver  # noqa: E402
from epp.telemetry.tracing import Tracer  # noqa: E402


class EncodeAndDiscard(SpanExporter):
    def __init__(self) -> None:
        self.bytes = 0
        self.spans = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.bytes += len(encode_spans(spans).SerializeToString())
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def pool() -> Datastore:
    ds = Datastore()
    rng = random.Random(1)
    ds.set_endpoints([Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(8)])
    for i in range(8):
        ds.update_metrics(f"pod-{i}", EndpointMetrics(
            waiting=rng.randint(0, 5), running=rng.randint(0, 20), kv_usage=rng.random(),
            scraped_at=time.monotonic() + 3600))  # fresh for the whole run
    return ds


def requests(n: int) -> list[InferenceRequest]:
    rng = random.Random(2)
    systems = ["".join(rng.choice("abcdefgh ") for _ in range(1024)) for _ in range(8)]
    out = []
    for i in range(n):
        raw = json.dumps({"model": "m", "prompt": rng.choice(systems) + f" {i} " + "x" * 1000,
                          "max_tokens": 10}).encode()
        out.append(InferenceRequest(f"r{i}", "/v1/completions", body=raw,
                                    parsed=parse_body("/v1/completions", raw)))
    return out


def director(observer: RequestObserver | None) -> Director:
    """Built as EppApp builds it (the director owns in-flight records)."""
    inflight = InFlightTracker()
    scheduler = Scheduler.from_config(load_config(None), inflight=inflight,
                                      plugin_metrics_every=16)
    return Director(pool(), scheduler, observer=observer, inflight=inflight)


def tracer(ratio: str) -> tuple[Tracer, EncodeAndDiscard]:
    os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
    os.environ["OTEL_TRACES_SAMPLER_ARG"] = ratio
    exp = EncodeAndDiscard()
    return Tracer.from_env(exp), exp


async def run(d: Director, reqs: list[InferenceRequest]) -> float:
    """µs per request, including exporting this run's spans (the export thread's encoding
    must not spill into the next case's timing)."""
    usage = Usage(prompt_tokens=500, completion_tokens=10)
    tracer = d.observer.tracer if d.observer is not None else None
    t0 = time.perf_counter()
    for r in reqs:
        dec = await d.route(r)
        d.finished(dec, usage, status=200)
    if tracer is not None:
        tracer.processor.force_flush(30_000)
    return (time.perf_counter() - t0) / len(reqs) * 1e6


async def hooks_alone(reqs: list[InferenceRequest]) -> float:
    """The observer's own cost with tracing off, without the pipeline around it: what the
    end-to-end ratios above cannot resolve on a noisy machine."""
    d = director(None)
    dec = await d.route(reqs[0])
    res = d.resolve(reqs[0])
    obs = RequestObserver()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for r in reqs:
            w = obs.begin(r.request_id, r.headers)
            obs.routed(w, r, res, dec)
            obs.finished(w, None, 200, None)
        best = min(best, (time.perf_counter() - t0) / len(reqs) * 1e6)
    return best


async def main_async(args: argparse.Namespace) -> None:
    reqs = requests(args.requests)
    t10, e10 = tracer("0.1")
    t100, e100 = tracer("1.0")
    cases = {
        "no observer (before)": director(None),
        "observer, tracing off (default)": director(RequestObserver()),
        "tracing on, 10% sampled": director(RequestObserver(tracer=t10)),
        "tracing on, 100% sampled": director(RequestObserver(tracer=t100)),
    }
    for d in cases.values():  # warm-up: caches, label children, prefix index
        await run(d, reqs[: min(500, len(reqs))])
    times: dict[str, list[float]] = {k: [] for k in cases}
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.rounds):
        # Rotate the order every round so that no case always runs first or last.
        order = names[r % len(names):] + names[:r % len(names)]
        got = {name: await run(cases[name], reqs) for name in order}
        for name in names:
            times[name].append(got[name])
            ratios[name].append(got[name] / got[names[0]])
    hooks = await hooks_alone(reqs)
    load = os.getloadavg()
    print(f"bench_observe: {args.requests} requests x {args.rounds} rounds, 8 endpoints; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load {load[0]:.1f}")
    print("| case | µs/request (median) | ratio to no observer |")
    print("|---|---|---|")
    for name in cases:
        print(f"| {name} | {statistics.median(times[name]):.1f} | "
              f"{statistics.median(ratios[name]):.3f} |")
    print(f"observer hooks alone, tracing off (begin + routed + finished): {hooks:.2f} µs/request")
    print(f"spans exported: 10% case {e10.spans} ({e10.bytes // max(e10.spans, 1)} B/span), "
          f"100% case {e100.spans}; dropped {t10.processor.dropped + t100.processor.dropped}")
    t10.shutdown()
    t100.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=7)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
