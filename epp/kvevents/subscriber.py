"""Event intake: one ZeroMQ subscription per endpoint of the pool, feeding the block index.

Each model-server engine publishes its KV-cache events on a PUB socket (vLLM
`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
"tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'`). For every endpoint the datastore
knows, an `EndpointStream` task connects a SUB socket there and applies each batch to the
`KVBlockIndex` in sequence order. It all runs as background tasks on the event loop;
the request path only reads the index and `healthy()`. (`bound.py` is the other way
round: engines connect to one socket the EPP binds; its per-endpoint streams are
`EndpointStream`s without a socket.)

Sequence numbers make the stream reliable:
- a gap (a batch missed, or one that did not decode) is filled from the engine's ROUTER
  replay socket (send `["", seq]`, receive `["", seq, payload]`... then seq -1); when
  the replay cannot fill it, the endpoint's entries are dropped and rebuilt from live events;
- a sequence number that goes backwards means the engine restarted: its entries go;
- a new subscription asks the replay socket for everything from 0, so an engine that was
  serving before the EPP started is known at once, as far as its replay buffer reaches;
- a publisher whose connection drops (the socket monitor tells) is "unknown" until it is
  back; then its entries are rebuilt (cleared, replayed from 0), whether it restarted or not.

While an endpoint is unknown its prefix score is the approximate scorer's, never "holds
nothing". Every fault is counted in `inference_extension_kv_events_errors_total{reason}`
and logged once per endpoint and reason (again after the endpoint reconnects).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from epp import observability as obs
from epp.datastore import Endpoint, host_port
from epp.tasks import cancel_and_wait
from epp.kvevents.decode import (
    END_OF_REPLAY,
    BlockStored,
    DecodeError,
    EventBatch,
    decode_batch,
    decode_message,
    decode_seq,
    encode_seq,
)
from epp.kvevents.index import ApplyResult, KVBlockIndex, NativeKVBlockIndex, native_available

log = logging.getLogger(__name__)

PORT_LABEL = "kv-events.epp/port"
"""Endpoint (pod) label overriding the events port for that endpoint."""
REPLAY_PORT_LABEL = "kv-events.epp/replay-port"
"""Endpoint (pod) label overriding the replay port; "0" means the engine has none."""
DEFAULT_PORT = 5557
DEFAULT_REPLAY_PORT = 5558
RECV_HWM = 100_000
SLICE_SECONDS = 0.001
"""Intake work between two chances for requests to run, over all endpoints together:
each stream gets an equal share (at least `MIN_SLICE_SECONDS`) before it yields."""
MIN_SLICE_SECONDS = 0.00005
HEARTBEAT_MS = 1000
# Plain ints: pyzmq's enum constants cost ~0.5 µs per `&` and getsockopt (per message).
ZMQ_EVENTS = int(zmq.EVENTS)
ZMQ_POLLIN = int(zmq.POLLIN)
ZMQ_NOBLOCK = int(zmq.NOBLOCK)


@dataclass(frozen=True, slots=True)
class StreamAddress:
    events: str
    replay: str | None


def label_port(ep: Endpoint, label: str, default: int, minimum: int = 1) -> int | None:
    """The port an endpoint's `label` names (else `default`); None when it is unusable."""
    try:
        p = int(ep.labels.get(label, default))
    except ValueError:
        return None
    return p if minimum <= p < 65536 else None


def replay_address(ep: Endpoint, replay_port: int) -> str | None:
    """`tcp://<host>:<port>` of an endpoint's replay socket, None when it has none (port
    0); ValueError when its `kv-events.epp/replay-port` label is unusable."""
    rp = label_port(ep, REPLAY_PORT_LABEL, replay_port, minimum=0)
    if rp is None:
        raise ValueError(f"unusable {REPLAY_PORT_LABEL} label")
    return f"tcp://{host_port(ep.address, rp)}" if rp else None


def stream_address(ep: Endpoint, port: int, replay_port: int) -> StreamAddress | None:
    """Where an endpoint publishes; None when its labels say something unusable."""
    p = label_port(ep, PORT_LABEL, port)
    try:
        replay = replay_address(ep, replay_port)
    except ValueError:
        return None
    return StreamAddress(f"tcp://{host_port(ep.address, p)}", replay) if p is not None else None


class _Faults:
    """Counts every fault and logs each (endpoint, reason) once until the stream recovers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._logged: set[str] = set()

    def report(self, reason: str, detail: str, n: int = 1) -> None:
        obs.KV_EVENTS_ERRORS.labels(reason).inc(n)
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("kv events from %s: %s (%s)", self.name, detail, reason)

    def recovered(self) -> None:
        self._logged.clear()


class EndpointStream:
    """One engine's event stream; see the module docstring."""

    def __init__(self, ctx: zmq.Context[Any], name: str, address: StreamAddress,
                 index: KVBlockIndex, *, block_size: int, replay_timeout: float = 0.5) -> None:
        self.name = name
        self.address = address
        self.index = index
        self.block_size = block_size
        self.replay_timeout = replay_timeout
        self._ctx = ctx
        self.slice_seconds = SLICE_SECONDS
        """This stream's share of the loop (the subscriber divides SLICE_SECONDS)."""
        self._connected = False
        self._block_size_ok = True
        self.on_health_change: Any = None
        """Called when `healthy` may have changed (the subscriber's version counter)."""
        self.on_stored: Callable[[str], None] | None = None
        """Called with the endpoint's name after a batch that stored blocks is applied
        (the precise scorer settles its speculative picks there)."""
        self.next_seq: int | None = None
        """The sequence number of the next batch to apply; None before the first."""
        self.live_high: int | None = None
        """Highest sequence number seen on the live socket (it only moves forward)."""
        self.batches = 0
        self.faults = _Faults(name)
        self._task: asyncio.Task[None] | None = None
        """A running catch-up (replay); reading waits for it."""
        self._sub: Any = None
        self._mon: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._result = ApplyResult()

    @property
    def healthy(self) -> bool:
        """The index's view of this endpoint can be trusted."""
        return self._connected and self._block_size_ok

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, v: bool) -> None:
        self._connected = v
        if self.on_health_change is not None:
            self.on_health_change()

    @property
    def block_size_ok(self) -> bool:
        return self._block_size_ok

    @block_size_ok.setter
    def block_size_ok(self, v: bool) -> None:
        self._block_size_ok = v
        if self.on_health_change is not None:
            self.on_health_change()

    def start(self) -> None:
        """Connect and read on the event loop: the sockets' file descriptors wake it (no
        task per message; measured: an asyncio poller per wake-up cost ~0.4 ms)."""
        loop = self._loop = asyncio.get_running_loop()
        sub = self._sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, RECV_HWM)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sub.setsockopt(zmq.LINGER, 0)
        # ZMTP heartbeats: a publisher whose host vanished (no TCP close) is noticed too.
        sub.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        self._mon = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        loop.add_reader(sub.FD, self._on_readable)
        loop.add_reader(self._mon.FD, self._on_monitor_readable)
        sub.connect(self.address.events)
        loop.call_soon(self._on_monitor_readable)
        loop.call_soon(self._on_readable)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._sub is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sub.FD)
            loop.remove_reader(self._mon.FD)
            self._sub.disable_monitor()
            self._mon.close(linger=0)
            self._sub.close(linger=0)
            self._sub = None

    def _on_monitor_readable(self) -> None:
        mon = self._mon
        if mon is None or mon.closed:
            return
        while mon.getsockopt(ZMQ_EVENTS) & ZMQ_POLLIN:
            try:
                frames = mon.recv_multipart(ZMQ_NOBLOCK)
            except zmq.Again:
                break
            self._on_monitor(parse_monitor_message(frames)["event"])

    def _on_readable(self) -> None:
        """Take what is queued, in slices of ~1 ms so that requests wait no longer than
        that for the loop; a gap hands over to a task that awaits the replay."""
        sub = self._sub
        if sub is None or self._task is not None:
            return  # stopped, or a catch-up is running and resumes reading when done
        clock = time.perf_counter
        until = clock() + self.slice_seconds
        try:
            while sub.getsockopt(ZMQ_EVENTS) & ZMQ_POLLIN:
                try:
                    frames = sub.recv_multipart(ZMQ_NOBLOCK)
                except zmq.Again:
                    break
                gap = self.receive(frames)
                if gap is not None:
                    self._task = self._loop.create_task(self._catch_up_then_read(*gap))
                    return
                if clock() > until:
                    self._loop.call_soon(self._on_readable)  # the FD will not fire again
                    return
        except Exception:  # a bug here must not take the EPP down; this endpoint goes unknown
            log.exception("kv events from %s: intake failed", self.name)
            self.connected = False

    async def _catch_up_then_read(self, seq: int, payload: bytes) -> None:
        try:
            await self._catch_up(seq)
            self._apply_payload(seq, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("kv events from %s: catch-up failed", self.name)
        finally:
            if self._task is asyncio.current_task():  # not a later one (bound: a reconnect)
                self._task = None
        self._on_readable()  # bound.PublisherStream: applies what arrived meanwhile

    def _on_monitor(self, event: int) -> None:
        if event == zmq.EVENT_CONNECTED:
            if not self.connected:
                # Whatever happened while away (a restart, lost batches), start over: the
                # first batch then asks the replay socket for everything from 0.
                self.index.clear(self.name)
                self.next_seq = None
                self.live_high = None
                self.faults.recovered()  # a fault that comes back is logged again
            self.connected = True
        elif event == zmq.EVENT_DISCONNECTED and self.connected:
            self.connected = False
            self.faults.report("publisher_gone", f"lost the connection to {self.address.events}")

    # -- messages ------------------------------------------------------------------

    async def on_message(self, frames: list[bytes]) -> None:
        """One live message `[topic, seq, payload]`."""
        gap = self.receive(frames)
        if gap is not None:
            await self._catch_up(gap[0])
            self._apply_payload(*gap)

    def receive(self, frames: list[bytes]) -> tuple[int, bytes] | None:
        """Apply one live message at once, or return (seq, payload) when batches before it
        are missing: the caller then catches up (awaits the replay) and applies it."""
        if len(frames) != 3:
            self.faults.report("bad_frame", f"message of {len(frames)} frames, want 3")
            return None
        try:
            seq = decode_seq(frames[1])
        except DecodeError as e:
            self.faults.report(e.reason, str(e))
            return None
        if self.live_high is not None and seq <= self.live_high:
            self.faults.report("sequence_reset", f"sequence went back from {self.live_high} "
                                                 f"to {seq}: the engine restarted")
            self.index.clear(self.name)
            self.next_seq = None
        self.live_high = seq
        nxt = self.next_seq
        if nxt is not None and seq < nxt:
            return None  # already applied from a replay
        if (nxt is None and seq > 0) or (nxt is not None and seq > nxt):
            return seq, frames[2]
        self._apply_payload(seq, frames[2])
        return None

    def _apply_payload(self, seq: int, payload: bytes) -> None:
        if self.next_seq is not None and seq < self.next_seq:
            return
        # The native index decodes and applies the common batch in one step (no Python
        # object per event); what it declines, changing nothing, is decoded here.
        got = self.index.apply_payload(self.name, payload, self.block_size)
        if got is not None:
            r = self._result
            n, r.stored, r.removed, r.orphans, r.malformed = got
            self._applied(seq, n, 0)
            return
        try:
            batch = decode_batch(seq, payload)
        except DecodeError as e:
            self.faults.report(e.reason, str(e))
            return  # next_seq stays: the next batch finds the gap and asks for a replay
        self._apply(batch)

    async def _catch_up(self, upto: int) -> None:
        """Apply batches next_seq..upto-1 from the replay socket, or start over at `upto`."""
        first = self.next_seq is None
        start = 0 if first else self.next_seq
        assert start is not None
        if upto == start:
            return
        got = await self._replay(start, upto) if self.address.replay else None
        if got:
            complete = got[0].seq == start
            if not complete:  # the replay buffer no longer reaches back to `start`
                self._lost(first, start, got[0].seq)
            self.next_seq = got[0].seq
            for b in got:
                if b.seq != self.next_seq:
                    break
                self._apply(b)
            if self.next_seq == upto:
                return
        self._lost(first, self.next_seq if self.next_seq is not None else start, upto)
        self.next_seq = upto

    def _lost(self, first: bool, start: int, upto: int) -> None:
        """Batches start..upto-1 will never be seen: start over from `upto`."""
        if first:
            # Joined a stream already under way without its full history: blocks stored
            # before are unknown to us and will not be matched (a missed hit, not a lie).
            log.info("kv events from %s: joined at sequence %d; blocks stored before are "
                     "not indexed", self.name, upto)
        else:
            self.faults.report("sequence_gap", f"batches {start}..{upto - 1} missing and not "
                                               f"replayable; rebuilding from live events")
        self.index.clear(self.name)

    async def _replay(self, start: int, upto: int) -> list[EventBatch] | None:
        """Batches start..upto-1 from the replay socket, in order; None on failure."""
        assert self.address.replay is not None
        sock = zmq.asyncio.Context.shadow(self._ctx.underlying).socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: list[EventBatch] = []
        deadline = time.monotonic() + self.replay_timeout
        try:
            sock.connect(self.address.replay)
            await sock.send_multipart([b"", encode_seq(start)])
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.faults.report("replay_timeout", f"no complete replay from "
                                                         f"{self.address.replay}")
                    return None
                frames = await asyncio.wait_for(sock.recv_multipart(), left)
                if len(frames) == 3 and frames[0] == b"":
                    frames = frames[1:]
                seq = decode_seq(frames[0]) if frames else END_OF_REPLAY
                if seq == END_OF_REPLAY:
                    return out
                if seq >= upto:
                    continue  # comes (or came) live
                out.append(decode_message(frames))
        except asyncio.TimeoutError:
            self.faults.report("replay_timeout", f"no complete replay from {self.address.replay}")
            return None
        except DecodeError as e:
            self.faults.report(e.reason, f"replay: {e}")
            return None
        finally:
            sock.close(linger=0)

    def _apply(self, batch: EventBatch) -> None:
        r = self._result
        r.stored = r.removed = r.orphans = r.malformed = 0
        events = batch.events
        bs = self.block_size
        for ev in events:
            if isinstance(ev, BlockStored) and ev.block_size != bs:
                self.faults.report("block_size_mismatch", f"engine blocks of {ev.block_size} "
                                                          f"tokens, the scorer's blockSize is {bs}")
                self.block_size_ok = False
                events = [e for e in events if not isinstance(e, BlockStored) or e.block_size == bs]
                break
        self.index.apply(self.name, events, r)
        self._applied(batch.seq, len(events), batch.unknown)

    def _applied(self, seq: int, events: int, unknown: int) -> None:
        """Batch `seq` is in the index (counts in `self._result`): move on, count, report."""
        r = self._result
        self.next_seq = seq + 1
        self.batches += 1
        if r.stored and self.on_stored is not None:
            self.on_stored(self.name)
        obs.KV_EVENTS.inc(events)
        if unknown:
            self.faults.report("unknown_event", "event of an unknown type skipped", unknown)
        if r.orphans:
            self.faults.report("unknown_parent", "stored blocks whose parent block is not "
                                                 "indexed were skipped", r.orphans)
        if r.malformed:
            self.faults.report("garbage", "malformed BlockStored (token count or ids)",
                               r.malformed)


class KVEventsSubscriber:
    """Keeps one `EndpointStream` per endpoint of the pool, and the index gauge."""

    def __init__(self, index: KVBlockIndex, *, block_size: int, port: int = DEFAULT_PORT,
                 replay_port: int = DEFAULT_REPLAY_PORT, replay_timeout: float = 0.5) -> None:
        self.index = index
        self.block_size = block_size
        self.port = port
        self.replay_port = replay_port
        self.replay_timeout = replay_timeout
        self.streams: dict[str, EndpointStream] = {}
        self._ctx: zmq.Context[Any] | None = None
        self._gauge_task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self.health_version = 0
        """Changes whenever any endpoint's health may have changed (scorers cache on it)."""
        self.on_stored: Callable[[str], None] | None = None
        """Called with an endpoint's name after a batch of its events that stored blocks
        is in the index (`EndpointStream.on_stored`)."""

    def _health_changed(self) -> None:
        self.health_version += 1

    def healthy(self, name: str) -> bool:
        s = self.streams.get(name)
        return s is not None and s.healthy

    async def start(self, datastore: Any) -> None:
        if isinstance(self.index, NativeKVBlockIndex):
            log.info("kv events: native block index (Rust)")
        else:
            log.info("kv events: pure-Python block index%s", "" if native_available()
                     else " (the native one is not built: make venv with cargo)")
        self._ctx = zmq.Context()
        datastore.add_listener(self.on_endpoints_changed)
        self.on_endpoints_changed(list(datastore.endpoints()), [])
        self._gauge_task = asyncio.get_running_loop().create_task(self._gauge())

    def on_endpoints_changed(self, added: Iterable[Endpoint], removed: Iterable[Endpoint]) -> None:
        """Datastore listener: subscribe to new endpoints, drop those that left or moved."""
        added = list(added)
        new = {e.name: e for e in added}
        for e in removed:
            s = self.streams.get(e.name)
            if s is None:
                continue
            n = new.get(e.name)
            if n is not None and stream_address(n, self.port, self.replay_port) == s.address:
                continue
            self._drop(e.name)
        for e in added:
            if e.name in self.streams:
                continue
            addr = stream_address(e, self.port, self.replay_port)
            if addr is None:
                obs.KV_EVENTS_ERRORS.labels("bad_address").inc()
                log.warning("kv events: endpoint %s has an unusable %s/%s label", e.name,
                            PORT_LABEL, REPLAY_PORT_LABEL)
                continue
            assert self._ctx is not None
            self._add(EndpointStream(self._ctx, e.name, addr, self.index,
                                     block_size=self.block_size,
                                     replay_timeout=self.replay_timeout))
        share = max(MIN_SLICE_SECONDS, SLICE_SECONDS / max(1, len(self.streams)))
        for s in self.streams.values():
            s.slice_seconds = share

    def _add(self, s: EndpointStream) -> None:
        """A new endpoint's stream: wired to the subscriber's callbacks and started."""
        self.streams[s.name] = s
        s.on_health_change = self._health_changed
        s.on_stored = self.on_stored
        self._health_changed()
        s.start()

    def _drop(self, name: str) -> None:
        s = self.streams.pop(name)
        self._health_changed()
        t = asyncio.get_running_loop().create_task(s.stop())
        self._stopping.add(t)
        t.add_done_callback(self._stopping.discard)
        self.index.forget(name)

    async def _gauge(self) -> None:
        while True:
            obs.KV_INDEX_BLOCKS.set(self.index.size)
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        await cancel_and_wait(self._gauge_task)
        self._gauge_task = None
        for s in list(self.streams.values()):
            await s.stop()
        self.streams.clear()
        for t in list(self._stopping):
            await t
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
