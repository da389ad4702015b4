"""Bound event intake: the EPP binds one SUB socket and every engine's PUB connects to it.

This is how llm-d deploys KV-cache events (its `precise-prefix-cache-scorer`, parameter
`kvEventsConfig.zmqEndpoint`, default in llm-d-kv-cache-manager `tcp://*:5557`, with
`topicFilter` `kv@`): vLLM runs with `--kv-events-config '{"enable_kv_cache_events": true,
"publisher": "zmq", "endpoint": "tcp://<epp-service>:5557", "topic": "kv@$POD_IP@<model>"}'`
(an endpoint without `*` makes vLLM's publisher connect instead of bind). One socket then
carries every engine's messages, so the topic is what says whose they are: its middle
part (`kv@<id>@<model>`, split at the first two `@`) names the publisher, and is matched
to an endpoint of the pool by, in order, the endpoint's name, its `ip:port`, or its IP
when no other endpoint has that IP (several target ports of one pod share an IP: such a
publisher is ambiguous unless it names the endpoint or `ip:port`).

Each endpoint keeps its own sequence state in a `PublisherStream`, which is an
`EndpointStream` (`subscriber.py`) without a socket: the same `receive` (ordering, gap,
restart), the same catch-up (replay from `<pod-ip>:<replay port>` when one is configured,
else its entries are dropped and rebuilt from live events), the same apply. While one
endpoint catches up, its later messages wait in a bounded backlog; the others go on.

Health: an endpoint is known once a batch from it has been applied since it joined the
pool, stays known through a restart (its sequence numbers start over: its entries are
cleared, as for `AllBlocksCleared`), and its entries go when it leaves the pool.

A publisher that vanishes while its pod stays in the pool: the socket's monitor reports
each accepted and each dropped connection with its file descriptor, whose peer address
(`getpeername` on a duplicate of it) says which IP it came from; open connections are
counted per peer IP. When the last one from an IP drops, every endpoint at that IP (matched
as the topics are, after normalising the address: `::ffff:10.0.0.1` is `10.0.0.1`) is
"unknown" (its score is the approximate scorer's), its entries are dropped (events it sent
meanwhile may be lost), and it is counted as `publisher_gone` and logged once. Messages of
its that were queued before the drop are ignored; once a connection from its IP is open
again, its next batch makes it known (a catch-up from sequence 0, as for a new publisher).
Counting per IP keeps an endpoint known while any of its connections is open (DP ranks, a
reconnect that races the old connection's drop). Limits: endpoints that share an IP (one
pod, several target ports) vanish together only, when all their connections are gone;
peers that are no endpoint's IP are counted but change nothing; `ipc://` has no peer IP, so
there a vanished publisher is not noticed (its entries stay until it leaves the pool or
restarts). This assumes an engine connects from its pod's IP (llm-d's topic `kv@$POD_IP@`
says so); one that publishes, `STALE_GRACE` after its IP's last connection dropped, with
no connection from that IP open, reaches us through another address (a proxy, NAT): it is
logged once and its IP's connections are no longer watched for it.

Faults of the shared socket are counted in `inference_extension_kv_events_errors_total`
under bounded reasons (`bad_topic`, `unknown_publisher`, `ambiguous_publisher`,
`backlog_full`, and the streams' own, such as `publisher_gone`) and logged at most once
per reason every 5 s (per endpoint, for its stream's); a topic is never a label value.
`unknown_publisher` also counts, briefly, an engine that publishes before the pool lists it
(the EPP starting, a pod becoming ready).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections import deque
from typing import Any, Iterable

import zmq
from zmq.utils.monitor import parse_monitor_message

from epp import observability as obs
from epp.datastore import Endpoint, departed, host_port
from epp.kvevents.index import KVBlockIndex
from epp.kvevents.subscriber import (
    HEARTBEAT_MS,
    RECV_HWM,
    REPLAY_PORT_LABEL,
    SLICE_SECONDS,
    ZMQ_EVENTS,
    ZMQ_NOBLOCK,
    ZMQ_POLLIN,
    EndpointStream,
    KVEventsSubscriber,
    StreamAddress,
    replay_address,
)
from epp.labels import for_log
from epp.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://*:5557"
DEFAULT_TOPIC_FILTER = "kv@"
BACKLOG_LIMIT = 10_000
"""Messages of one endpoint kept while it catches up (at 2,000 batches/s, 5 s)."""
MAX_MESSAGE_BYTES = 64 << 20
"""Largest message frame accepted; an engine step's batch is far smaller."""
STALE_GRACE = 10.0
"""Seconds after an IP's last connection dropped during which its endpoints' messages are
taken to have been queued before the drop (and ignored); a message later than that, with
still no connection from the IP, comes through another address."""
_TOPIC_CACHE = 4096
_AMBIGUOUS = ""


def normal_ip(address: str) -> str | None:
    """An IP address in one spelling (`[::1]` is `::1`, `::ffff:10.0.0.1` is `10.0.0.1`, a
    zone dropped), so that an endpoint's address and a peer's compare; None if not an IP."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def peer_ip(fd: int) -> str | None:
    """The IP of the peer of libzmq's connection `fd`, read on a duplicate of the descriptor
    (closed again; the original is libzmq's); None for a socket without one (`ipc://`) or a
    descriptor already closed."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    with s:
        if s.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        try:
            host = s.getpeername()[0]
        except OSError:
            return None
    return normal_ip(host)


class PublisherStream(EndpointStream):
    """One endpoint's sequence state behind the shared socket (see the module docstring).

    `deliver` takes its messages; a gap starts the inherited catch-up task, after which
    `_on_readable` (the hook `EndpointStream` calls when a catch-up ends) applies what
    arrived meanwhile."""

    def __init__(self, ctx: zmq.Context[Any], name: str, replay: str | None,
                 index: KVBlockIndex, *, block_size: int, replay_timeout: float = 0.5) -> None:
        super().__init__(ctx, name, StreamAddress("", replay), index, block_size=block_size,
                         replay_timeout=replay_timeout)
        self.backlog: deque[list[bytes]] = deque()
        self.backlog_limit = BACKLOG_LIMIT
        self.away = False
        """The last connection from its IP dropped: unknown, its messages ignored, until a
        connection from that IP is open again."""
        self.away_since = 0.0
        self.stale_grace = STALE_GRACE
        self.watched = True
        """False once it published with no connection from its IP open: it connects
        through another address, so its IP's connections say nothing about it."""
        self._rejoined = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        self.backlog.clear()
        await super().stop()

    def gone(self, ip: str) -> None:
        """The last connection from the endpoint's IP dropped: its publisher vanished, and
        what it sent may be lost. Unknown (approximate scoring), no entries, until it is
        back; counted as `publisher_gone`, logged once until it is known again."""
        if self.away or not self.watched:
            return
        assert self._loop is not None
        self.away = True
        self.away_since = self._loop.time()
        if self._task is not None:
            self._task.cancel()  # a replay from a pod that is gone
            self._task = None
        self.backlog.clear()
        self.index.clear(self.name)
        self.next_seq = self.live_high = None
        self.batches = 0
        self.faults.report("publisher_gone", f"no connection from {ip} is open any more; "
                                             f"unknown until it connects and publishes again")
        self.connected = False

    def back(self) -> None:
        """A connection from its IP is open again: its next batch makes it known."""
        if self.away:
            self.away = False
            self._rejoined = True

    def _known(self) -> None:
        """Its first batch since it joined the pool or came back is in the index."""
        self.connected = True
        if self._rejoined:
            self._rejoined = False
            self.faults.recovered()  # a fault (vanishing too) that comes back is logged again

    def deliver(self, frames: list[bytes]) -> None:
        """One message from the shared socket whose topic names this endpoint."""
        if self.away:
            assert self._loop is not None
            if self._loop.time() - self.away_since < self.stale_grace:
                return  # queued before its connection dropped
            self.watched = False
            self.back()
            log.warning("kv events from %s: published with no connection from its IP open; "
                        "it connects through another address (a proxy, NAT?), so a vanished "
                        "publisher is not noticed for it", self.name)
        if self._task is not None or self.backlog:
            if len(self.backlog) >= self.backlog_limit:
                # Lost: the sequence numbers show the gap once the backlog is applied.
                self.faults.report("backlog_full", f"more than {self.backlog_limit} messages "
                                                   f"arrived during a catch-up; dropped")
                return
            self.backlog.append(frames)
            return
        self._take(frames)

    def _take(self, frames: list[bytes]) -> None:
        gap = self.receive(frames)
        if gap is not None:
            assert self._loop is not None
            self._task = self._loop.create_task(self._catch_up_then_read(*gap))
        elif not self._connected and self.batches:
            self._known()

    def _on_readable(self) -> None:
        """A catch-up ended (or a slice of backlog did): apply the backlog, in order."""
        if self.away:
            return
        if self._task is None and not self._connected and self.batches:
            self._known()
        clock = time.perf_counter
        until = clock() + SLICE_SECONDS
        backlog = self.backlog
        while backlog and self._task is None:
            self._take(backlog.popleft())
            if clock() > until and backlog:
                assert self._loop is not None
                self._loop.call_soon(self._on_readable)
                return


class BoundKVEventsSubscriber(KVEventsSubscriber):
    """One bound SUB socket for the whole pool, demultiplexed by topic into a
    `PublisherStream` per endpoint; see the module docstring."""

    def __init__(self, index: KVBlockIndex, *, block_size: int, bind: str = DEFAULT_BIND,
                 topic_filter: str = DEFAULT_TOPIC_FILTER, replay_port: int = 0,
                 replay_timeout: float = 0.5) -> None:
        super().__init__(index, block_size=block_size, replay_port=replay_port,
                         replay_timeout=replay_timeout)
        self.bind = bind
        self.topic_filter = topic_filter
        self.streams: dict[str, PublisherStream] = {}  # type: ignore[assignment]
        self._datastore: Any = None
        self._ids: dict[str, str] = {}
        """Publisher id (endpoint name, ip:port, ip) -> endpoint name; _AMBIGUOUS for an IP
        shared by several endpoints."""
        self._by_topic: dict[bytes, PublisherStream] = {}
        self._at_ip: dict[str, list[str]] = {}
        """Normalised IP -> names of the endpoints there (with a stream)."""
        self._peer_of_fd: dict[int, str] = {}
        """Open connection (its descriptor) -> the peer's normalised IP: any peer, since the
        pool may list it later."""
        self.stale_grace = STALE_GRACE
        self._sock: Any = None
        self._mon: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ratelog = RateLimitedLog(log)
        self.bound_to: str | None = None
        """The address really bound (a `*` port resolved), once started."""

    async def start(self, datastore: Any) -> None:
        self._datastore = datastore  # the pool's owner: topics are matched to its endpoints
        await super().start(datastore)
        assert self._ctx is not None
        self._loop = asyncio.get_running_loop()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, RECV_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter.encode())
        # ZMTP heartbeats: a peer whose host vanished has its connection (and pipe) closed.
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        sock.setsockopt(zmq.IPV6, 1)  # `*` takes IPv6 peers too (IPv4 only where there is none)
        # The port is open to the cluster: a peer sending more than any engine batch is cut off.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # Accepted and dropped connections, with their descriptors: a vanished publisher.
        # Watched before the bind, so that no engine's connection is missed.
        monitor = f"inproc://epp-kv-events-monitor-{id(self)}"
        sock.monitor(monitor, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        mon = self._ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.RCVHWM, 0)  # none dropped: a lost ACCEPTED would undercount an IP
        mon.setsockopt(zmq.LINGER, 0)
        mon.connect(monitor)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as e:
            sock.disable_monitor()
            mon.close(linger=0)
            sock.close(linger=0)
            await self.stop()
            # OSError: the EPP's start reports it in one line ("cannot start"), as for its
            # own ports (epp/server/ports.py).
            raise OSError(e.errno, f"kv events: cannot bind kvEventsConfig.zmqEndpoint "
                                   f"{self.bind!r}: {e}") from None
        self._sock = sock
        self._mon = mon
        self.bound_to = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("kv events: engines publish to %s (bound; topic filter %r)",
                 self.bound_to, self.topic_filter)
        self._loop.add_reader(mon.FD, self._on_monitor_readable)
        self._loop.add_reader(sock.FD, self._on_readable)
        # The FD wakes us for commands too; reading now lets libzmq attach early peers and
        # send them our subscription (tests/sim/test_kv_events.py says why that matters).
        self._loop.call_soon(self._on_readable)
        self._loop.call_soon(self._on_monitor_readable)  # likewise: its FD is edge-triggered

    async def stop(self) -> None:
        sock, self._sock = self._sock, None
        mon, self._mon = self._mon, None
        if sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(sock.FD)
            loop.remove_reader(mon.FD)
            sock.disable_monitor()
            mon.close(linger=0)
            sock.close(linger=0)
        self._peer_of_fd.clear()
        await super().stop()

    def connections_from(self, ip: str) -> int:
        """Connections open from `ip` (as far as the monitor has told)."""
        n = normal_ip(ip)
        return self._open_from(n) if n is not None else 0

    def _open_from(self, ip: str) -> int:
        # Counted when asked: connections come and go rarely, and one map stays the truth.
        return sum(1 for peer in self._peer_of_fd.values() if peer == ip)

    # -- the pool ------------------------------------------------------------------

    def on_endpoints_changed(self, added: Iterable[Endpoint], removed: Iterable[Endpoint]) -> None:
        """Datastore listener: a stream per endpoint; a moved endpoint (new address) is a
        new publisher and starts over."""
        added = list(added)
        removed = list(removed)
        gone = set(departed(added, removed))
        for e in removed:
            if e.name in gone and e.name in self.streams:
                self._drop(e.name)
        for e in added:
            try:
                replay = replay_address(e, self.replay_port)
            except ValueError:
                obs.KV_EVENTS_ERRORS.labels("bad_address").inc()
                log.warning("kv events: endpoint %s has an unusable %s label", e.name,
                            REPLAY_PORT_LABEL)
                if e.name in self.streams:
                    self._drop(e.name)
                continue
            s = self.streams.get(e.name)
            if s is not None:
                if s.address.replay != replay:
                    s.address = StreamAddress("", replay)
                continue
            assert self._ctx is not None
            s = PublisherStream(self._ctx, e.name, replay, self.index,
                                block_size=self.block_size, replay_timeout=self.replay_timeout)
            s.stale_grace = self.stale_grace
            self._add(s)
        self._reindex()

    def _reindex(self) -> None:
        """Publisher ids of the pool's endpoints that have a stream (the datastore has
        already applied the change its listeners are told of)."""
        pool = [e for e in self._datastore.endpoints() if e.name in self.streams]
        ids: dict[str, str] = {}
        for e in pool:
            ip = e.address.strip("[]")
            ids[ip] = _AMBIGUOUS if ip in ids else e.name
        for e in pool:
            ids[host_port(e.address.strip("[]"), e.port)] = e.name
        for e in pool:
            ids[e.name] = e.name
        self._ids = ids
        self._by_topic = {}
        at_ip: dict[str, list[str]] = {}
        for e in pool:
            n = normal_ip(e.address)
            if n is not None:
                at_ip.setdefault(n, []).append(e.name)
        self._at_ip = at_ip

    # -- the socket ----------------------------------------------------------------

    def _on_monitor_readable(self) -> None:
        """Connections accepted and dropped, each noted with its peer IP. An IP that had some
        before what was queued and has none after takes its endpoints' publishers with it;
        judged over the whole queue, because the descriptor of a connection that came and
        went before we looked may already be the next connection's (read as its IP: +1 -1)."""
        mon = self._mon
        if mon is None:
            return
        before: dict[str, int] = {}
        while mon.getsockopt(ZMQ_EVENTS) & ZMQ_POLLIN:
            try:
                frames = mon.recv_multipart(ZMQ_NOBLOCK)
            except zmq.Again:
                break
            ev = parse_monitor_message(frames)
            fd = int(ev["value"])
            if ev["event"] == zmq.EVENT_ACCEPTED:
                ip = peer_ip(fd)
                if ip is None:
                    continue  # ipc://, or gone already (its DISCONNECTED is ignored too)
                before.setdefault(ip, self._open_from(ip))
                self._peer_of_fd[fd] = ip
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                ip = self._peer_of_fd.get(fd)
                if ip is None:
                    continue
                before.setdefault(ip, self._open_from(ip))
                del self._peer_of_fd[fd]
        for ip, had in before.items():
            names = self._at_ip.get(ip)
            if not names:
                continue  # not an endpoint of the pool
            now = self._open_from(ip)
            for name in names:
                s = self.streams.get(name)
                if s is None:
                    continue
                if now:
                    s.back()
                elif had:
                    s.gone(ip)

    def _on_readable(self) -> None:
        """Take what is queued, ~1 ms at a time, each message to its endpoint's stream."""
        sock = self._sock
        if sock is None:
            return
        clock = time.perf_counter
        until = clock() + SLICE_SECONDS
        by_topic = self._by_topic
        while sock.getsockopt(ZMQ_EVENTS) & ZMQ_POLLIN:
            try:
                frames = sock.recv_multipart(ZMQ_NOBLOCK)
            except zmq.Again:
                break
            s = by_topic.get(frames[0])
            if s is None:
                s = self._resolve(frames[0])
            if s is not None:
                if s.away:
                    # Has it connected again? (Its ACCEPTED may be queued still: a message
                    # is never read before it, so this is the one place to look.)
                    self._on_monitor_readable()
                try:
                    s.deliver(frames)
                except Exception:  # a bug must not take the EPP down: this endpoint goes unknown
                    log.exception("kv events from %s: intake failed", s.name)
                    s.connected = False
            if clock() > until:
                assert self._loop is not None
                self._loop.call_soon(self._on_readable)  # the FD will not fire again
                return

    def _resolve(self, topic: bytes) -> PublisherStream | None:
        """The stream a topic names, or None (counted, logged rate-limited)."""
        parts = topic.decode("utf-8", "replace").split("@", 2)
        if len(parts) != 3 or not parts[1]:
            return self._fault("bad_topic", "a message's topic is not kv@<pod-ip>@<model>: %s",
                               topic)
        pid = parts[1].strip()
        name = self._ids.get(pid)
        if name is None and pid.startswith("["):  # "[v6]" alone
            name = self._ids.get(pid.strip("[]"))
        if name is None:
            return self._fault("unknown_publisher", "events from a publisher that is not an "
                               "endpoint of the pool (topic %s); ignored", topic)
        if name == _AMBIGUOUS:
            return self._fault("ambiguous_publisher", "topic %s names an IP that several "
                               "endpoints share; name the endpoint or ip:port in the topic",
                               topic)
        s = self.streams[name]
        if len(self._by_topic) >= _TOPIC_CACHE:
            self._by_topic.clear()
        self._by_topic[topic] = s
        return s

    def _fault(self, reason: str, msg: str, topic: bytes) -> None:
        obs.KV_EVENTS_ERRORS.labels(reason).inc()
        self._ratelog(reason, logging.WARNING, "kv events: " + msg,
                      for_log(topic.decode("utf-8", "replace")))
        return None
