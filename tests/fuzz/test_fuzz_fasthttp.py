"""Property tests of the metrics HTTP client's response parser: however the answer is
split into reads, the same body; whatever the bytes, a body or a FetchError."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from epp.datalayer.fasthttp import FetchError, _Proto

LIMIT = 4096


class _Transport:
    def abort(self) -> None:
        pass


def feed(reads: list[bytes], close: bool) -> bytes | FetchError | None:
    """Bytes in, as the event loop would deliver them; the body, the error, or None (waiting)."""

    async def go() -> bytes | FetchError | None:
        proto = _Proto(max_body=LIMIT)
        proto.connection_made(_Transport())  # type: ignore[arg-type]
        fut = proto.waiter = asyncio.get_running_loop().create_future()
        for r in reads:
            if fut.done():
                break
            proto.data_received(r)
        if close and not fut.done():
            proto.connection_lost(None)
        if not fut.done():
            return None
        e = fut.exception()
        if e is not None:
            assert isinstance(e, FetchError), e
            return e
        return bytes(fut.result().body)

    return asyncio.run(go())


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    body = draw(st.binary(max_size=2 * LIMIT))
    kind = draw(st.sampled_from(["length", "chunked", "close"]))
    if kind == "length":
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        wire = head + body
    elif kind == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        wire = b"HTTP/1.0 200 OK\r\n\r\n" + body
    return body, wire


@given(answers(), st.data())
def test_an_answer_split_anyhow_gives_its_body_or_too_large(answer, data) -> None:
    body, wire = answer
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    reads = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)]) if b > a]
    got = feed(reads, close=True)
    if len(body) > LIMIT:
        assert isinstance(got, FetchError) and got.reason == "too_large"
    else:
        assert got == body


@given(st.lists(st.binary(max_size=300), max_size=6), st.booleans())
def test_arbitrary_bytes_give_a_body_or_a_fetch_error(reads, close) -> None:
    got = feed(reads, close)
    if isinstance(got, bytes):
        assert len(got) <= LIMIT
