"""A minimal HTTP/1.1 keep-alive GET client for metrics pages, on an asyncio Protocol.

Why not aiohttp for every poll: at 100 endpoints x 20 polls/s, aiohttp's per-request
machinery (request/response objects, header multidicts, stream readers, timers, tasks)
cost more CPU than the whole budget (measured in benchmarks/bench_scrape_scale.py). A
metrics scrape is the simplest HTTP exchange there is: one fixed GET on a persistent
connection, a status line, a few headers, a body of known length. This client does only
that, in one Protocol object per endpoint, and hands back the body as text.

Handled: Content-Length and chunked bodies, `Connection: close` and HTTP/1.0 replies,
gzip/deflate bodies, TLS (via the ssl context passed in), a poll timeout covering connect
+ answer, one silent retry when a reused idle connection turns out to be closed by the
server. Everything else becomes a `FetchError` with a bounded `reason`.
"""

from __future__ import annotations

import asyncio
import errno
import ssl as _ssl
import zlib


class FetchError(Exception):
    """A poll that produced no usable body; `reason` is a bounded label value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_HEADER_END = b"\r\n\r\n"
_MAX_HEADER = 64 * 1024


class _Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Proto(asyncio.Protocol):
    """Parses one response at a time from a persistent connection."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[_Response] | None = None
        self._reset()

    def _reset(self) -> None:
        # bytes, not bytearray: a whole 45 KB answer usually arrives in one read, and
        # keeping that very object avoids two copies per poll. From the second read on
        # it becomes a bytearray that grows in place (`bytes + bytes` on every read
        # would copy the whole answer each time: quadratic, ~1 s of event loop for a
        # 16 MB page in 64 KB reads).
        self.buf: bytes | bytearray = b""
        self._chunk_pos = 0  # chunked: where the next chunk-size line starts (0 = body start)
        # (after the raw bytes already copied out are dropped, body_start is 0 too)
        self._chunk_out = bytearray()  # chunked: the body of the chunks read so far
        self.status = 0
        self.headers: dict[str, str] | None = None
        self.body_start = 0
        self.length = -1  # Content-Length; -1 = chunked or read-to-close
        self.chunked = False
        self.got_bytes = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            if self.headers is not None and self.length < 0 and not self.chunked:
                # Body delimited by connection close (HTTP/1.0 style): complete.
                self._finish(self.buf[self.body_start :])
                return
            if not self.got_bytes:
                w.set_exception(FetchError("disconnected", "connection closed before any answer"))
            else:
                w.set_exception(FetchError("truncated", "connection closed mid-answer"))

    def data_received(self, data: bytes) -> None:
        w = self.waiter
        if w is None or w.done():
            # Bytes nobody asked for: the stream is out of step, start afresh next poll.
            self.abort()
            return
        self.got_bytes = True
        buf = self.buf
        if not buf:
            self.buf = data
        elif buf.__class__ is bytearray:
            buf += data  # type: ignore[operator]
        else:
            self.buf = bytearray(buf)
            self.buf += data
        try:
            self._advance()
        except FetchError as e:
            # Stop reading at once and drop what was buffered. Without its traceback the
            # error holds no frame that holds the buffer: the future, the error and this
            # protocol formed a cycle that kept every cut 16 MB page alive until a full
            # garbage collection (400-860 MB RSS after 40 polls of an endless page).
            self.abort()
            self._reset()
            if not w.done():
                w.set_exception(e.with_traceback(None))

    # -- parsing -----------------------------------------------------------------------

    def _advance(self) -> None:
        buf = self.buf
        if self.headers is None:
            end = buf.find(_HEADER_END)
            if end < 0:
                if len(buf) > _MAX_HEADER:
                    raise FetchError("invalid_content", "response header too large")
                return
            self._parse_head(buf[:end])
            self.body_start = end + 4
        if self.chunked:
            body = self._dechunk()
            if body is not None:
                self._finish(body)
            elif len(self.buf) - self.body_start > self.max_body + 65536:
                raise FetchError("too_large", f"over {self.max_body} bytes")
        elif self.length >= 0:
            if len(buf) - self.body_start >= self.length:
                start = self.body_start
                end = start + self.length
                self._finish(buf if start == 0 and end == len(buf) else buf[start:end])
        elif len(buf) - self.body_start > self.max_body:
            raise FetchError("too_large", f"over {self.max_body} bytes")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise FetchError("invalid_content", f"not an HTTP response: {lines[0][:60]!r}")
        try:
            self.status = int(parts[1])
        except ValueError:
            raise FetchError("invalid_content", f"bad status line {lines[0][:60]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        self.headers = headers
        if parts[0] == "HTTP/1.0" or headers.get("connection", "").lower() == "close":
            headers["connection"] = "close"
        te = headers.get("transfer-encoding", "").lower()
        if "chunked" in te:
            self.chunked = True
        elif "content-length" in headers:
            try:
                self.length = int(headers["content-length"])
            except ValueError:
                raise FetchError("invalid_content", "bad Content-Length") from None
            if self.length < 0:
                raise FetchError("invalid_content", "bad Content-Length")
            if self.length > self.max_body:
                raise FetchError("too_large", f"{self.length} bytes")
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.length = 0
        else:
            headers["connection"] = "close"  # read to close

    def _dechunk(self) -> bytes | None:
        """The whole body once the last chunk has arrived, else None.

        Resumes after the last complete chunk of earlier reads, so that an answer of many
        reads costs one pass over it, not one per read; the raw bytes of the chunks
        already copied out are dropped, so a body is held once, not twice, and a chunk
        that would cross the limit is refused before it is read."""
        buf = self.buf
        pos = self._chunk_pos or self.body_start
        out = self._chunk_out
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > 1024:
                    raise FetchError("invalid_content", "chunk size line too long")
                break
            size_field = buf[pos:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise FetchError("invalid_content", "bad chunk size") from None
            if size < 0 or len(out) + size > self.max_body:
                raise FetchError("too_large", f"over {self.max_body} bytes")
            if size == 0:
                # Optional trailers, then an empty line.
                if buf[eol + 2 : eol + 4] == b"\r\n" or buf.find(_HEADER_END, eol) >= 0:
                    return bytes(out)
                break
            start = eol + 2
            if len(buf) < start + size + 2:
                break
            out += buf[start : start + size]
            pos = start + size + 2
        if pos > 65536 and buf.__class__ is bytearray:
            del buf[:pos]  # drop the chunks already copied out (in place, O(1) in CPython)
            self.body_start = pos = 0
        self._chunk_pos = pos
        return None

    def _finish(self, body: bytes) -> None:
        w = self.waiter
        assert self.headers is not None
        resp = _Response(self.status, self.headers, body)
        if self.headers.get("connection") == "close":
            self.abort()
        self._reset()
        if w is not None and not w.done():
            w.set_result(resp)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class RawHttpClient:
    """GETs one URL over one persistent connection; `await get(timeout)` -> body text."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/metrics",
        *,
        ssl: _ssl.SSLContext | bool | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl or None
        self.max_body = max_body_bytes
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: text/plain\r\n"
            f"Accept-Encoding: identity\r\nUser-Agent: epp-scraper\r\n\r\n"
        ).encode("latin-1")
        self._proto: _Proto | None = None

    def close(self) -> None:
        if self._proto is not None:
            self._proto.abort()
            self._proto = None

    async def get(self, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reused = self._proto is not None and not self._proto.closed
        try:
            resp = await self._exchange(loop, deadline)
        except FetchError as e:
            if not (reused and e.reason == "disconnected"):
                raise
            # The server closed our idle keep-alive connection: one retry on a new one.
            resp = await self._exchange(loop, deadline)
        return self._body_text(resp)

    async def _exchange(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Response:
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connect(loop, deadline)
        fut: asyncio.Future[_Response] = loop.create_future()
        proto.waiter = fut
        timer = loop.call_at(deadline, _expire, fut)
        try:
            assert proto.transport is not None
            proto.transport.write(self._request)
            return await fut
        except FetchError:
            self.close()
            raise
        except BaseException:
            # Cancelled mid-exchange (endpoint removed, scraper stopping): never reuse.
            self.close()
            raise
        finally:
            timer.cancel()
            proto.waiter = None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Proto:
        max_body = self.max_body
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Proto(max_body), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                ),
                max(0.0, deadline - loop.time()),
            )
        except (asyncio.TimeoutError, TimeoutError):
            raise FetchError("timeout", "connect timed out") from None
        except ConnectionRefusedError as e:
            raise FetchError("connection_refused", str(e)) from None
        except _ssl.SSLError as e:
            raise FetchError("connect", f"TLS: {e}") from None
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                raise FetchError("connection_refused", str(e)) from None
            raise FetchError("connect", str(e)) from None
        self._proto = proto
        return proto

    def _body_text(self, resp: _Response) -> str:
        if resp.status != 200:
            raise FetchError("http_status", f"HTTP {resp.status}")
        h = resp.headers
        ctype = h.get("content-type", "")
        if "html" in ctype:
            raise FetchError("invalid_content", f"content type {ctype!r}")
        body = resp.body
        enc = h.get("content-encoding", "").lower()
        if enc in ("gzip", "deflate"):
            try:
                d = zlib.decompressobj(wbits=47 if enc == "gzip" else 15)
                body = d.decompress(body, self.max_body + 1)
            except zlib.error as e:
                raise FetchError("invalid_content", f"bad {enc} body: {e}") from None
            if len(body) > self.max_body:
                raise FetchError("too_large", f"over {self.max_body} bytes decompressed")
        elif enc not in ("", "identity"):
            raise FetchError("invalid_content", f"content encoding {enc!r}")
        return decode_metrics_body(body)


def decode_metrics_body(body: bytes) -> str:
    """Bytes -> text; HTML or binary junk is `invalid_content`, not a parse error."""
    head = body[:64].lstrip()
    if head[:1] == b"<":
        raise FetchError("invalid_content", "body looks like HTML/XML")
    if b"\x00" in head:
        raise FetchError("invalid_content", "binary body")
    return body.decode("utf-8", "replace")


def _expire(fut: asyncio.Future[_Response]) -> None:
    if not fut.done():
        fut.set_exception(FetchError("timeout", "no complete answer within the poll timeout"))
