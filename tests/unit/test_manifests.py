"""Manifests: Kubernetes YAML -> typed objects, error reports, and the file watcher."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from epp.manifests import ManifestError, ObjectivesFileWatcher, object_from_manifest, parse_manifests
from epp.objectives import (
    InferenceModel,
    InferenceModelRewrite,
    InferenceObjective,
    ObjectiveStore,
    ObjectKey,
)

POOL = "pool-a"


def objective(name: str, priority: object, pool: str = POOL) -> str:
    return f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata:
  name: {name}
  namespace: team
spec:
  priority: {priority}
  poolRef:
    group: inference.networking.k8s.io
    kind: InferencePool
    name: {pool}
"""


def test_parses_all_three_kinds_and_skips_others() -> None:
    text = "\n---\n".join([
        objective("fast", 20),
        f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {{name: r, creationTimestamp: 2025-03-01T10:00:00Z}}
spec:
  poolRef: {{name: {POOL}}}
  rules:
    - matches: [{{model: {{value: a}}}}, {{model: {{type: Exact, value: b}}}}]
      targets: [{{modelRewrite: a-v2, weight: 1000000}}]
""",
        f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: legacy}}
spec: {{modelName: chat, criticality: Critical, poolRef: {{name: {POOL}}}}}
""",
        """apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool-a}
spec: {targetPorts: [{number: 8000}]}
""",
        "",  # an empty document is fine
    ])
    objs = parse_manifests(text)
    assert [type(o) for o in objs] == [InferenceObjective, InferenceModelRewrite, InferenceModel]
    obj, rw, legacy = objs
    assert isinstance(obj, InferenceObjective) and obj.priority == 20
    assert obj.meta.key == ObjectKey("InferenceObjective", "team", "fast")
    assert isinstance(rw, InferenceModelRewrite)
    assert rw.rules[0].models == ("a", "b") and rw.rules[0].targets[0].weight == 1_000_000
    assert rw.meta.created == 1740823200.0
    assert isinstance(legacy, InferenceModel) and legacy.priority == 1
    assert legacy.meta.key.namespace == "default"


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (objective("bad", "high"), "spec.priority must be an integer"),
        (objective("bad", "true"), "spec.priority must be an integer"),
        (objective("bad", 1).replace("    name: pool-a\n", ""), "spec.poolRef.name is required"),
        (objective("bad", 1).replace("kind: InferencePool", "kind: Service"), "spec.poolRef.kind"),
        (objective("bad", 1).replace("x-k8s.io/v1alpha2", "example.com/v1"), "apiVersion"),
        (f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {{name: bad}}
spec:
  poolRef: {{name: {POOL}}}
  rules: [{{targets: [{{modelRewrite: x, weight: 0}}]}}]
""", "weight must be in 1..1000000"),
        (f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {{name: bad}}
spec:
  poolRef: {{name: {POOL}}}
  rules: [{{targets: [{{modelRewrite: x, weight: 1000001}}]}}]
""", "weight must be in 1..1000000"),
        (f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {{name: bad}}
spec:
  poolRef: {{name: {POOL}}}
  rules: [{{matches: [{{model: {{type: RegularExpression, value: ".*"}}}}], targets: [{{modelRewrite: x}}]}}]
""", "type must be Exact"),
        (f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: bad}}
spec: {{modelName: m, criticality: Urgent, poolRef: {{name: {POOL}}}}}
""", "spec.criticality must be one of"),
        (f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: bad}}
spec:
  modelName: m
  poolRef: {{name: {POOL}}}
  targetModels: [{{name: a, weight: 5}}, {{name: b}}]
""", "on every target or on none"),
    ],
)
def test_malformed_document_names_index_and_name(doc: str, fragment: str) -> None:
    text = objective("ok", 1) + "---\n" + doc
    with pytest.raises(ManifestError) as exc:
        parse_manifests(text, source="objectives.yaml")
    (problem,) = exc.value.problems
    assert problem.index == 1
    assert problem.name == "bad"
    assert fragment in problem.message
    assert "objectives.yaml: document 1 (metadata.name 'bad')" in str(exc.value)


def test_every_bad_document_is_reported() -> None:
    text = "---\n".join([objective("a", "x"), objective("b", 1), objective("c", "y")])
    with pytest.raises(ManifestError) as exc:
        parse_manifests(text)
    assert [(p.index, p.name) for p in exc.value.problems] == [(0, "a"), (2, "c")]


def test_yaml_syntax_error_and_non_mapping_documents() -> None:
    with pytest.raises(ManifestError, match="invalid YAML"):
        parse_manifests(objective("a", 1) + "---\nkind: [unclosed\n")
    with pytest.raises(ManifestError, match="document 0: document must be a mapping"):
        parse_manifests("- just\n- a list\n")


def test_object_from_manifest_is_reusable_for_watch_events() -> None:
    import yaml

    obj = object_from_manifest(yaml.safe_load(objective("w", 3)))
    assert isinstance(obj, InferenceObjective) and obj.priority == 3
    assert object_from_manifest({"kind": "ConfigMap"}) is None


# -- the file watcher ------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    # Bump mtime explicitly so that two writes within one clock tick still differ.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


async def test_watcher_applies_changes_and_keeps_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "objectives.yaml"
    write(path, objective("fast", 20))
    store = ObjectiveStore(POOL)
    errors: list[Exception] = []
    watcher = ObjectivesFileWatcher(str(path), store, interval=0.01, on_error=errors.append)
    watcher.load()
    assert store.resolve("m", "fast", None, 0.0).priority == 20
    assert not await watcher.reload()  # unchanged

    write(path, objective("fast", 30) + "---\n" + objective("slow", -5))
    assert await watcher.reload()
    assert store.resolve("m", "fast", None, 0.0).priority == 30
    assert store.resolve("m", "slow", None, 0.0).priority == -5

    write(path, objective("fast", 40) + "---\n" + objective("broken", "oops"))
    assert not await watcher.reload()
    assert store.resolve("m", "fast", None, 0.0).priority == 30  # last good set kept
    assert store.resolve("m", "slow", None, 0.0).priority == -5
    assert isinstance(watcher.last_error, ManifestError)
    assert "document 1 (metadata.name 'broken')" in str(watcher.last_error)
    assert len(errors) == 1
    assert not await watcher.reload()  # the same broken file is not re-parsed
    assert len(errors) == 1

    path.unlink()
    assert not await watcher.reload()
    assert isinstance(watcher.last_error, OSError)
    assert store.resolve("m", "fast", None, 0.0).priority == 30

    write(path, objective("fast", 50))
    assert await watcher.reload()
    assert watcher.last_error is None
    assert store.resolve("m", "slow", None, 0.0).priority == 0


async def test_watcher_task_picks_up_a_change(tmp_path: Path) -> None:
    path = tmp_path / "objectives.yaml"
    write(path, objective("fast", 1))
    store = ObjectiveStore(POOL)
    watcher = ObjectivesFileWatcher(str(path), store, interval=0.01)
    watcher.load()
    watcher.start()
    try:
        write(path, objective("fast", 2) + "# changed\n")
        for _ in range(300):  # bounded: at most ~3 s
            if store.resolve("m", "fast", None, 0.0).priority == 2:
                break
            await asyncio.sleep(0.01)
        assert store.resolve("m", "fast", None, 0.0).priority == 2
    finally:
        await watcher.stop()


def test_initial_load_of_a_bad_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "objectives.yaml"
    write(path, objective("x", "nope"))
    watcher = ObjectivesFileWatcher(str(path), ObjectiveStore(POOL))
    with pytest.raises(ManifestError):
        watcher.load()
    with pytest.raises(OSError):
        ObjectivesFileWatcher(str(tmp_path / "missing.yaml"), ObjectiveStore(POOL)).load()


def test_bare_watch_object_with_kind_from_the_caller() -> None:
    bare = {"metadata": {"name": "o", "namespace": "ns", "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": {"priority": 4, "poolRef": {"name": POOL}}}
    assert object_from_manifest(bare) is None  # no kind: not ours
    obj = object_from_manifest(bare, kind="InferenceObjective")
    assert isinstance(obj, InferenceObjective) and obj.priority == 4
    assert obj.meta.key == ObjectKey("InferenceObjective", "ns", "o")


def test_odd_yaml_values_are_reported_as_manifest_errors() -> None:
    # A list where a string belongs is unhashable; deep nesting exhausts PyYAML's recursion.
    crit_list = f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: legacy}}
spec: {{modelName: chat, criticality: [x], poolRef: {{name: {POOL}}}}}
"""
    with pytest.raises(ManifestError, match="criticality"):
        parse_manifests(crit_list)
    with pytest.raises(ManifestError, match="nested too deeply"):
        parse_manifests("a: " + "[" * 5000 + "]" * 5000)


async def test_watcher_task_survives_an_unexpected_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "objectives.yaml"
    write(path, objective("fast", 1))
    store = ObjectiveStore(POOL)
    watcher = ObjectivesFileWatcher(str(path), store, interval=0.01)
    watcher.load()
    real = watcher.reload
    calls = 0

    async def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return await real()

    monkeypatch.setattr(watcher, "reload", flaky)
    task = watcher.start()
    try:
        write(path, objective("fast", 2) + "# changed\n")
        for _ in range(300):  # bounded: at most ~3 s
            if store.resolve("m", "fast", None, 0.0).priority == 2:
                break
            await asyncio.sleep(0.01)
        assert calls >= 2 and not task.done()
        assert store.resolve("m", "fast", None, 0.0).priority == 2
    finally:
        await watcher.stop()
