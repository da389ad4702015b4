"""Bound event intake over real ZeroMQ sockets: the EPP binds one SUB socket, engines'
PUB sockets connect to it (llm-d's deployment) and name themselves in the topic,
`kv@<pod-ip>@<model>`. The publishers are the simulator's, in connect mode."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import zmq

from epp import observability as obs
from epp.datastore import Datastore, Endpoint
from epp.kvevents.bound import BoundKVEventsSubscriber, normal_ip, peer_ip
from epp.kvevents.decode import AllBlocksCleared, BlockRemoved, BlockStored, encode_seq
from epp.kvevents.index import KVBlockIndex
from epp.kvevents.subscriber import REPLAY_PORT_LABEL
from epp.sim.kvpublisher import KVEventPublisher
from tests.kvevents_helpers import BS, blocks, errors, keys, store, until

pytestmark = pytest.mark.usefixtures("kv_backend")  # each test over both index implementations

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
REASONS = {"garbage", "bad_frame", "unknown_event", "unknown_parent", "sequence_gap",
           "sequence_reset", "replay_timeout", "publisher_gone", "block_size_mismatch",
           "bad_address", "bad_topic", "unknown_publisher", "ambiguous_publisher",
           "backlog_full"}


async def publish_until(engine: KVEventPublisher, events: list[object],
                        cond: Callable[[], bool]) -> None:
    """Publish `events` again and again until `cond` holds: the first messages may arrive
    before the bound socket's subscription reaches a newly connected publisher."""
    def again() -> bool:
        engine.publish(events)
        return cond()
    await until(again)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


class Fleet:
    """A datastore, the bound intake and engines that publish to it."""

    def __init__(self, endpoints: list[Endpoint], *, replay_port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.ds = Datastore()
        self.ds.set_endpoints(endpoints)
        self.index = KVBlockIndex()
        self.sub = BoundKVEventsSubscriber(self.index, block_size=BS,
                                           bind=f"tcp://{host}:{free_port()}",
                                           replay_port=replay_port, replay_timeout=1.0)
        self.pubs: list[KVEventPublisher] = []

    def engine(self, pod: str, *, replay: bool = False, topic: str | None = None,
               source: str | None = None) -> KVEventPublisher:
        """An engine at `pod` (its POD_IP or whatever it names itself by) that connects,
        from the loopback address `source` when given (as if from that pod's IP)."""
        to = f"tcp://127.0.0.1:{self.port}"
        if source is not None:
            to = f"tcp://{source}:0;127.0.0.1:{self.port}"  # libzmq: source;destination
        p = KVEventPublisher(source or "127.0.0.1", 0, 0 if replay else None, connect=to,
                             topic=topic if topic is not None else f"kv@{pod}@{MODEL}")
        p.start()
        self.pubs.append(p)
        return p

    @property
    def port(self) -> int:
        return int((self.sub.bound_to or "").rsplit(":", 1)[1])

    async def vanish(self, pub: KVEventPublisher) -> None:
        """The engine goes away (its connection closes); its pod stays in the pool."""
        self.pubs.remove(pub)
        await pub.stop()

    async def knock(self, source: str) -> None:
        """A connection from `source` that is no publisher (a probe): opened, then closed."""
        n = self.sub.connections_from(source)
        _, w = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(source, 0))
        await until(lambda: self.sub.connections_from(source) == n + 1)
        w.close()
        await w.wait_closed()
        await until(lambda: self.sub.connections_from(source) == n)

    async def joined(self, pub: KVEventPublisher, name: str) -> None:
        """Until our subscription reached `pub` (a PUB drops what it sends before): it
        publishes no-op batches until one is applied, which makes `name` known."""
        for _ in range(300):
            pub.publish([BlockRemoved((999_999,), "GPU")])
            try:
                await until(lambda: self.sub.healthy(name), timeout=0.05)
                return
            except TimeoutError:
                pass
        raise TimeoutError(f"{name} never joined")

    async def close(self) -> None:
        for p in self.pubs:
            await p.stop()
        await self.sub.stop()


@pytest.fixture
async def fleet() -> AsyncIterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(endpoints: list[Endpoint], **kw: Any) -> Fleet:
        f = Fleet(endpoints, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        await f.close()


async def test_each_engines_events_reach_its_own_endpoint(fleet: Callable[..., Fleet]) -> None:
    f = fleet([Endpoint("pod-a", "10.0.0.1", 8000), Endpoint("pod-b", "10.0.0.2", 8000)])
    await f.sub.start(f.ds)
    assert not f.sub.healthy("pod-a") and not f.sub.healthy("pod-b")  # nothing applied yet
    a, b = f.engine("10.0.0.1"), f.engine("10.0.0.2")
    await f.joined(a, "pod-a")
    await f.joined(b, "pod-b")
    a.publish(store(1, blocks(0, 1)))
    a.publish(store(2, blocks(4, 1), parent=1))
    b.publish(store(7, blocks(0, 1)))  # engine hashes are per engine: 7 on b is block 0 too
    await until(lambda: f.index.match(keys(blocks(0, 2))) == {"pod-a": 2, "pod-b": 1})
    b.publish([BlockRemoved((7,), "GPU")])
    await until(lambda: f.index.match(keys(blocks(0, 2))) == {"pod-a": 2})
    assert f.sub.streams["pod-a"].next_seq == a._seq and f.sub.streams["pod-b"].next_seq == b._seq


async def test_a_topic_may_name_the_endpoint_or_its_ip_and_port(
        fleet: Callable[..., Fleet]) -> None:
    # Two endpoints of one pod (two target ports) share an IP: the IP alone is ambiguous.
    f = fleet([Endpoint("pod-rank-0", "10.0.0.1", 8000), Endpoint("pod-rank-1", "10.0.0.1", 8001)])
    await f.sub.start(f.ds)
    by_name, by_hostport = f.engine("pod-rank-0"), f.engine("10.0.0.1:8001")
    await f.joined(by_name, "pod-rank-0")
    await f.joined(by_hostport, "pod-rank-1")
    ambiguous = errors("ambiguous_publisher")
    shared = f.engine("10.0.0.1")
    await publish_until(shared, [AllBlocksCleared()],
                        lambda: errors("ambiguous_publisher") > ambiguous)
    by_name.publish(store(1, blocks(0, 1)))
    by_hostport.publish([BlockStored((2, 3), None, blocks(0, 2), BS, None, "GPU")])
    await until(lambda: f.index.match(keys(blocks(0, 2))) == {"pod-rank-0": 1, "pod-rank-1": 2})


async def test_strangers_and_garbage_topics_are_counted_and_others_go_on(
        fleet: Callable[..., Fleet]) -> None:
    f = fleet([Endpoint("pod-a", "10.0.0.1", 8000)])
    await f.sub.start(f.ds)
    a = f.engine("10.0.0.1")
    await f.joined(a, "pod-a")
    unknown, bad, frames = errors("unknown_publisher"), errors("bad_topic"), errors("bad_frame")
    stranger = f.engine("10.9.9.9")
    nameless = f.engine("", topic="kv@no-pod-part")  # passes the kv@ filter, names nobody
    await publish_until(stranger, store(5, blocks(0, 1)),
                        lambda: errors("unknown_publisher") > unknown)
    await publish_until(nameless, store(5, blocks(0, 1)),
                        lambda: errors("bad_topic") > bad)
    a.send_raw([f"kv@10.0.0.1@{MODEL}".encode(), b"\x00"])  # its stream counts a bad frame
    a.send_raw([f"kv@10.0.0.1@{MODEL}".encode(), encode_seq(a._seq), b"\xc1 not msgpack"])
    a._seq += 1
    a.publish(store(1, blocks(0, 1)))
    await until(lambda: f.index.match(keys(blocks(0, 1))) == {"pod-a": 1})
    assert f.index.size == 1 and f.sub.healthy("pod-a")
    assert errors("bad_frame") == frames + 1
    # Topics never become label values: only the bounded reasons exist.
    reasons = {s.labels["reason"] for m in obs.REGISTRY.collect()
               if m.name == "inference_extension_kv_events_errors" for s in m.samples}
    assert reasons <= REASONS


async def test_an_unreplayable_gap_drops_the_endpoint_and_rebuilds(
        fleet: Callable[..., Fleet]) -> None:
    f = fleet([Endpoint("pod-a", "10.0.0.1", 8000), Endpoint("pod-b", "10.0.0.2", 8000)])
    await f.sub.start(f.ds)
    a, b = f.engine("10.0.0.1"), f.engine("10.0.0.2")
    await f.joined(a, "pod-a")
    await f.joined(b, "pod-b")
    gaps = errors("sequence_gap")
    a.publish(store(1, blocks(0, 1)))
    b.publish(store(1, blocks(0, 1)))
    await until(lambda: f.index.size == 2)
    a.drop_next = 1
    a.publish([BlockRemoved((1,), "GPU")])  # lost: a's index would claim block 1 forever
    a.publish(store(9, blocks(100, 1)))
    await until(lambda: f.index.match(keys(blocks(100, 1))) == {"pod-a": 1})
    assert f.index.match(keys(blocks(0, 1))) == {"pod-b": 1}  # a's dropped, b's untouched
    assert errors("sequence_gap") == gaps + 1 and f.sub.healthy("pod-a")


async def test_a_gap_is_filled_from_the_engines_replay_socket(
        fleet: Callable[..., Fleet]) -> None:
    f = fleet([])
    await f.sub.start(f.ds)
    pub = f.engine("127.0.0.1", replay=True)
    f.ds.set_endpoints([Endpoint("pod-a", "127.0.0.1", 8000,
                                 {REPLAY_PORT_LABEL: str(pub.replay_port)})])
    pub.publish(store(1, blocks(0, 1)))  # before our subscription arrives: replay buffer only
    await f.joined(pub, "pod-a")  # its first batch seen live asks the replay for 0..
    assert f.index.match(keys(blocks(0, 1))) == {"pod-a": 1}
    pub.publish(store(2, blocks(4, 1), parent=1))
    pub.drop_next = 1
    pub.publish(store(3, blocks(8, 1), parent=2))  # lost on the wire
    for i in range(4, 51):  # what arrives during the replay waits, then follows in order
        pub.publish(store(i, blocks(4 * (i - 1), 1), parent=i - 1))
    await until(lambda: f.index.match(keys(blocks(0, 50))) == {"pod-a": 50})
    assert f.sub.streams["pod-a"].next_seq == pub._seq


async def test_a_restarted_engine_is_cleared(fleet: Callable[..., Fleet]) -> None:
    f = fleet([Endpoint("pod-a", "10.0.0.1", 8000)])
    await f.sub.start(f.ds)
    a = f.engine("10.0.0.1")
    await f.joined(a, "pod-a")
    resets = errors("sequence_reset")
    a.publish(store(1, blocks(0, 1)))
    a.publish(store(2, blocks(4, 1)))
    await until(lambda: f.index.size == 2)
    a._seq = 0  # the engine came back with an empty cache, counting from 0 again
    a.publish(store(7, blocks(50, 1)))
    await until(lambda: f.index.match(keys(blocks(50, 1))) == {"pod-a": 1})
    assert f.index.size == 1 and f.sub.healthy("pod-a")
    assert errors("sequence_reset") == resets + 1


async def test_an_endpoint_that_leaves_is_forgotten(fleet: Callable[..., Fleet]) -> None:
    f = fleet([Endpoint("pod-a", "10.0.0.1", 8000), Endpoint("pod-b", "10.0.0.2", 8000)])
    await f.sub.start(f.ds)
    a, b = f.engine("10.0.0.1"), f.engine("10.0.0.2")
    await f.joined(a, "pod-a")
    await f.joined(b, "pod-b")
    a.publish(store(1, blocks(0, 1)))
    b.publish(store(1, blocks(0, 1)))
    await until(lambda: f.index.size == 2)
    version = f.sub.health_version
    f.ds.remove_endpoint("pod-a")
    assert "pod-a" not in f.sub.streams and not f.sub.healthy("pod-a")
    assert f.index.match(keys(blocks(0, 1))) == {"pod-b": 1}
    assert f.sub.health_version != version  # the scorer's cached view is rebuilt
    unknown = errors("unknown_publisher")
    await publish_until(a, store(2, blocks(8, 1)),
                        lambda: errors("unknown_publisher") > unknown)
    assert f.index.size == 1
    # It comes back (a new pod with that IP): unknown until a batch of its is applied.
    f.ds.upsert_endpoint(Endpoint("pod-a", "10.0.0.1", 8000))
    assert not f.sub.healthy("pod-a")
    a.publish(store(3, blocks(12, 1)))
    await until(lambda: f.sub.healthy("pod-a"))
    assert f.index.match(keys(blocks(12, 1))) == {"pod-a": 1}


async def test_a_bind_address_in_use_stops_the_start_with_a_clear_error(
        fleet: Callable[..., Fleet]) -> None:
    f = fleet([])
    await f.sub.start(f.ds)
    g = BoundKVEventsSubscriber(KVBlockIndex(), block_size=BS, bind=f.sub.bound_to or "")
    with pytest.raises(OSError, match="cannot bind kvEventsConfig.zmqEndpoint"):
        await g.start(Datastore())


async def test_a_full_backlog_during_a_catch_up_drops_and_the_stream_recovers(
        fleet: Callable[..., Fleet]) -> None:
    # The replay port has nobody behind it: each catch-up waits its whole timeout (1 s).
    f = fleet([Endpoint("pod-a", "127.0.0.1", 8000, {REPLAY_PORT_LABEL: str(free_port())})])
    await f.sub.start(f.ds)
    a = f.engine("127.0.0.1")
    await f.joined(a, "pod-a")
    f.sub.streams["pod-a"].backlog_limit = 3
    full = errors("backlog_full")
    a.drop_next = 1
    a.publish(store(1, blocks(0, 1)))  # lost: the next batch starts a catch-up
    for i in range(10):                # 3 wait for it; the rest do not fit
        a.publish(store(10 + i, blocks(100 + 4 * i, 1)))
    await until(lambda: errors("backlog_full") > full)
    # The dropped batches show as a gap with the next one that fits: rebuilt from there on.
    await publish_until(a, store(99, blocks(900, 1)),
                        lambda: f.index.match(keys(blocks(900, 1))) == {"pod-a": 1})
    assert f.sub.healthy("pod-a")


def gone_lines(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(1 for r in caplog.records
               if "(publisher_gone)" in r.getMessage() and f" {name}:" in r.getMessage())


async def test_a_publisher_that_vanishes_leaves_its_endpoint_unknown_until_it_is_back(
        fleet: Callable[..., Fleet], caplog: pytest.LogCaptureFixture) -> None:
    # Engines connect from their pods' IPs (here loopback addresses of their own).
    caplog.set_level(logging.WARNING, logger="epp.kvevents")
    f = fleet([Endpoint("pod-a", "127.0.0.2", 8000), Endpoint("pod-b", "127.0.0.3", 8000)])
    await f.sub.start(f.ds)
    a = f.engine("127.0.0.2", source="127.0.0.2")
    b = f.engine("127.0.0.3", source="127.0.0.3")
    await f.joined(a, "pod-a")
    await f.joined(b, "pod-b")
    a.publish(store(1, blocks(0, 1)))
    b.publish(store(1, blocks(0, 1)))
    await until(lambda: f.index.size == 2)
    gone, version = errors("publisher_gone"), f.sub.health_version
    await f.vanish(a)
    await until(lambda: not f.sub.healthy("pod-a"))  # scored by the approximate scorer now
    assert f.sub.health_version != version
    assert f.index.match(keys(blocks(0, 1))) == {"pod-b": 1}  # its entries went, b's stay
    assert f.sub.healthy("pod-b")
    assert errors("publisher_gone") == gone + 1 and gone_lines(caplog, "pod-a") == 1
    # The same engine connects again (a network blip: its sequence numbers go on).
    a2 = f.engine("127.0.0.2", source="127.0.0.2")
    a2._seq = a._seq
    await f.joined(a2, "pod-a")
    a2.publish(store(2, blocks(8, 1)))
    await until(lambda: f.index.match(keys(blocks(8, 1))) == {"pod-a": 1})
    assert f.index.match(keys(blocks(0, 1))) == {"pod-b": 1}  # what it held is not claimed
    assert errors("publisher_gone") == gone + 1 and gone_lines(caplog, "pod-a") == 1
    # Known again, so vanishing again is news: counted and logged again.
    await f.vanish(a2)
    await until(lambda: not f.sub.healthy("pod-a"))
    assert errors("publisher_gone") == gone + 2 and gone_lines(caplog, "pod-a") == 2


async def test_what_an_engine_sent_while_away_comes_back_from_its_replay_socket(
        fleet: Callable[..., Fleet]) -> None:
    f = fleet([], replay_port=0)
    await f.sub.start(f.ds)
    a = f.engine("127.0.0.2", source="127.0.0.2", replay=True)
    f.ds.set_endpoints([Endpoint("pod-a", "127.0.0.2", 8000,
                                 {REPLAY_PORT_LABEL: str(a.replay_port)})])
    await f.joined(a, "pod-a")
    a.publish(store(1, blocks(0, 1)))
    await until(lambda: f.index.size == 1)
    # A network blip: the engine lives on (its sequence and replay buffer), its
    # connection drops.
    a._pub.close(linger=0)
    await until(lambda: not f.sub.healthy("pod-a"))
    assert f.index.size == 0
    a._pub = a._ctx.socket(zmq.PUB)
    a.publish(store(2, blocks(4, 1), parent=1))  # nobody hears it
    a._pub.connect(f"tcp://127.0.0.2:0;127.0.0.1:{f.port}")
    # Its next batch is ahead of nothing: everything from sequence 0 is replayed first.
    await publish_until(a, store(3, blocks(8, 1), parent=2), lambda: f.sub.healthy("pod-a"))
    assert f.index.match(keys(blocks(0, 3))) == {"pod-a": 3}


async def test_an_endpoint_stays_known_while_any_connection_from_its_ip_is_open(
        fleet: Callable[..., Fleet]) -> None:
    f = fleet([Endpoint("pod-a", "127.0.0.2", 8000)])
    await f.sub.start(f.ds)
    a = f.engine("127.0.0.2", source="127.0.0.2")
    await f.joined(a, "pod-a")
    # Another connection from the pod (a second rank, or the engine's new connection
    # racing the old one's drop).
    other = f.engine("127.0.0.2", source="127.0.0.2")
    await until(lambda: f.sub.connections_from("127.0.0.2") == 2)
    a.publish(store(1, blocks(0, 1)))
    await until(lambda: f.index.size == 1)
    gone = errors("publisher_gone")
    await f.vanish(a)
    await until(lambda: f.sub.connections_from("127.0.0.2") == 1)
    assert f.sub.healthy("pod-a") and f.index.size == 1
    await f.vanish(other)
    await until(lambda: not f.sub.healthy("pod-a"))
    assert f.index.size == 0 and errors("publisher_gone") == gone + 1


async def test_a_wildcard_bind_knows_ipv4_engines_by_their_ipv4_address(
        fleet: Callable[..., Fleet]) -> None:
    # `tcp://*:port` listens on IPv6 too: IPv4 peers then show as ::ffff:a.b.c.d.
    f = fleet([Endpoint("pod-a", "127.0.0.2", 8000)], host="*")
    await f.sub.start(f.ds)
    a = f.engine("127.0.0.2", source="127.0.0.2")
    await f.joined(a, "pod-a")
    assert f.sub.connections_from("127.0.0.2") == 1
    await f.vanish(a)
    await until(lambda: not f.sub.healthy("pod-a"))


async def test_connections_from_strangers_change_nothing(fleet: Callable[..., Fleet]) -> None:
    f = fleet([Endpoint("pod-a", "127.0.0.2", 8000)])
    await f.sub.start(f.ds)
    a = f.engine("127.0.0.2", source="127.0.0.2")
    await f.joined(a, "pod-a")
    a.publish(store(1, blocks(0, 1)))
    await until(lambda: f.index.size == 1)
    gone, version = errors("publisher_gone"), f.sub.health_version
    await f.knock("127.0.0.9")  # no endpoint of the pool
    assert f.sub.healthy("pod-a") and f.index.size == 1
    assert errors("publisher_gone") == gone and f.sub.health_version == version


async def test_a_publisher_behind_another_address_is_trusted_after_a_grace(
        fleet: Callable[..., Fleet]) -> None:
    # pod-a's engine reaches us from 127.0.0.5 (a proxy, NAT), not from its IP.
    f = fleet([Endpoint("pod-a", "127.0.0.4", 8000)])
    f.sub.stale_grace = 0.2
    await f.sub.start(f.ds)
    a = f.engine("pod-a", source="127.0.0.5")
    await f.joined(a, "pod-a")
    await f.knock("127.0.0.4")  # something else on the pod connects and goes
    assert not f.sub.healthy("pod-a")  # taken for its publisher vanishing...
    await f.joined(a, "pod-a")  # ...until it still publishes after the grace
    await f.knock("127.0.0.4")  # from then on its IP's connections say nothing of it
    assert f.sub.healthy("pod-a")


async def test_peer_ip_reads_a_duplicate_and_leaves_the_connection_open() -> None:
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen()
        with socket.create_connection(lsn.getsockname(), source_address=("127.0.0.7", 0)) as c:
            conn, _ = lsn.accept()
            with conn:
                assert peer_ip(conn.fileno()) == "127.0.0.7"
                c.sendall(b"x")
                assert conn.recv(1) == b"x"  # still open: only the duplicate was closed
    a, b = socket.socketpair()  # ipc://: no peer IP
    with a, b:
        assert peer_ip(a.fileno()) is None
        b.sendall(b"y")
        assert a.recv(1) == b"y"
    assert peer_ip(-1) is None


def test_ip_spellings_compare_equal() -> None:
    assert normal_ip("::ffff:10.0.0.1") == normal_ip("10.0.0.1") == "10.0.0.1"
    assert normal_ip("[fe80::1%eth0]") == normal_ip("FE80:0::1") == "fe80::1"
    assert normal_ip("pod-a.ns.svc") is None
