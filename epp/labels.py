"""The one place where a string from a client or a model server becomes a label or log value.

Every such string is hostile: it may be enormous, may hold a lone surrogate (legal in
JSON, not encodable as UTF-8, so one of them broke every later `/metrics` scrape), may hold
newlines or control characters, and may be different on every request (every distinct
model name used to add ~100 series that were never removed: 50,000 random names took the
EPP to 2.75 GB). So:

- `safe(value)` bounds the length and replaces what cannot be exposed; it is pure and is
  used for operator-controlled names too (endpoint names) and for log fields (`for_log`).
- `LabelFolder` bounds cardinality: names the operator made known (objectives, rewrite
  targets, models the pool serves) keep their own series; the first `cap` other names do
  too; every later one is counted under `OTHER`. Series are never removed, so memory for
  metrics is bounded by known names + `cap` whatever clients send.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Callable, Collection

if TYPE_CHECKING:
    from epp.datastore import Datastore
    from epp.objectives import ObjectiveStore

log = logging.getLogger(__name__)

MAX_LABEL_CHARS = 128
"""Longer values are cut (with a trailing `~`); a model name that long is not a real one."""
DEFAULT_CAP = 64
"""Distinct unknown values given their own series before the rest fold into `OTHER`."""
OTHER = "other"
MAX_NAMES_PER_SERVER = 64

# C0/C1 controls, DEL and lone surrogates: not exposable in a text exposition or a log line.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_REPLACEMENT = "\ufffd"


def safe(value: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """`value` bounded to `max_chars` and encodable as UTF-8, with no control characters."""
    if len(value) > max_chars:
        value = value[: max_chars - 1] + "~"
    if value.isascii() and value.isprintable():
        return value
    return _UNSAFE.sub(_REPLACEMENT, value)


def for_log(value: str, max_chars: int = 256) -> str:
    """A client string as a log field: bounded, one line, printable, quoted when odd."""
    s = safe(value, max_chars)
    return s if s and s.isprintable() and " " not in s else repr(s)


KnownNames = Callable[[], Collection[str]]
"""Returns the names that always get their own series (cheap: called once per new name)."""


class LabelFolder:
    """Maps client-chosen names (model, target model, objective, fairness id) to label values.

    Owned by the director; every label value built from a request goes through `label`.
    """

    def __init__(self, known: KnownNames | None = None, cap: int = DEFAULT_CAP) -> None:
        if cap < 0:
            raise ValueError("label cap must be >= 0")
        self._known = known
        self.cap = cap
        self._admitted: dict[str, str] = {}
        self._folded = 0
        self._warned = False

    def label(self, name: str) -> str:
        """The label value for `name`: itself (made safe) or `OTHER`."""
        got = self._admitted.get(name)
        if got is not None:
            return got
        if not name:
            return ""
        if self._known is not None and name in self._known():
            return safe(name)  # known: not counted against the cap
        if len(self._admitted) < self.cap:
            got = self._admitted[name] = safe(name)
            return got
        self._folded += 1
        if not self._warned:
            self._warned = True
            log.warning("more than %d distinct unknown model/objective names: the rest are "
                        "counted under %r in metrics (--metrics-label-cap)", self.cap, OTHER)
        return OTHER

    @property
    def folded(self) -> int:
        """How many lookups were folded into `OTHER` (for tests and the soak benchmark)."""
        return self._folded


def known_names(datastore: "Datastore", objectives: "ObjectiveStore") -> KnownNames:
    """Names the operator made known: objectives, rewrite/model names and targets, and the
    models and adapters the pool's servers report. Rebuilt only when either side changed."""
    cache: dict[str, object] = {"key": None, "names": frozenset()}

    def names() -> Collection[str]:
        snap = datastore.snapshot()
        key = (snap.version, objectives.version)
        if cache["key"] != key:
            out: set[str] = set()
            for ms in (snap.models, snap.active_adapters, snap.waiting_adapters):
                for s in ms:
                    if len(s) <= MAX_NAMES_PER_SERVER:  # a server listing more is not believed
                        out.update(s)
            out.update(_objective_names(objectives))
            cache["key"], cache["names"] = key, frozenset(out)
        return cache["names"]  # type: ignore[return-value]

    return names


def _objective_names(store: "ObjectiveStore") -> set[str]:
    from epp.objectives import InferenceModel, InferenceModelRewrite

    out: set[str] = set()
    for obj in store.objects():
        out.add(obj.meta.key.name)
        if isinstance(obj, InferenceModel):
            out.add(obj.model_name)
            out.update(t.model for t in obj.targets)
        elif isinstance(obj, InferenceModelRewrite):
            for rule in obj.rules:
                out.update(rule.models)
                out.update(t.model for t in rule.targets)
    return out
