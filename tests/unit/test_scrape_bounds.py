"""A model server that streams an endless `/metrics` page costs bounded memory (issue 12,
defect 5): reading stops at the limit, the buffer is dropped at once, nothing is kept."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from epp.datalayer.fasthttp import FetchError, RawHttpClient, _Proto

LIMIT = 1024 * 1024


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def write(self, data: bytes) -> None:
        pass


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_endless_body_is_cut_at_the_limit_and_dropped(chunked: bool) -> None:
    proto = _Proto(max_body=LIMIT)
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.waiter = asyncio.get_running_loop().create_future()
    if chunked:
        proto.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
    else:
        proto.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        piece = b"#" * 4095 + b"\n"
    held = 0
    for _ in range(2 * LIMIT // len(piece)):
        proto.data_received(piece)
        held = max(held, len(proto.buf) + len(proto._chunk_out))
        if transport.aborted:
            break
    assert transport.aborted
    assert held <= LIMIT + 65536 + 2 * len(piece)  # a chunked body is not held twice
    assert len(proto.buf) == 0 and len(proto._chunk_out) == 0  # dropped at once
    err = proto.waiter.exception()
    assert isinstance(err, FetchError) and err.reason == "too_large"
    assert err.__traceback__ is None  # no frame (and no buffer) kept alive by the error


async def test_a_chunk_that_would_cross_the_limit_is_refused_before_it_is_read() -> None:
    proto = _Proto(max_body=LIMIT)
    proto.connection_made(_Transport())  # type: ignore[arg-type]
    proto.waiter = asyncio.get_running_loop().create_future()
    proto.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\nxx")
    assert proto.waiter.exception().reason == "too_large"


async def test_polling_an_endless_page_keeps_memory_flat() -> None:
    """Real sockets on 127.0.0.1. With the garbage collector off, cut pages that were
    kept alive by reference cycles would show as growth (it was 400 MB after 40 polls)."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while True:
                    writer.write(b"%x\r\n%s\r\n" % (65536, b"y" * 65536))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RawHttpClient("127.0.0.1", port, max_body_bytes=LIMIT)
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        for _ in range(20):
            with pytest.raises(FetchError) as e:
                await client.get(5.0)
            assert e.value.reason == "too_large"
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
        client.close()
        server.close()
    assert current < 2 * LIMIT, current
