"""The EPP with its in-flight accounting switched off, for the ablation in the benchmark.

    python -m benchmarks.routing.epp_proc [epp flags...]

Same as `python -m epp`, except that the director gets no in-flight tracker, so the queue
scorer sees only scraped queue lengths (the scheduler's tracker stays empty). The EPP has
no flag for this (the accounting is always on), so the benchmark builds the app itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from epp.app import EppApp
from epp.settings import parse_settings


async def serve(argv: list[str]) -> int:
    """`epp.app.serve` without the in-flight tracker. A start that fails the expected way
    ends as the EPP's does: one "cannot start" line and exit 2, not a traceback; the line
    keeps the OSError's "[Errno 98]", which is how the benchmark's `start_epp` tells a
    port taken (and starts again on new ports) from other faults."""
    settings = parse_settings(argv)
    try:
        app = EppApp(settings)
    except ValueError as e:  # ConfigError, engine config errors
        print(f"cannot start: invalid configuration: {e}", file=sys.stderr, flush=True)
        return 2
    app.director.inflight = None  # the one difference from `epp`
    try:
        await app.start()
    except (ValueError, OSError) as e:  # ports in use, bad flag combinations, unreadable files
        print(f"cannot start: {e}", file=sys.stderr, flush=True)
        await app.stop(0)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop(1.0)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(serve(sys.argv[1:])))
