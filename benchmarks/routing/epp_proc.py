"""The EPP with its in-flight accounting switched off, for the ablation in the benchmark.

    python -m benchmarks.routing.epp_proc [epp flags...]

Same as `python -m epp`, except that the director gets no in-flight tracker, so the queue
scorer sees only scraped queue lengths (the scheduler's tracker stays empty). The EPP has
no flag for this (the accounting is always on), so the benchmark builds the app itself.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from epp.app import EppApp
from epp.app import serve as serve_app
from epp.settings import parse_settings


def _without_inflight(app: EppApp) -> None:
    app.director.inflight = None  # the one difference from `epp`


async def serve(argv: list[str]) -> int:
    """`epp.app.serve` without the in-flight tracker, so a start that fails the expected
    way ends as the EPP's does: one "cannot start" line and exit 2, not a traceback; the
    line keeps the OSError's "[Errno 98]", which is how the benchmark's `start_epp` tells
    a port taken (and starts again on new ports) from other faults."""
    return await serve_app(parse_settings(argv), adjust=_without_inflight)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(asyncio.run(serve(sys.argv[1:])))
