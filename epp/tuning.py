"""Python runtime knobs, off by default: event loop and garbage collector.

They are environment variables, not flags, because they tune the interpreter rather than
the EPP (as GOGC does for a Go program) and upstream has no flags for them:

- `EPP_EVENT_LOOP=uvloop` runs the EPP on uvloop (optional dependency: the `uvloop` extra);
  `asyncio` (the default) is the standard loop.
- `EPP_GC_FREEZE=1` moves every object alive once the EPP serves into the permanent
  generation (`gc.freeze()`), so the collector stops rescanning the startup heap
  (modules, protobuf descriptors, plugin tables).
- `EPP_GC_THRESHOLD=N` sets the generation-0 threshold (CPython default 700): fewer,
  larger young collections.

`benchmarks/bench_extproc.py --tuning ...` measures each against the default in the same
run; benchmarks/RESULTS.md has the numbers and why they stay off by default.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

EVENT_LOOP_ENV = "EPP_EVENT_LOOP"
GC_FREEZE_ENV = "EPP_GC_FREEZE"
GC_THRESHOLD_ENV = "EPP_GC_THRESHOLD"
_LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class RuntimeTuning:
    event_loop: str = "asyncio"
    gc_freeze: bool = False
    gc_gen0_threshold: int | None = None


def tuning_from_env(env: Mapping[str, str]) -> RuntimeTuning:
    """The tuning the environment asks for; a bad value raises ValueError naming the variable."""
    loop = env.get(EVENT_LOOP_ENV, "").strip().lower() or "asyncio"
    if loop not in _LOOPS:
        raise ValueError(f"{EVENT_LOOP_ENV} must be one of {', '.join(_LOOPS)}, not {loop!r}")
    freeze_text = env.get(GC_FREEZE_ENV, "").strip().lower()
    if freeze_text not in ("", "0", "1", "true", "false"):
        raise ValueError(f"{GC_FREEZE_ENV} must be 1/true or 0/false, not {freeze_text!r}")
    threshold_text = env.get(GC_THRESHOLD_ENV, "").strip()
    threshold: int | None = None
    if threshold_text:
        try:
            threshold = int(threshold_text)
        except ValueError:
            raise ValueError(f"{GC_THRESHOLD_ENV} must be an integer, not {threshold_text!r}") from None
        if threshold < 1:
            raise ValueError(f"{GC_THRESHOLD_ENV} must be at least 1, not {threshold}")
    return RuntimeTuning(event_loop=loop, gc_freeze=freeze_text in ("1", "true"),
                         gc_gen0_threshold=threshold)


def loop_factory(t: RuntimeTuning) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event-loop factory for asyncio.Runner (None: the standard loop)."""
    if t.event_loop != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise ValueError(f"{EVENT_LOOP_ENV}=uvloop but uvloop is not installed "
                         "(pip install 'epp[uvloop]')") from None
    return uvloop.new_event_loop


def apply_before_start(t: RuntimeTuning) -> None:
    if t.gc_gen0_threshold is not None:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(t.gc_gen0_threshold, gen1, gen2)
    if t != RuntimeTuning():
        log.info("runtime tuning: event loop %s, gc.freeze after start %s, gc thresholds %s",
                 t.event_loop, "on" if t.gc_freeze else "off", gc.get_threshold())


def after_start(t: RuntimeTuning) -> None:
    """Called once the EPP serves: the startup heap is what a freeze should keep."""
    if t.gc_freeze:
        gc.collect()
        gc.freeze()
        log.info("gc.freeze(): %d objects moved to the permanent generation",
                 gc.get_freeze_count())
