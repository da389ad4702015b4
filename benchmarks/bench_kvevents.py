"""Cost of exact prefix-cache routing: event intake, the scorer's pick, tokenization.

Run: .venv/bin/python benchmarks/bench_kvevents.py [--quick] [--index native|python|both]

1. Intake: N endpoints (64) each publishing R events/s (2,000) over real ZeroMQ from a
   child process (vLLM's framing: topic, 8-byte sequence, msgpack EventBatch), in
   batches of 40 events (one engine step every 20 ms). Events are half `BlockStored` of
   1-4 blocks of 16 tokens chained on the endpoint's earlier blocks, half `BlockRemoved`
   of the oldest blocks, so the index stays at a steady size. Measured: the CPU time of
   this process (the EPP's intake: SUB sockets and libzmq's I/O thread, decoding,
   indexing) per wall second and per event, whether every event arrived, how late the
   event loop ran (what a request would wait), and, as the same-run baseline, decoding and
   indexing the same batches without sockets. With `--index both` (the default) the
   intake runs twice in the same run, with the native block index (`native/`, Rust; it
   decodes the batches itself) and with the pure-Python one, the baseline and fallback.
   `cores_at_target_rate` = CPU per event x the
   offered rate: on a machine too busy to give the process the CPU it needs, the offered
   rate is not reached and `cores` alone understates the cost.
2. Pick: one `Scheduler.schedule()` with the precise-prefix-cache-scorer alone and with
   the approximate prefix-cache-scorer alone (the baseline, same run), 64 endpoints whose
   indexes hold 16 shared 2 KB system prompts at varied depths, 4 KB prompts, tokens
   prepared before the cycle (tokenization is measured separately).
3. Tokenization: the project's tiny byte-level BPE tokenizer (`epp.sim.tinytok`; a real
   model's tokenizer has a larger vocabulary and costs differ), µs per KB of prompt, and the
   chat template rendering.
4. Prefix cache of tokenization (`epp.tokensplice`): chat requests of one shared system
   prompt (2, 4 or 8 KB) and a new ~200 B question each, rendered with the chat template,
   tokenized by a `TokenizerPool` with the exact-text cache only ("whole": the question
   makes every prompt new) and with the prefix cache ("spliced", system prompt already
   cached), interleaved request by request in the same run; plus "cold" (a new system
   prompt, every piece tokenized: the price of cutting) and the ids compared. For the tiny
   tokenizer and two locally built kinds (`tests/local_tokenizers.py`: GPT-2/Qwen-style
   byte-level BPE, Llama 2-style Metaspace "first"). `--only tokenize` runs 3 and 4 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epp.datastore import Datastore, Endpoint, EndpointMetrics  # noqa: E402
from epp.kvevents.decode import (  # noqa: E402
    BlockRemoved,
    BlockStored,
    decode_batch,
    encode_batch,
    encode_seq,
)
from epp.kvevents.index import KVBlockIndex, native_available  # noqa: E402
from epp.kvevents.subscriber import PORT_LABEL, REPLAY_PORT_LABEL, KVEventsSubscriber  # noqa: E402
from epp.scheduling import Scheduler, SchedulingRequest  # noqa: E402
from epp.scheduling.pickers import MaxScorePicker  # noqa: E402
from epp.scheduling.profile import Profile  # noqa: E402
from epp.scheduling.precise_prefix import PrecisePrefixCacheScorer  # noqa: E402
from epp.scheduling.scorers import PrefixCacheScorer  # noqa: E402
from epp.sim import tinytok  # noqa: E402
from epp.tokenization import ModelTokenizer  # noqa: E402

BS = 16
BATCH_EVENTS = 40
MODEL = "m"


def _stream(batches: int, seed: int = 0) -> list[bytes]:
    """One endpoint's payloads: stored chains and removals of the oldest blocks."""
    rng = random.Random(seed)
    held: list[int] = []
    tail: int | None = None
    next_hash = 1
    out = []
    for _ in range(batches):
        events: list[Any] = []
        for k in range(BATCH_EVENTS):
            if k % 2 == 0 or not held:
                n = rng.randint(1, 4)
                hashes = tuple(range(next_hash, next_hash + n))
                next_hash += n
                tokens = [rng.randrange(50_000) for _ in range(n * BS)]
                if rng.random() < 0.1:
                    tail = None  # a new prompt from the root
                events.append(BlockStored(hashes, tail, tokens, BS, None, "GPU"))
                held.extend(hashes)
                tail = hashes[-1]
            else:
                n = min(len(held) - 1, rng.randint(1, 4)) if len(held) > 1 else 0
                gone, held[:] = held[:n], held[n:]
                events.append(BlockRemoved(tuple(gone), "GPU"))
        out.append(encode_batch(time.time(), events))
    return out


PORT_TAKEN_EXIT = 98
"""The publisher's exit code when a port it was to bind is in use: another process took
it after `free_ports` (bench_kvevents_bound.py starts again on new ports)."""


def publisher(where: list[str], payloads: list[bytes], rate_batches: float, ready: Any,
              go: Any, connect: bool = False, topics: list[bytes] | None = None) -> None:
    """A child process: one PUB per address, bound there (each engine's own socket) or
    `connect`ed (to the EPP's bound one), sending every payload to all of them at
    `rate_batches` per second once `go` is set; `topics` names each PUB's messages."""
    import zmq

    ctx = zmq.Context()
    socks = []
    for w in where:
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.SNDHWM, 1_000_000)
        try:
            (s.connect if connect else s.bind)(w)
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
            print(f"publisher: cannot bind {w}: {e}", file=sys.stderr, flush=True)
            sys.exit(PORT_TAKEN_EXIT)
        socks.append(s)
    names = topics or [b"kv"] * len(socks)
    ready.set()
    go.wait()
    t0 = time.perf_counter()
    for i, payload in enumerate(payloads):
        target = t0 + i / rate_batches
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        seq = encode_seq(i)
        for s, topic in zip(socks, names):
            s.send_multipart([topic, seq, payload])
    time.sleep(0.5)
    for s in socks:
        s.close(linger=1000)
    ctx.term()


def free_ports(n: int) -> list[int]:
    import socket

    out, keep = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        keep.append(s)
        out.append(s.getsockname()[1])
    for s in keep:
        s.close()
    return out


@dataclass
class Drained:
    seconds: float
    cpu_seconds: float
    batches: int
    events: int
    loop_lag_p99_ms: float | None


async def measure(sub: Any, go: Any, want: int, seconds: float) -> Drained:
    """Start the publishers (`go`) and let the intake take `want` batches per stream (or
    `seconds` + 5 s); this process's CPU over that time, and how late the loop ran (what
    a request would wait for)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    go.set()
    lags: list[float] = []
    while time.perf_counter() - wall0 < seconds + 5:
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - t - 0.01)
        if all(s.batches >= want for s in sub.streams.values()):
            break
    cpu1, wall1 = time.process_time(), time.perf_counter()
    got = sum(s.batches for s in sub.streams.values())
    lags.sort()
    return Drained(wall1 - wall0, cpu1 - cpu0, got, got * BATCH_EVENTS,
                   round(lags[int(len(lags) * 0.99)] * 1000, 2) if lags else None)


async def bench_intake(endpoints: int, rate: float, seconds: float,
                       backend: str = "native") -> dict[str, Any]:
    batches = int(seconds * rate / BATCH_EVENTS)
    payloads = _stream(batches)
    ports = free_ports(endpoints)
    mpctx = mp.get_context("spawn")
    ready, go = mpctx.Event(), mpctx.Event()
    pub = mpctx.Process(target=publisher, args=([f"tcp://127.0.0.1:{p}" for p in ports],
                                                    payloads, rate / BATCH_EVENTS, ready, go))
    pub.start()
    ready.wait(30)
    ds = Datastore()
    ds.set_endpoints([Endpoint(f"pod-{i}", "127.0.0.1", 8000 + i,
                               {PORT_LABEL: str(p), REPLAY_PORT_LABEL: "0"})
                      for i, p in enumerate(ports)])
    index = KVBlockIndex(backend=backend)
    sub = KVEventsSubscriber(index, block_size=BS)
    await sub.start(ds)
    deadline = time.monotonic() + 10
    while not all(sub.healthy(e.name) for e in ds.endpoints()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # subscriptions reach the publishers
    want = batches
    m = await measure(sub, go, want, seconds)
    await sub.stop()
    pub.join(10)
    dt, events, got = m.seconds, m.events, m.batches
    us_per_event = m.cpu_seconds / max(1, events) * 1e6
    # Baseline in the same run: decoding and indexing the same batches without sockets.
    base_index = KVBlockIndex(backend=backend)
    c0 = time.process_time()
    for i, p in enumerate(payloads):
        if base_index.apply_payload("pod", p, BS) is None:
            base_index.apply("pod", decode_batch(i, p).events)
    base_us = (time.process_time() - c0) / (len(payloads) * BATCH_EVENTS) * 1e6
    target = endpoints * rate
    return {"index": type(index).__name__, "endpoints": endpoints, "events_per_s_each": rate, "seconds": round(dt, 2),
            "batches_sent": want * endpoints, "batches_applied": got,
            "events_per_s_total": round(events / dt),
            "cores": round(m.cpu_seconds / dt, 3),
            "cpu_us_per_event": round(us_per_event, 2),
            "baseline_decode_index_us_per_event": round(base_us, 2),
            "cores_at_target_rate": round(us_per_event * target / 1e6, 3),
            "loop_lag_p99_ms": m.loop_lag_p99_ms,
            "index_entries": index.size}


def bench_pick(tokdir: Path, n: int, rounds: int,
               precise_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pick time at `n` endpoints, precise (with `precise_params`) and approximate."""
    rng = random.Random(1)
    tok = ModelTokenizer(MODEL, tokdir)
    words = "the model server cache token prefix route queue batch data pod review".split()

    def text(chars: int) -> str:
        return " ".join(rng.choice(words) for _ in range(chars // 4))[:chars]

    systems = [f"[system {g}] " + text(2048) for g in range(16)]
    prompts = [systems[i % 16] + text(2048) for i in range(rounds)]
    ds = Datastore(staleness_threshold=1e9)
    eps = [Endpoint(f"pod-{i}", f"10.0.{i // 250}.{i % 250 + 1}", 8000) for i in range(n)]
    ds.set_endpoints(eps)
    for e in eps:
        ds.update_metrics(e.name, EndpointMetrics(waiting=0, running=1, kv_usage=0.3,
                                                  scraped_at=time.monotonic(),
                                                  models=frozenset({MODEL})))
    snap = ds.snapshot()
    precise = PrecisePrefixCacheScorer.from_params(
        "precise-prefix-cache-scorer",
        {"blockSize": BS, "tokenizers": {MODEL: str(tokdir)}, **(precise_params or {})})
    approx = PrefixCacheScorer()
    from epp.kvevents.subscriber import EndpointStream, StreamAddress

    for i, e in enumerate(eps):  # each endpoint holds some system prompts, to some depth
        s = EndpointStream(None, e.name, StreamAddress("tcp://x:1", None), precise.index,  # type: ignore[arg-type]
                           block_size=BS)
        s.connected = True
        precise.subscriber.streams[e.name] = s
        for g in range(16):
            if (i + g) % 4:
                continue
            ids = tok.encode(systems[g], True)
            depth = (len(ids) // BS) * (1 + (i % 3)) // 3
            precise.index.apply(e.name, [BlockStored(
                tuple(range(g * 1000 + 1, g * 1000 + 1 + depth)), None, ids[: depth * BS], BS,
                None, "GPU")])
    out: dict[str, Any] = {"endpoints": n, "prompt_bytes": len(prompts[0].encode())}
    for label, scorer in (("precise", precise), ("approximate", approx)):
        sched = Scheduler([Profile("p", scorers=[(scorer, 1.0)],
                                   picker=MaxScorePicker("max-score-picker"))],
                          plugin_metrics_every=1_000_000)
        reqs = []
        for i, p in enumerate(prompts):
            r = SchedulingRequest(f"r{i}", MODEL, p, api="completions", body={"prompt": p})
            if scorer is precise:
                r.prepared[precise.name] = tok.encode(p, True)
            reqs.append(r)
        times = []
        for r in reqs:
            t0 = time.perf_counter()
            sched.schedule(r, snap)
            times.append(time.perf_counter() - t0)
        times.sort()
        out[f"{label}_p50_us"] = round(statistics.median(times) * 1e6, 1)
        out[f"{label}_p99_us"] = round(times[int(len(times) * 0.99)] * 1e6, 1)
    return out


def bench_tokenize(tokdir: Path, rounds: int) -> dict[str, Any]:
    tok = ModelTokenizer(MODEL, tokdir)
    rng = random.Random(2)
    words = "the model server cache token prefix route queue batch data pod review".split()
    out: dict[str, Any] = {}
    for kb in (1, 4, 16, 64):
        s = " ".join(rng.choice(words) for _ in range(kb * 250))[: kb * 1024]
        tok.encode(s, True)
        times = []
        for _ in range(max(3, rounds // kb)):
            t0 = time.perf_counter()
            tok.encode(s, True)
            times.append(time.perf_counter() - t0)
        out[f"encode_{kb}kb_us_per_kb"] = round(statistics.median(times) * 1e6 / kb, 1)
    msgs = [{"role": "system", "content": "x" * 2000}, {"role": "user", "content": "y" * 2000}]
    tok.render_chat(msgs)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        tok.render_chat(msgs)
        times.append(time.perf_counter() - t0)
    out["chat_template_render_4kb_us"] = round(statistics.median(times) * 1e6, 1)
    return out


def bench_prefix_cache(tokdir: Path, rounds: int) -> dict[str, Any]:
    from epp.tokenization import Prompt, TokenizerPool
    from tests import local_tokenizers

    rng = random.Random(3)
    words = ("the model server cache token prefix route queue batch data pod review, "
             "Answer briefly. You are a helpful assistant; cite sources (2025).").split()

    def text(chars: int) -> str:
        return " ".join(rng.choice(words) for _ in range(chars // 3))[:chars]

    async def timed(pool: TokenizerPool, p: Prompt) -> tuple[list[int], float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        r = await pool.encode_async(MODEL, p)
        return r, (time.perf_counter() - t0) * 1e6, (time.process_time() - c0) * 1e6

    async def run(path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # `whole`: today's path (exact-text cache only, which a new question misses:
        # long prompts in the worker thread); `spliced`: the prefix cache.
        whole = TokenizerPool({MODEL: str(path)}, splice_min_chars=None)
        spliced = TokenizerPool({MODEL: str(path)}, splice_min_chars=0)
        t0 = time.perf_counter()
        tok = spliced.get(MODEL)
        assert tok.splicer() is not None
        out["load_check_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        for kb in (0.5, 1, 2, 4, 8):
            system = text(int(kb * 1024) - 250)
            n = max(20, int(rounds // (4 * kb)))

            def chat(sys_text: str) -> Prompt:
                return Prompt(tok.render_chat([{"role": "system", "content": sys_text},
                                               {"role": "user", "content": text(200)}]), False)

            await spliced.encode_async(MODEL, chat(system))  # the shared prefix is cached
            rows: dict[str, list[float]] = {}
            same = True
            for i in range(n):
                a, b, c = chat(system), chat(system), chat(f"{kb}:{i}" + system[6:])
                ia, w, wc = await timed(whole, a)
                ib, sp, spc = await timed(spliced, b)
                _, cold, coldc = await timed(spliced, c)  # a new system prompt: all pieces
                for k, v in (("whole", w), ("whole_cpu", wc), ("spliced", sp),
                             ("spliced_cpu", spc), ("cold", cold), ("cold_cpu", coldc)):
                    rows.setdefault(k, []).append(v)
                same = same and ib == tok.encode(b.text, False) and ia == tok.encode(a.text, False)
            size = len(a.text.encode()) / 1024
            med = {k: statistics.median(v) for k, v in rows.items()}
            out[f"{kb}kb"] = {
                "prompt_kb": round(size, 2), "n": n,
                **{f"{k}_us": round(v, 1) for k, v in med.items()},
                "whole_us_per_kb": round(med["whole"] / size, 1),
                "spliced_us_per_kb": round(med["spliced"] / size, 1),
                "speedup": round(med["whole"] / med["spliced"], 1),
                "cold_over_whole": round(med["cold"] / med["whole"], 2),
                "ids_equal": same}
        whole.close()
        spliced.close()
        return out

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        dirs = {"tiny": tokdir,
                "bytelevel": local_tokenizers.write("byte_level", Path(d) / "bl"),
                "metaspace": local_tokenizers.write("metaspace_first", Path(d) / "ms")}
        for name, path in dirs.items():
            for k, v in asyncio.run(run(path)).items():
                out[f"{name}_{k}"] = v
    return out


def pick_ab(assign: str, n: int, rounds: int, runs: int = 5) -> int:
    """The pick's cost with a precise scorer parameter changed, against the defaults, in
    alternating runs of one process (the machine is shared: compare medians)."""
    key, _, value = assign.partition("=")
    variant = {key: float(value)}
    got: dict[str, list[float]] = {"default": [], assign: []}
    with tempfile.TemporaryDirectory() as d:
        tokdir = tinytok.write(d)
        for _ in range(runs):
            for label, params in (("default", {}), (assign, variant)):
                got[label].append(bench_pick(tokdir, n, rounds, params)["precise_p50_us"])
    for label, p50s in got.items():
        print(f"pick {label}: precise p50 median {statistics.median(p50s):.1f} us "
              f"(runs {', '.join(f'{x:.1f}' for x in p50s)}), {n} endpoints")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short: CI")
    ap.add_argument("--endpoints", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2000.0, help="events/s per endpoint")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--index", choices=["native", "python", "both"], default="both",
                    help="KV index for the intake run(s); both = native then Python, same run")
    ap.add_argument("--only", choices=("tokenize",), default=None,
                    help="run only the tokenization parts (3 and 4)")
    ap.add_argument("--pick-ab", metavar="PARAM=NUMBER", default=None,
                    help="only the pick: 5 alternating runs with the precise scorer's defaults "
                         "and with this parameter, then the medians")
    args = ap.parse_args(argv)
    if args.pick_ab:
        return pick_ab(args.pick_ab, args.endpoints, 200 if args.quick else 2000)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    rounds = 200 if args.quick else 2000
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as d:
        tokdir = tinytok.write(d)
        if args.only is None:
            backends = ["native", "python"] if args.index == "both" else [args.index]
            for backend in backends:
                if backend == "native" and not native_available():
                    print("intake: the native index is not built (make venv needs cargo); skipped")
                    continue
                intake = asyncio.run(bench_intake(args.endpoints, args.rate, seconds, backend))
                print("intake:", intake)
            print("pick:", bench_pick(tokdir, args.endpoints, rounds))
        print("tokenize:", bench_tokenize(tokdir, rounds))
        for k, v in bench_prefix_cache(tokdir, rounds).items():
            print(f"tokenize prefix cache {k}:", v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
