"""`epp` console script: run the EPP, or `epp envoy-config` to print an Envoy config."""

from __future__ import annotations

import asyncio
import logging
import sys

from epp.settings import parse_settings


def _setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity >= 4 else logging.INFO if verbosity >= 0 else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "envoy-config":
        from epp.envoyconfig import main as envoy_config_main

        return envoy_config_main(argv[1:])
    settings = parse_settings(argv)
    _setup_logging(settings.verbosity)
    from epp.app import serve

    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0
