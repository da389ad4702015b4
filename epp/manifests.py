"""Kubernetes manifests of objectives and rewrites, read from YAML without a cluster.

`--objectives-file FILE` holds ordinary multi-document YAML (the same apiVersion, kind,
metadata and spec that `kubectl apply` takes), so one file works locally and in a cluster.
Documents of other kinds (an InferencePool, a Deployment) are skipped, so a whole
deployment file can be pointed at.

`object_from_manifest()` turns one decoded document into a typed object; the Kubernetes
watcher can reuse it for the objects it receives. `parse_manifests()` does a whole file
and reports every malformed document by index and `metadata.name` in one `ManifestError`.
`ObjectivesFileWatcher` re-reads the file when it changes: reading and parsing run in a
worker thread so the event loop never blocks, and a bad file leaves the last good set in
the store untouched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from epp.filewatch import DEFAULT_SETTLE, FileStamp, NotReady, read_settled, read_settled_retrying
from epp.objectives import (
    CRITICALITY_PRIORITY,
    KIND_MODEL,
    KIND_OBJECTIVE,
    KIND_REWRITE,
    MAX_WEIGHT,
    MIN_WEIGHT,
    InferenceModel,
    InferenceModelRewrite,
    InferenceObject,
    InferenceObjective,
    ObjectiveStore,
    ObjectKey,
    ObjectMeta,
    RewriteRule,
    WeightedTarget,
)
from epp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

API_GROUPS = frozenset({"inference.networking.x-k8s.io", "inference.networking.k8s.io"})
"""Groups accepted for the three kinds (any version; the fields are the v1alpha2 ones)."""


@dataclass(frozen=True, slots=True)
class DocumentProblem:
    index: int
    """0-based position of the document in the YAML stream."""
    name: str | None
    message: str

    def __str__(self) -> str:
        who = f" (metadata.name {self.name!r})" if self.name else ""
        return f"document {self.index}{who}: {self.message}"


class ManifestError(ValueError):
    """One or more documents are malformed; nothing from the file was applied."""

    def __init__(self, problems: list[DocumentProblem], source: str = "manifests") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))


class _Bad(ValueError):
    pass


def _str(v: Any, where: str, required: bool = True) -> str | None:
    if v is None:
        if required:
            raise _Bad(f"{where} is required")
        return None
    if not isinstance(v, str) or not v:
        raise _Bad(f"{where} must be a non-empty string")
    return v


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{where} must be an integer, got {v!r}")
    return v


def _map(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Bad(f"{where} must be a mapping")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Bad(f"{where} must be a list")
    return v


def _timestamp(v: Any) -> float:
    """`metadata.creationTimestamp` (RFC 3339; YAML may already have decoded it)."""
    if v is None:
        return float("inf")
    if isinstance(v, str):
        try:
            v = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise _Bad(f"metadata.creationTimestamp {v!r} is not an RFC 3339 time") from None
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        return float(v.timestamp())
    raise _Bad("metadata.creationTimestamp must be a timestamp")


def _targets(items: list[Any], where: str, name_field: str) -> tuple[WeightedTarget, ...]:
    """Weighted targets; weights must be all set or all omitted (omitted = equal)."""
    out: list[WeightedTarget] = []
    weighted = 0
    for i, t in enumerate(items):
        t = _map(t, f"{where}[{i}]")
        model = _str(t.get(name_field), f"{where}[{i}].{name_field}")
        w = t.get("weight")
        if w is None:
            weight = 1
        else:
            weighted += 1
            weight = _int(w, f"{where}[{i}].weight")
            if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
                raise _Bad(f"{where}[{i}].weight must be in {MIN_WEIGHT}..{MAX_WEIGHT}, got {weight}")
        out.append(WeightedTarget(model, weight))  # type: ignore[arg-type]
    if 0 < weighted < len(out):
        raise _Bad(f"{where}: set weight on every target or on none")
    return tuple(out)


def _pool_name(spec: dict[str, Any]) -> str:
    ref = _map(spec.get("poolRef"), "spec.poolRef")
    kind = ref.get("kind")
    if kind is not None and kind != "InferencePool":
        raise _Bad(f"spec.poolRef.kind must be InferencePool, got {kind!r}")
    return _str(ref.get("name"), "spec.poolRef.name")  # type: ignore[return-value]


def object_from_manifest(doc: Any, kind: str | None = None) -> InferenceObject | None:
    """One decoded document -> typed object; None for kinds this store does not hold.

    `kind`, when given (a watch knows what it watches), is used if the object itself
    carries no `kind`; `apiVersion` is then optional too. Raises `ValueError` with the
    offending field path when the document is malformed.
    """
    if not isinstance(doc, dict):
        raise _Bad("document must be a mapping")
    kind = doc.get("kind") or kind
    if kind not in (KIND_OBJECTIVE, KIND_REWRITE, KIND_MODEL):
        return None
    api = doc.get("apiVersion")
    if api is None and doc.get("kind") is None:
        pass  # a watch event's bare object; its kind came from the caller
    elif not isinstance(api, str) or api.split("/", 1)[0] not in API_GROUPS:
        raise _Bad(f"apiVersion {api!r} is not in group inference.networking.x-k8s.io")
    md = _map(doc.get("metadata"), "metadata")
    name = _str(md.get("name"), "metadata.name")
    ns = _str(md.get("namespace"), "metadata.namespace", required=False) or "default"
    spec = _map(doc.get("spec"), "spec")
    meta = ObjectMeta(ObjectKey(kind, ns, name), _pool_name(spec),  # type: ignore[arg-type]
                      _timestamp(md.get("creationTimestamp")))
    if kind == KIND_OBJECTIVE:
        prio = spec.get("priority")
        return InferenceObjective(meta, 0 if prio is None else _int(prio, "spec.priority"))
    if kind == KIND_MODEL:
        model_name = _str(spec.get("modelName"), "spec.modelName")
        crit = spec.get("criticality")
        if crit is not None and (not isinstance(crit, str) or crit not in CRITICALITY_PRIORITY):
            raise _Bad(f"spec.criticality must be one of {', '.join(CRITICALITY_PRIORITY)}, got {crit!r}")
        targets = _targets(_list(spec.get("targetModels"), "spec.targetModels"),
                           "spec.targetModels", "name")
        return InferenceModel(meta, model_name, crit, targets)  # type: ignore[arg-type]
    rules: list[RewriteRule] = []
    for r, rule in enumerate(_list(spec.get("rules"), "spec.rules")):
        where = f"spec.rules[{r}]"
        rule = _map(rule, where)
        models: list[str] = []
        for m, match in enumerate(_list(rule.get("matches"), f"{where}.matches")):
            mw = f"{where}.matches[{m}].model"
            mm = _map(_map(match, f"{where}.matches[{m}]").get("model"), mw)
            mtype = mm.get("type", "Exact")
            if mtype != "Exact":
                raise _Bad(f"{mw}.type must be Exact, got {mtype!r}")
            models.append(_str(mm.get("value"), f"{mw}.value"))  # type: ignore[arg-type]
        targets = _targets(_list(rule.get("targets"), f"{where}.targets"),
                           f"{where}.targets", "modelRewrite")
        if not targets:
            raise _Bad(f"{where}.targets must name at least one modelRewrite")
        rules.append(RewriteRule(tuple(models), targets))
    return InferenceModelRewrite(meta, tuple(rules))


def parse_manifests(text: str, source: str = "manifests") -> list[InferenceObject]:
    """All objective/rewrite/model objects of a multi-document YAML text.

    Raises `ManifestError` listing every malformed document (index and metadata.name);
    a YAML syntax error stops the scan at the document where it occurs.
    """
    objs: list[InferenceObject] = []
    problems: list[DocumentProblem] = []
    index = 0
    try:
        for index, doc in enumerate(yaml.safe_load_all(text)):
            if doc is None:
                continue
            try:
                obj = object_from_manifest(doc)
            except ValueError as e:
                problems.append(DocumentProblem(index, _doc_name(doc), str(e)))
                continue
            if obj is not None:
                objs.append(obj)
            elif isinstance(doc, dict):
                log.debug("%s: document %d kind %r skipped", source, index, doc.get("kind"))
    except yaml.YAMLError as e:
        at = index + 1 if objs or problems else index
        problems.append(DocumentProblem(at, None, f"invalid YAML: {e}".replace("\n", " ")))
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        at = index + 1 if objs or problems else index
        problems.append(DocumentProblem(at, None, "invalid YAML: nested too deeply"))
    if problems:
        raise ManifestError(problems, source)
    return objs


def _doc_name(doc: Any) -> str | None:
    if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
        name = doc["metadata"].get("name")
        return name if isinstance(name, str) else None
    return None


class ObjectivesFileWatcher:
    """Keeps an `ObjectiveStore` equal to the contents of one manifest file.

    Polls the file's stat every `interval` seconds (which also sees ConfigMap symlink
    swaps, unlike inotify on the link) and re-reads it when it changed; reading and YAML
    parsing run in a worker thread. On a bad file the store keeps its last good set and
    `last_error` says why; `on_error` (if given) is called with the exception.
    """

    def __init__(
        self,
        path: str,
        store: ObjectiveStore,
        interval: float = 1.0,
        on_error: Callable[[Exception], None] | None = None,
        settle: float = DEFAULT_SETTLE,
    ) -> None:
        self.path = path
        self.store = store
        self.interval = interval
        self.on_error = on_error
        self.last_error: Exception | None = None
        self.loads = 0
        self.settle = settle
        self._stat: FileStamp | None = None
        self._digest: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Initial synchronous load for startup; raises `ManifestError`/`OSError`.

        An empty file at startup leaves the store empty and is watched like any other."""
        try:
            text = read_settled_retrying(self.path, settle=self.settle)
        except NotReady as e:
            log.warning("objectives file %s: %s; starting without objectives", self.path, e)
            return
        self._apply(FileStamp.of(self.path), text, parse_manifests(text, source=self.path))

    async def reload(self) -> bool:
        """Re-read the file if it changed; True if the store was updated.

        An empty or half-written file (see `epp.filewatch`) never replaces the last good
        set; it is looked at again at the next poll."""
        st: FileStamp | None = None
        try:
            st = await asyncio.to_thread(FileStamp.of, self.path)
            if st == self._stat:
                return False
            try:
                stat, text = await asyncio.to_thread(read_settled, self.path, self.settle)
            except NotReady as e:
                if str(e) != str(self.last_error):
                    log.info("objectives file %s not applied yet: %s", self.path, e)
                self.last_error = e
                return False
            digest = hashlib.sha256(text.encode()).digest()
            if digest == self._digest:
                self._stat = stat
                return False
            objs = await asyncio.to_thread(parse_manifests, text, self.path)
        except (OSError, UnicodeDecodeError, ManifestError) as e:
            if str(e) != str(self.last_error):
                log.error("objectives file not applied, keeping the last good set: %s", e)
            self.last_error = e
            if self.on_error is not None:
                self.on_error(e)
            # Remember the stat so a broken file is not re-parsed every poll.
            self._stat = st
            return False
        self._apply(stat, text, objs)
        return True

    def _apply(self, stat: FileStamp, text: str, objs: list[InferenceObject]) -> None:
        self.store.replace_all(objs)
        self._stat = stat
        self._digest = hashlib.sha256(text.encode()).digest()
        self.last_error = None
        self.loads += 1
        log.info("objectives file %s applied: %d objects for pool %s",
                 self.path, len(self.store), self.store.pool_name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the watcher must never die; keep the last good set
                if str(e) != str(self.last_error):
                    log.exception("objectives file %s: unexpected error while reloading", self.path)
                self.last_error = e

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="objectives-file")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
