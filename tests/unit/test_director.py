"""The director's pipeline: admission leases never leak, whatever ends a request."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director, Resolution
from epp.errors import EppError, ErrorCode
from epp.request import InferenceRequest, parse_body
from epp.scheduling import Scheduler


class Lease:
    def __init__(self) -> None:
        self.released = 0
        self.started_with: tuple[str, int] | None = None

    def started(self, endpoint: str, tokens: int) -> None:
        self.started_with = (endpoint, tokens)

    def done(self) -> None:
        self.released += 1


class CountingAdmission:
    def __init__(self) -> None:
        self.leases: list[Lease] = []

    async def admit(self, request: Any, priority: int, snapshot: Any, candidates: Any) -> Lease:
        lease = Lease()
        self.leases.append(lease)
        return lease


class FailingScheduler:
    def schedule(self, *a: Any, **kw: Any) -> Any:
        raise EppError(ErrorCode.ServiceUnavailable, "filters left nothing")


def pool() -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    ds.update_metrics("a", EndpointMetrics(waiting=0, running=0, kv_usage=0.1, scraped_at=time.monotonic()))
    return ds


def request(**body: Any) -> InferenceRequest:
    raw = json.dumps({"model": "food-review", "prompt": "x" * 400, **body}).encode()
    return InferenceRequest("r1", "/v1/completions", body=raw, parsed=parse_body("/v1/completions", raw))


async def test_a_failed_schedule_gives_the_lease_back() -> None:
    admission = CountingAdmission()
    d = Director(pool(), FailingScheduler(), admission=admission)
    with pytest.raises(EppError):
        await d.route(request())
    assert admission.leases[0].released == 1


async def test_a_routed_request_holds_its_lease_until_finished() -> None:
    admission = CountingAdmission()
    d = Director(pool(), Scheduler.from_config(load_config(None)), admission=admission)
    decision = await d.route(request(max_tokens=50))
    lease = admission.leases[0]
    assert lease.released == 0
    assert lease.started_with == ("a", 100 + 50)  # ~4 characters a token, plus the output asked for
    d.finished(request(), decision, None)
    assert lease.released == 1


async def test_a_rewrite_reaches_the_forwarded_body() -> None:
    class Rewrite:
        def resolve(self, model: str, objective: Any, header: Any, rand: float) -> Resolution:
            return Resolution("food-review-v2", 10, None)

    d = Director(pool(), Scheduler.from_config(load_config(None)), resolver=Rewrite())
    decision = await d.route(request())
    assert json.loads(decision.body)["model"] == "food-review-v2"
    assert (decision.model, decision.target_model, decision.priority) == ("food-review", "food-review-v2", 10)


async def test_clients_reusing_a_request_id_do_not_clear_each_other() -> None:
    s = Scheduler.from_config(load_config(None), track_inflight=False)
    d = Director(pool(), s, inflight=s.inflight)
    first, second = await d.route(request()), await d.route(request())  # both "r1"
    d.finished(request(), first, None)
    assert s.inflight.endpoint_of(second.inflight_key) == "a"
