"""`epp` console script: run the EPP, or `epp envoy-config` to print an Envoy config."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from epp.settings import parse_settings
from epp.telemetry.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "envoy-config":
        from epp.envoyconfig import main as envoy_config_main

        return envoy_config_main(argv[1:])
    settings = parse_settings(argv)
    setup_logging(settings.verbosity, settings.log_format)
    from epp import tuning
    from epp.app import serve

    try:
        rt = tuning.tuning_from_env(os.environ)
        factory = tuning.loop_factory(rt)
    except ValueError as e:
        logging.getLogger("epp").error("invalid runtime tuning: %s", e)
        return 2
    tuning.apply_before_start(rt)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(serve(settings, on_started=lambda: tuning.after_start(rt)))
    except KeyboardInterrupt:
        return 0
