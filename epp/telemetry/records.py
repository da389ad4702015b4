"""One routing decision as plain, bounded data: what the span, the decision log line and
the status page all show.

Strings that came from a client (model names, request ids) or a model server (endpoint
and adapter names) are made safe here, once (`clip`: bounded, no control characters or
lone surrogates); escaping for HTML is the status page template's job (autoescaped), for
JSON the encoder's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from epp.labels import safe

MAX_TEXT = 200
MAX_CANDIDATES = 8


def clip(value: Any, limit: int = MAX_TEXT) -> str:
    """`value` as text of at most `limit` characters, without control characters or lone
    surrogates (`epp.labels.safe`, the project's one place for hostile strings)."""
    return safe(value if isinstance(value, str) else str(value), limit)


@dataclass(frozen=True, slots=True)
class CandidateScores:
    endpoint: str
    total: float
    scores: tuple[tuple[str, float], ...]
    """(scorer name, weighted score), in the profile's scorer order."""


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    at: float
    """Wall-clock time (time.time()) of the decision."""
    request_id: str
    model: str
    target_model: str
    objective: str
    priority: int
    endpoint: str
    profile: str = ""
    resolve_us: float = 0.0
    queue_ms: float = 0.0
    schedule_us: float = 0.0
    candidates: tuple[CandidateScores, ...] = ()
    filters: tuple[tuple[str, int], ...] = ()
    """(filter name, survivors) in order."""
    scorers: tuple[str, ...] = ()

    @property
    def winner(self) -> CandidateScores | None:
        return next((c for c in self.candidates if c.endpoint == self.endpoint), None)

    def fields(self) -> dict[str, Any]:
        """Flat key/values with the span's attribute names (for the JSON log line)."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "gen_ai.request.model": self.model,
            "inference.target_model": self.target_model,
            "inference.objective": self.objective,
            "inference.priority": self.priority,
            "inference.endpoint": self.endpoint,
            "inference.profile": self.profile,
            "inference.resolve_us": round(self.resolve_us, 1),
            "inference.queue_wait_ms": round(self.queue_ms, 3),
            "inference.schedule_us": round(self.schedule_us, 1),
        }
        w = self.winner
        if w is not None:
            out["inference.score.total"] = round(w.total, 4)
            for name, v in w.scores:
                out[f"inference.score.{name}"] = round(v, 4)
        if self.candidates:
            out["inference.candidates"] = len(self.candidates)
        return out


def decision_record(watch: Any, req: Any, resolution: Any, decision: Any) -> DecisionRecord:
    """Build the record from the director's objects and the watch's laps."""
    laps = dict(watch.laps)
    t_res = laps.get("resolve", watch.start_ns)
    t_adm = laps.get("admit", t_res)
    t_sch = laps.get("schedule", t_adm)
    ex = decision.explanation
    profile = ""
    cands: tuple[CandidateScores, ...] = ()
    filters: tuple[tuple[str, int], ...] = ()
    scorers: tuple[str, ...] = ()
    if ex is not None:
        prof = next((p for p in ex.profiles if p.profile == ex.primary_profile),
                    ex.profiles[0] if ex.profiles else None)
        if prof is not None:
            profile = clip(prof.profile)
            scorers = tuple(s.name for s in prof.scorers)
            ranked = sorted(prof.scores, key=lambda c: -c.total)
            # Keep the winner even when more than MAX_CANDIDATES tie above it.
            top = ranked[:MAX_CANDIDATES]
            if all(c.endpoint != decision.endpoint.name for c in top):
                top += [c for c in ranked if c.endpoint == decision.endpoint.name][:1]
            # Scorer names come from the operator's config; endpoint names from a source.
            cands = tuple(CandidateScores(clip(c.endpoint), float(c.total),
                                          tuple((k, float(v)) for k, v in c.weighted.items()))
                          for c in top)
            filters = tuple((f.name, len(f.survivors)) for f in prof.filters)
    return DecisionRecord(
        at=time.time(),
        request_id=clip(req.request_id),
        model=clip(decision.model),
        target_model=clip(decision.target_model),
        objective=clip(getattr(resolution, "objective_name", None) or ""),
        priority=int(decision.priority),
        endpoint=clip(decision.endpoint.name),
        profile=profile,
        resolve_us=(t_res - watch.start_ns) / 1e3,
        queue_ms=(t_adm - t_res) / 1e6,
        schedule_us=(t_sch - t_adm) / 1e3,
        candidates=cands,
        filters=filters,
        scorers=scorers,
    )
