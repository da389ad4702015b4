"""Files rewritten while the EPP reads them: an empty or half-written file never replaces
the last good set (issue 12, defect 8)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from epp import filewatch
from epp.config import ConfigError, load_config_file
from epp.datastore import Datastore
from epp.filewatch import NotReady, read_settled
from epp.manifests import ObjectivesFileWatcher
from epp.objectives import ObjectiveStore
from epp.sources import EndpointsFileSource

TWO = """
- {name: a, address: 10.0.0.1, port: 8000}
- {name: b, address: 10.0.0.2, port: 8000}
"""
THREE = TWO + "- {name: c, address: 10.0.0.3, port: 8000}\n"

OBJECTIVE = """
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10, poolRef: {name: pool}}
"""


def names(ds: Datastore) -> set[str]:
    return {e.name for e in ds.endpoints()}


def age(path: Path, seconds: float = 5.0) -> None:
    """Make the file look written `seconds` ago (a settled file)."""
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


async def test_an_emptied_endpoints_file_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(TWO)
    age(path)
    ds = Datastore()
    src = EndpointsFileSource(ds, str(path))
    assert await src.load_once()
    path.write_text("")  # an editor's truncate, before its write
    assert not await src.load_once()
    path.write_text("  \n")
    age(path)
    assert not await src.load_once()
    assert names(ds) == {"a", "b"}
    path.write_text("[]\n")  # an empty pool is said explicitly
    age(path)
    assert await src.load_once() and names(ds) == set()


async def test_a_file_still_being_written_is_read_again_later(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(TWO)
    age(path)
    ds = Datastore()
    src = EndpointsFileSource(ds, str(path))
    await src.load_once()
    cut = THREE.index("- {name: c")
    path.write_text(THREE[:cut])  # valid YAML, one entry short: looks complete

    def writer_goes_on(seconds: float) -> None:  # the settle wait: the write continues
        with open(path, "a") as f:
            f.write(THREE[cut:])

    monkeypatch.setattr(filewatch.time, "sleep", writer_goes_on)
    assert not await src.load_once()
    assert names(ds) == {"a", "b"} and src.writing
    monkeypatch.undo()
    age(path)
    assert await src.load_once() and names(ds) == {"a", "b", "c"}


def test_a_file_that_changes_while_read_is_not_ready(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(TWO)
    age(path)
    real_open = open

    def open_then_grow(p, mode="r", *a, **kw):
        f = real_open(p, mode, *a, **kw)
        with real_open(p, "a") as g:
            g.write("# more\n")
        return f

    monkeypatch.setattr("builtins.open", open_then_grow)
    with pytest.raises(NotReady):
        read_settled(path)


async def test_rewritten_in_place_in_a_loop_the_set_is_never_partial(tmp_path: Path) -> None:
    """The issue's reproduction: a writer rewrites the file in place (truncate, then two
    writes) as fast as it can; every set the EPP applies is a whole one."""
    path = tmp_path / "endpoints.yaml"
    path.write_text(THREE)
    age(path)
    ds = Datastore()
    src = EndpointsFileSource(ds, str(path), settle=0.02)
    await src.load_once()
    applied: list[set[str]] = []
    ds.add_listener(lambda added, removed: applied.append(names(ds)))
    stop = threading.Event()
    half = len(THREE) // 2

    def rewrite() -> None:
        while not stop.is_set():
            with open(path, "w") as f:
                f.write(THREE[:half])
                f.flush()
                os.fsync(f.fileno())
                f.write(THREE[half:])

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(100):
            await src.load_once()
            src._stamp = None  # look every time, as if it changed
            assert names(ds) == {"a", "b", "c"}
            await asyncio.sleep(0)
    finally:
        stop.set()
        writer.join()
    assert applied == [] or all(a == {"a", "b", "c"} for a in applied)


async def test_an_emptied_objectives_file_keeps_the_objectives(tmp_path: Path) -> None:
    path = tmp_path / "objectives.yaml"
    path.write_text(OBJECTIVE)
    age(path)
    store = ObjectiveStore("pool")
    watcher = ObjectivesFileWatcher(str(path), store)
    watcher.load()
    path.write_text("")
    assert not await watcher.reload()
    assert len(store) == 1 and "empty" in str(watcher.last_error)


def test_an_empty_objectives_file_at_start_is_no_objectives(tmp_path: Path) -> None:
    path = tmp_path / "objectives.yaml"
    path.write_text("")
    store = ObjectiveStore("pool")
    ObjectivesFileWatcher(str(path), store).load()
    assert len(store) == 0


def test_an_empty_config_file_is_an_error_not_the_default_profile(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config_file(path)
