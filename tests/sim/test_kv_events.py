"""The simulator's KV cache reports what vLLM's would: stored blocks with their tokens and
parent, evictions, resets. (Publishing them over ZeroMQ, replay included, is exercised by
tests/unit/test_kvevents_stream.py and the e2e test with a real Envoy.)

Cross-check against an independent publisher, llm-d-inference-sim v0.10.2 (Go; built into
~/.cache/epp-tools by tests/tools.py): our decoder and index consume its real events, over
loopback. It publishes offline with `--enable-kvcache --force-dummy-tokenizer`, `POD_IP`
set, and `--zmq-endpoint` naming a socket *we* bind (its PUB dials out:
`pkg/common/publisher.go`, `NewPublisher`). Its dummy tokenizer (`pkg/tokenizer/
tokenizer.go`, `SimpleTokenizer`) makes one token per word or punctuation mark (a hash
of it), and only full blocks are stored, so a prompt needs `--block-size` words or more
to produce an event. Events leave in batches of `--event-batch-size` or once a second
(`pkg/kv-cache/kv_cache_sender.go`, `KVEventSender.Run`).

Why an earlier attempt (2026-12-02) saw no event at all: its PUB socket (go-zeromq/zmq4,
ZMTP 3.0) sends a message only to peers whose subscription it has received (`pub.go`,
`pubMWriter.sendMsg`), and a libzmq SUB socket sends its subscription only when the
application next calls into the socket: libzmq processes the socket's pending commands
(here: attach the new connection's pipe, then send the subscription) in the caller's
thread, on `poll`/`recv`/`getsockopt`. A test that binds the SUB, sends its requests and
only then polls has its subscription leave after the events were published and dropped
(seen on the wire with a relay). Below, the subscription is proven live first: the
socket is polled while `/sleep` (with `--enable-sleep-mode`, `VLLM_SERVER_DEV_MODE=1`)
makes the simulator publish `AllBlocksCleared`, until one arrives.

The same simulator also feeds our bound intake itself (`epp.kvevents.bound`, the
precise scorer's `kvEventsConfig.zmqEndpoint`, llm-d's deployment): it binds, the
simulator's PUB dials in, the topic's POD_IP names the pool's endpoint. There the intake
reads whenever libzmq wakes the socket's file descriptor, which it also does for the new
connection, so the subscription leaves at once; the test still waits for a reset to be
applied before it sends requests, as the first one proves the subscription live.

Known difference from vLLM: in its default (array) event format a first block's
`parent_block_hash` is 0, not nil (`encodeEvent`; vLLM sends None and so does its map
format, `--use-vllm-map-event-format`). Our index reads 0 as "no parent" too
(`epp.kvevents.index.NO_PARENT`), so both formats are cross-checked the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import zmq
import zmq.asyncio

from epp.datastore import Datastore, Endpoint
from epp.kvevents.bound import BoundKVEventsSubscriber
from epp.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored, decode_message
from epp.kvevents.index import KVBlockIndex, block_keys, root_key
from epp.sim.kvcache import KVCache
from tests.sim.conftest import BASE
from tests.llm_d_sim import free_port, llm_d_inference_sim


def test_store_evict_and_reset_events() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    kv.events = []
    tokens = [1, 2, 3, 4, 5]  # two full blocks and a partial one
    blocks = kv.allocate([], 3)
    kv.commit(blocks, (11, 12), tokens, "food-review")
    (ev,) = kv.take_events()
    assert isinstance(ev, BlockStored)
    assert (ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size,
            ev.lora_name, ev.medium) == ([11, 12], None, [1, 2, 3, 4], 2, "food-review", "GPU")
    kv.free(blocks)
    # A prompt sharing block 11 stores only its new block, with 11 as the parent.
    hit = kv.cached_prefix((11, 13))
    blocks2 = kv.allocate(hit, 2)
    kv.commit(blocks2, (11, 13), [1, 2, 9, 9])
    (ev,) = kv.take_events()
    assert (ev.block_hashes, ev.parent_block_hash, ev.token_ids) == ([13], 11, [9, 9])
    kv.free(blocks2)
    # Allocating every block evicts the cached ones, least recently freed first.
    kv.allocate([], 4)
    removed = kv.take_events()
    assert len(removed) == 1 and isinstance(removed[0], BlockRemoved)
    assert sorted(removed[0].block_hashes) == [11, 12, 13]
    kv.reset_prefix_cache()
    assert [type(e) for e in kv.take_events()] == [AllBlocksCleared]
    assert kv.take_events() == []


def test_no_events_unless_recording() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    kv.commit(kv.allocate([], 1), (1,), [1, 2])
    assert kv.events is None and kv.take_events() == []


def _words(tag: str, n: int) -> str:
    """A prompt of n dummy-tokenizer tokens (one per word)."""
    return " ".join(f"{tag}{i}" for i in range(n))


@asynccontextmanager
async def llm_d_sim(tmp_path: Path, http: aiohttp.ClientSession, zmq_endpoint: str,
                    *extra: str) -> AsyncIterator[str]:
    """llm-d-inference-sim publishing to `zmq_endpoint` (which we bind), healthy; yields
    its URL. Blocks of 16 tokens, a cache of 6 blocks, one event per batch."""
    async with llm_d_inference_sim(
            tmp_path, "--model", BASE, "--force-dummy-tokenizer",
            "--enable-kvcache", "--zmq-endpoint", zmq_endpoint,
            "--block-size", "16", "--kv-cache-size", "6", "--event-batch-size", "1",
            "--enable-sleep-mode", "--time-to-first-token", "1ms",
            "--inter-token-latency", "1ms", *extra,
            env={"POD_IP": "127.0.0.1", "VLLM_SERVER_DEV_MODE": "1"}) as url:
        yield url


async def complete(http: aiohttp.ClientSession, url: str, prompt: str) -> None:
    async with http.post(url + "/v1/completions",
                         json={"model": BASE, "prompt": prompt, "max_tokens": 1}) as r:
        assert r.status == 200, await r.text()


async def reset(http: aiohttp.ClientSession, url: str) -> None:
    """/sleep then /wake_up: the simulator publishes AllBlocksCleared."""
    async with http.post(url + "/sleep") as r:
        assert r.status == 200
    async with http.post(url + "/wake_up") as r:
        assert r.status == 200


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["map", "array"])
async def test_our_decoder_reads_llm_d_inference_sims_events(
        layout: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    zport = free_port()
    sub.bind(f"tcp://127.0.0.1:{zport}")
    index = KVBlockIndex()

    async def events(within: float) -> list[object]:
        """Decoded events received within `within` s (stops at the first quiet 0.3 s
        after some arrived)."""
        out: list[object] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await sub.poll(300):
                if out:
                    break
                continue
            frames = await sub.recv_multipart()
            assert frames[0] == f"kv@127.0.0.1@{BASE}".encode()  # kv@<POD_IP>@<model>
            batch = decode_message(frames)
            assert batch.unknown == 0
            out.extend(batch.events)
        return out

    extra = ("--use-vllm-map-event-format",) if layout == "map" else ()
    try:
        async with llm_d_sim(tmp_path, http, f"tcp://127.0.0.1:{zport}", *extra) as url:
            # The subscription is live once a reset published after it arrives (docstring).
            for _ in range(20):
                async with http.post(url + "/sleep") as r:
                    assert r.status == 200
                got = await events(0.5)
                async with http.post(url + "/wake_up") as r:
                    assert r.status == 200
                if any(isinstance(e, AllBlocksCleared) for e in got):
                    break
            else:
                pytest.fail("no AllBlocksCleared from llm-d-inference-sim after 20 resets")

            # A: 40 tokens -> two full blocks stored, no parent.
            await complete(http, url, _words("a", 40))
            (a,) = await events(5)
            assert isinstance(a, BlockStored)
            assert (len(a.block_hashes), len(a.token_ids), a.block_size, a.medium) == (2, 32, 16, "GPU")
            # None as vLLM sends it; 0 in the array format (the known difference, docstring).
            assert a.parent_block_hash == (0 if layout == "array" else None)
            assert index.apply("go", [a]).stored == 2
            keys_a = block_keys(a.token_ids, 16, root_key(None))
            assert index.match(keys_a) == {"go": 2}

            # B shares A's first block: only its second block is stored, chained on A's first
            # engine hash, which our index translates into our key.
            await complete(http, url, _words("a", 16) + " " + _words("b", 24))
            (b,) = await events(5)
            assert isinstance(b, BlockStored)
            assert b.parent_block_hash == a.block_hashes[0] and len(b.block_hashes) == 1
            assert index.apply("go", [b]).stored == 1
            keys_b = block_keys(a.token_ids[:16] + b.token_ids, 16, root_key(None))
            assert keys_b[0] == keys_a[0] and index.match(keys_b) == {"go": 2}

            # C needs 4 new blocks in a cache of 6 holding 3: the least recently used of A's
            # and B's blocks is evicted, and our index forgets exactly that one.
            await complete(http, url, _words("c", 64))
            got = await events(5)
            removed = [h for e in got if isinstance(e, BlockRemoved) for h in e.block_hashes]
            (c,) = [e for e in got if isinstance(e, BlockStored)]
            assert len(removed) == 1 and len(c.block_hashes) == 4
            result = index.apply("go", got)
            assert (result.stored, result.removed, result.orphans, result.malformed) == (4, 1, 0, 0)
            assert index.match(block_keys(c.token_ids, 16, root_key(None))) == {"go": 4}
            held = {h: k for h, k in zip([*a.block_hashes, *b.block_hashes],
                                         [*keys_a, keys_b[1]])}
            for h, k in held.items():
                assert index.holds("go", k) == (h not in removed)
            assert index.blocks_of("go") == 6
    finally:
        sub.close()
        ctx.term()


@pytest.mark.slow
async def test_our_bound_intake_indexes_llm_d_inference_sims_events(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """llm-d's deployment end to end: we bind, the simulator dials in as POD_IP=127.0.0.1,
    the intake routes its topic to the pool's endpoint at that IP and indexes its blocks."""
    zport = free_port()
    ds = Datastore()
    index = KVBlockIndex()
    intake = BoundKVEventsSubscriber(index, block_size=16, bind=f"tcp://127.0.0.1:{zport}")
    await intake.start(ds)
    seen: list[list[bytes]] = []

    def stored() -> list[BlockStored]:
        """The BlockStored events the intake has received so far (decoded again here)."""
        return [e for f in seen for e in decode_message(f).events if isinstance(e, BlockStored)]

    async def until(cond: object, what: str, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not cond():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.02)

    try:
        async with llm_d_sim(tmp_path, http, f"tcp://127.0.0.1:{zport}",
                             "--use-vllm-map-event-format") as url:
            port = int(url.rpartition(":")[2])
            ds.set_endpoints([Endpoint("sim-rank-0", "127.0.0.1", port)])
            stream = intake.streams["sim-rank-0"]
            receive = stream.receive
            stream.receive = lambda frames: (seen.append(frames), receive(frames))[1]  # type: ignore[method-assign]
            # Known once a batch of its is applied; a reset is one (docstring).
            for _ in range(20):
                await reset(http, url)
                try:
                    await until(lambda: intake.healthy("sim-rank-0"), "", 1.0)
                    break
                except AssertionError:
                    pass
            else:
                pytest.fail("our bound intake applied no batch of llm-d-inference-sim's "
                            "after 20 resets")
            assert all(f[0] == f"kv@127.0.0.1@{BASE}".encode() for f in seen)

            await complete(http, url, _words("a", 40))  # two blocks
            await until(lambda: index.blocks_of("sim-rank-0") == 2, "A's blocks not indexed")
            (a,) = stored()
            keys_a = block_keys(a.token_ids, 16, root_key(None))
            assert index.match(keys_a) == {"sim-rank-0": 2}

            await complete(http, url, _words("a", 16) + " " + _words("b", 24))  # one more
            await until(lambda: index.blocks_of("sim-rank-0") == 3, "B's block not indexed")
            b = stored()[1]
            keys_b = block_keys(a.token_ids[:16] + b.token_ids, 16, root_key(None))
            assert index.match(keys_b) == {"sim-rank-0": 2}

            await complete(http, url, _words("c", 64))  # 4 more in a cache of 6: one evicted
            await until(lambda: len(stored()) == 3 and index.blocks_of("sim-rank-0") == 6,
                        "C's blocks not indexed")
            c = stored()[2]
            assert index.match(block_keys(c.token_ids, 16, root_key(None))) == {"sim-rank-0": 4}
            held = [k for k in [*keys_a, keys_b[1]] if index.holds("sim-rank-0", k)]
            assert len(held) == 2  # 3 of A's and B's blocks were held; the LRU one went
            assert intake.healthy("sim-rank-0")
    finally:
        await intake.stop()
