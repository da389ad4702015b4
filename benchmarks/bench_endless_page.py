"""RSS of the EPP's metrics client polling a model server whose /metrics never ends.

    .venv/bin/python benchmarks/bench_endless_page.py --polls 40

A separate process (this file with `--serve`) streams an endless page, Content-Length-less
(read to close) or chunked; the client (`fasthttp.RawHttpClient`, 16 MiB limit) polls it
`--polls` times. Reported: this process's RSS before and after, its peak, and ms per poll.
Before issue 12's fix every cut page stayed alive until a full garbage collection (an
error-traceback cycle): 399 MB (read to close) and 862 MB (chunked) after 40 polls.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import threading
import time


def serve(mode: str) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    print(s.getsockname()[1], flush=True)

    def one(c: socket.socket) -> None:
        try:
            while True:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    d = c.recv(4096)
                    if not d:
                        return
                    buf += d
                if mode == "chunked":
                    c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    piece = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
                else:
                    c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    piece = b"#" + b"x" * 65534 + b"\n"
                while True:
                    c.sendall(piece)
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


async def poll(mode: str, polls: int) -> None:
    from epp.datalayer.fasthttp import FetchError, RawHttpClient

    p = subprocess.Popen([sys.executable, __file__, "--serve", mode], stdout=subprocess.PIPE)
    try:
        port = int(p.stdout.readline())  # type: ignore[union-attr]
        client = RawHttpClient("127.0.0.1", port)
        before = rss_mb()
        t0 = time.perf_counter()
        reasons: dict[str, int] = {}
        for _ in range(polls):
            try:
                await client.get(10.0)
            except FetchError as e:
                reasons[e.reason] = reasons.get(e.reason, 0) + 1
        per_poll = (time.perf_counter() - t0) / polls * 1000
        client.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(f"{mode:8} {polls} polls: {reasons}; RSS {before} -> {rss_mb()} MB "
              f"(peak {peak} MB); {per_poll:.0f} ms a poll")
    finally:
        p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--polls", type=int, default=40)
    ap.add_argument("--mode", choices=["close", "chunked"], default=None)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    for mode in [args.mode] if args.mode else ["close", "chunked"]:
        # each mode in its own process: the peak RSS is per process
        if args.mode is None:
            subprocess.run([sys.executable, __file__, "--mode", mode, "--polls", str(args.polls)],
                           check=True)
        else:
            asyncio.run(poll(mode, args.polls))


if __name__ == "__main__":
    main()
