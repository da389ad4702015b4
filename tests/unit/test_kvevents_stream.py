"""Event intake over real ZeroMQ sockets: ordering, gap recovery by replay, restarts,
garbage, a vanished publisher. The publisher is the simulator's (PUB + ROUTER replay,
framed as vLLM's ZmqEventPublisher)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq

from epp.datastore import Datastore, Endpoint
from epp.kvevents.decode import AllBlocksCleared, BlockRemoved, encode_seq
from epp.kvevents.index import KVBlockIndex
from epp.kvevents.subscriber import (
    PORT_LABEL,
    REPLAY_PORT_LABEL,
    EndpointStream,
    KVEventsSubscriber,
    StreamAddress,
)
from epp.sim.kvpublisher import KVEventPublisher
from tests.kvevents_helpers import BS, blocks, errors, keys, store, until

pytestmark = pytest.mark.usefixtures("kv_backend")  # each test over both index implementations


@pytest.fixture
async def pub() -> AsyncIterator[KVEventPublisher]:
    p = KVEventPublisher("127.0.0.1", 0, 0)
    p.start()
    yield p
    await p.stop()


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.term()


async def connected_stream(ctx: zmq.Context, pub: KVEventPublisher, index: KVBlockIndex,
                           replay: bool = True) -> EndpointStream:
    addr = StreamAddress(f"tcp://127.0.0.1:{pub.port}",
                         f"tcp://127.0.0.1:{pub.replay_port}" if replay else None)
    s = EndpointStream(ctx, "pod", addr, index, block_size=BS, replay_timeout=1.0)
    s.start()
    await until(lambda: s.healthy)
    await asyncio.sleep(0.05)  # the subscription reaches the publisher
    return s


async def test_events_in_order_reach_the_index(ctx: zmq.Context, pub: KVEventPublisher) -> None:
    index = KVBlockIndex()
    s = await connected_stream(ctx, pub, index)
    try:
        pub.publish(store(1, blocks(0, 1)))
        pub.publish(store(2, blocks(4, 1), parent=1))
        await until(lambda: index.match(keys(blocks(0, 2))) == {"pod": 2})
        pub.publish([BlockRemoved((2,), "GPU")])
        await until(lambda: index.match(keys(blocks(0, 2))) == {"pod": 1})
        assert s.next_seq == 3
    finally:
        await s.stop()


async def test_a_joining_subscriber_replays_history_from_zero(
        ctx: zmq.Context, pub: KVEventPublisher) -> None:
    pub.publish(store(1, blocks(0, 1)))  # before anyone listens: only in the replay buffer
    pub.publish(store(2, blocks(4, 1), parent=1))
    index = KVBlockIndex()
    s = await connected_stream(ctx, pub, index)
    try:
        pub.publish(store(3, blocks(8, 1), parent=2))  # seq 2 arrives first, live
        await until(lambda: index.match(keys(blocks(0, 3))) == {"pod": 3})
    finally:
        await s.stop()


async def test_a_gap_is_filled_from_the_replay_socket(
        ctx: zmq.Context, pub: KVEventPublisher) -> None:
    index = KVBlockIndex()
    s = await connected_stream(ctx, pub, index)
    try:
        pub.publish(store(1, blocks(0, 1)))
        pub.drop_next = 1
        pub.publish(store(2, blocks(4, 1), parent=1))  # lost on the wire
        pub.publish(store(3, blocks(8, 1), parent=2))
        await until(lambda: index.match(keys(blocks(0, 3))) == {"pod": 3})
        assert s.next_seq == 3
    finally:
        await s.stop()


async def test_an_unreplayable_gap_drops_the_endpoint_and_rebuilds(
        ctx: zmq.Context, pub: KVEventPublisher) -> None:
    index = KVBlockIndex()
    before = errors("sequence_gap")
    s = await connected_stream(ctx, pub, index, replay=False)
    try:
        pub.publish(store(1, blocks(0, 1)))
        await until(lambda: index.size == 1)
        pub.drop_next = 1
        pub.publish([BlockRemoved((1,), "GPU")])  # lost: the index would claim block 1 forever
        pub.publish(store(9, blocks(100, 1)))
        await until(lambda: index.match(keys(blocks(100, 1))) == {"pod": 1})
        assert index.match(keys(blocks(0, 1))) == {}  # dropped, not believed
        assert errors("sequence_gap") == before + 1
        assert s.healthy
    finally:
        await s.stop()


async def test_garbage_and_unknown_events_are_counted_and_the_stream_goes_on(
        ctx: zmq.Context, pub: KVEventPublisher) -> None:
    index = KVBlockIndex()
    garbage, frames = errors("garbage"), errors("bad_frame")
    s = await connected_stream(ctx, pub, index, replay=False)
    try:
        pub.send_raw([b"only-one-frame"])
        pub.send_raw([b"t", b"\x00", b"\x90"])                  # a 1-byte sequence number
        pub.send_raw([b"t", encode_seq(0), b"\xc1 not msgpack"])  # seq 0's payload is garbage
        pub._seq = 1
        pub.publish(store(5, blocks(0, 1)))
        await until(lambda: index.size == 1)
        assert errors("bad_frame") == frames + 2
        assert errors("garbage") == garbage + 1
        assert s.healthy
    finally:
        await s.stop()


async def test_a_restarted_engine_is_cleared(ctx: zmq.Context, pub: KVEventPublisher) -> None:
    index = KVBlockIndex()
    s = await connected_stream(ctx, pub, index, replay=False)
    try:
        pub.publish(store(1, blocks(0, 1)))
        pub.publish(store(2, blocks(4, 1)))
        await until(lambda: index.size == 2)
        pub._seq = 0  # the engine came back with an empty cache, counting from 0 again
        pub.publish(store(7, blocks(50, 1)))
        await until(lambda: index.match(keys(blocks(50, 1))) == {"pod": 1})
        assert index.size == 1
        pub.publish([AllBlocksCleared()])
        await until(lambda: index.size == 0)
    finally:
        await s.stop()


async def test_a_vanished_publisher_makes_the_endpoint_unknown(ctx: zmq.Context) -> None:
    p = KVEventPublisher("127.0.0.1", 0, None)
    p.start()
    index = KVBlockIndex()
    s = await connected_stream(ctx, p, index, replay=False)
    try:
        p.publish(store(1, blocks(0, 1)))
        await until(lambda: index.size == 1)
        gone = errors("publisher_gone")
        await p.stop()
        await until(lambda: not s.healthy)
        assert errors("publisher_gone") == gone + 1
        # It comes back on the same port (a restart): known again, rebuilt from scratch.
        p2 = KVEventPublisher("127.0.0.1", p.port, None)
        p2.start()
        try:
            await until(lambda: s.healthy)
            assert index.size == 0
            await asyncio.sleep(0.05)
            p2.publish(store(3, blocks(20, 1)))
            await until(lambda: index.size == 1)
        finally:
            await p2.stop()
    finally:
        await s.stop()


async def test_subscriber_follows_the_pool(pub: KVEventPublisher) -> None:
    ds = Datastore()
    labels = {PORT_LABEL: str(pub.port), REPLAY_PORT_LABEL: str(pub.replay_port)}
    ds.set_endpoints([Endpoint("pod-a", "127.0.0.1", 8000, labels),
                      Endpoint("pod-b", "127.0.0.1", 8001, {PORT_LABEL: "not-a-port"})])
    index = KVBlockIndex()
    sub = KVEventsSubscriber(index, block_size=BS)
    await sub.start(ds)
    try:
        assert set(sub.streams) == {"pod-a"}  # pod-b's label is unusable: counted, skipped
        await until(lambda: sub.healthy("pod-a"))
        await asyncio.sleep(0.05)
        pub.publish(store(1, blocks(0, 1)))
        await until(lambda: index.size == 1)
        ds.remove_endpoint("pod-a")
        assert "pod-a" not in sub.streams and index.size == 0 and not sub.healthy("pod-a")
    finally:
        await sub.stop()
