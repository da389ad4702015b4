"""Runtime tuning from the environment (epp/tuning.py): off unless asked for, and a bad
value is refused with the variable's name instead of being ignored."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from epp.tuning import RuntimeTuning, after_start, apply_before_start, loop_factory, tuning_from_env


def test_nothing_set_means_the_standard_runtime() -> None:
    t = tuning_from_env({})
    assert t == RuntimeTuning()
    assert loop_factory(t) is None


def test_each_knob_is_read() -> None:
    t = tuning_from_env({"EPP_EVENT_LOOP": "uvloop", "EPP_GC_FREEZE": "1",
                         "EPP_GC_THRESHOLD": "50000"})
    assert t == RuntimeTuning(event_loop="uvloop", gc_freeze=True, gc_gen0_threshold=50000)
    assert tuning_from_env({"EPP_GC_FREEZE": "false"}).gc_freeze is False


@pytest.mark.parametrize("env, name", [
    ({"EPP_EVENT_LOOP": "trio"}, "EPP_EVENT_LOOP"),
    ({"EPP_GC_FREEZE": "yes please"}, "EPP_GC_FREEZE"),
    ({"EPP_GC_THRESHOLD": "many"}, "EPP_GC_THRESHOLD"),
    ({"EPP_GC_THRESHOLD": "0"}, "EPP_GC_THRESHOLD"),
])
def test_bad_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        tuning_from_env(env)


def test_uvloop_factory_makes_a_uvloop_loop() -> None:
    uvloop = pytest.importorskip("uvloop")
    factory = loop_factory(RuntimeTuning(event_loop="uvloop"))
    assert factory is not None
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_threshold_and_freeze_change_the_collector() -> None:
    before = gc.get_threshold()
    try:
        apply_before_start(RuntimeTuning(gc_gen0_threshold=12345))
        assert gc.get_threshold() == (12345, before[1], before[2])
        after_start(RuntimeTuning(gc_freeze=True))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_epp_refuses_a_bad_setting_at_start() -> None:
    out = subprocess.run([sys.executable, "-m", "epp", "--endpoints", "127.0.0.1:1"],
                         env={"EPP_EVENT_LOOP": "trio", "PATH": ""}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "EPP_EVENT_LOOP" in out.stderr
