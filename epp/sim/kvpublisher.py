"""The simulator's KV-cache event publisher, framed as vLLM's `ZmqEventPublisher`.

A PUB socket sends each step's events as `[topic, seq (8 bytes, big-endian), msgpack
EventBatch]`, sequence numbers from 0; the last `buffer_steps` batches are kept for a
ROUTER replay socket, which answers a request `[identity, "", start_seq]` with every
buffered batch from `start_seq` (`[identity, "", seq, payload]`) and then
`[identity, "", -1, ""]`. Everything runs on the simulator's event loop.

With `connect` the PUB socket dials out to a SUB socket that binds instead (vLLM does that
when its `endpoint` has no `*`, as llm-d deploys it); the topic then names the publisher,
`kv@<pod-ip>@<model>`. The replay socket still binds at `host`:`replay_port`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from epp.kvevents.decode import END_OF_REPLAY, encode_batch, encode_seq
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class KVEventPublisher:
    def __init__(self, host: str, port: int, replay_port: int | None, *, topic: str = "",
                 layout: str = "array", buffer_steps: int = 10_000,
                 connect: str | None = None) -> None:
        self.host = host
        self.port = port
        self.replay_port = replay_port
        self.topic = topic.encode()
        self.layout = layout
        self.connect = connect
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._ctx = zmq.asyncio.Context()
        self._pub: Any = None
        self._router: Any = None
        self._task: asyncio.Task[None] | None = None
        self.drop_next = 0
        """Tests: this many of the next batches are buffered but not sent (a lost message)."""

    def _bind(self, sock: Any, port: int) -> int:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if port == 0:
            return int(sock.bind_to_random_port(f"tcp://{host}"))
        sock.bind(f"tcp://{host}:{port}")
        return port

    def start(self) -> None:
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self._pub.setsockopt(zmq.LINGER, 0)
        if self.host != "127.0.0.1" and ":" in self.host:
            self._pub.setsockopt(zmq.IPV6, 1)
        if self.connect is not None:
            self._pub.connect(self.connect)
        else:
            self.port = self._bind(self._pub, self.port)
        if self.replay_port is not None:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self.replay_port = self._bind(self._router, self.replay_port)
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: list[Any]) -> None:
        """Send one batch (one engine step's events)."""
        seq = self._seq
        self._seq += 1
        payload = encode_batch(time.time(), events, layout=self.layout)
        self._buffer.append((seq, payload))
        if self.drop_next > 0:
            self.drop_next -= 1
            return
        try:
            self._pub.send_multipart([self.topic, encode_seq(seq), payload], zmq.NOBLOCK)
        except zmq.Again:  # no subscriber keeps up: dropped, as a PUB socket does
            pass

    def send_raw(self, frames: list[bytes]) -> None:
        """Tests: put arbitrary frames on the PUB socket (garbage)."""
        self._pub.send_multipart(frames, zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("kv events replay: ignoring a request of %d frames", len(frames))
                continue
            ident, _, start = frames
            first = int.from_bytes(start, "big", signed=True)
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._router.send_multipart([ident, b"", encode_seq(seq), payload])
            await self._router.send_multipart([ident, b"", encode_seq(END_OF_REPLAY), b""])

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for s in (self._pub, self._router):
            if s is not None:
                s.close(linger=0)
        self._ctx.term()
