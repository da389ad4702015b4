"""The director's pipeline: admission leases never leak, whatever ends a request."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.flowcontrol.queues import AdmissionTicket
from epp.objectives import Resolution
from epp.errors import EppError, ErrorCode
from epp.request import InferenceRequest, parse_body
from epp.scheduling import InFlightTracker, Scheduler


class Lease:
    def __init__(self) -> None:
        self.released = 0
        self.started_with: tuple[str, int] | None = None

    def started(self, endpoint: str, tokens: int) -> None:
        self.started_with = (endpoint, tokens)

    def release(self) -> None:
        self.released += 1


class CountingAdmission:
    def __init__(self) -> None:
        self.leases: list[Lease] = []
        self.tickets: list[AdmissionTicket] = []

    async def admit(self, ticket: AdmissionTicket, candidates: Any) -> Lease:
        self.tickets.append(ticket)
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
    d.finished(decision, None)
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
    inflight = InFlightTracker()
    d = Director(pool(), Scheduler.from_config(load_config(None), inflight=inflight),
                 inflight=inflight)
    first, second = await d.route(request()), await d.route(request())  # both "r1"
    d.finished(first, None)
    assert inflight.endpoint_of(second.inflight_key) == "a"


def two_pods() -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)])
    for n in ("a", "b"):
        ds.update_metrics(n, EndpointMetrics(waiting=0, running=0, kv_usage=0.1,
                                             scraped_at=time.monotonic()))
    return ds


async def test_the_endpoint_that_served_takes_over_in_flight_load_and_prefix_learning() -> None:
    ds, inflight = two_pods(), InFlightTracker()
    scheduler = Scheduler.from_config(load_config(None), inflight=inflight)
    d = Director(ds, scheduler, inflight=inflight)
    long = request(prompt="a shared system prompt " * 60)
    decision = await d.route(long)
    other = "b" if decision.endpoint.name == "a" else "a"
    other_hostport = ds.snapshot().endpoints[ds.snapshot().by_name[other]].hostport

    d.served(decision, other_hostport)

    assert inflight.endpoint_of(decision.inflight_key) == other
    scores = d.explain(long).explanation.profiles[0].scores
    assert {c.endpoint: c.raw["prefix-cache-scorer"] for c in scores}[other] > 0.9
    d.served(decision, "10.9.9.9:1")  # not in the pool: ignored
    assert inflight.endpoint_of(decision.inflight_key) == other
    d.finished(decision, None)
    assert inflight.endpoint_of(decision.inflight_key) is None


def sample(name: str, **labels: str) -> float:
    from epp.observability import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_failed_model_server_response_is_an_error_not_a_completion() -> None:
    d = Director(pool(), Scheduler.from_config(load_config(None)))
    labels = dict(model_name="food-review", target_model_name="food-review")
    errors = lambda code: sample("inference_objective_request_error_total", **labels, error_code=code)  # noqa: E731
    done = lambda: sample("inference_objective_request_duration_seconds_count", **labels)  # noqa: E731
    before5, before4, before_done = errors("ModelServer5xx"), errors("ModelServer4xx"), done()

    d.finished(await d.route(request()), None, status=502)
    d.finished(await d.route(request()), None, status=429)
    d.finished(await d.route(request()), None, status=200)

    assert errors("ModelServer5xx") == before5 + 1 and errors("ModelServer4xx") == before4 + 1
    assert done() == before_done + 1
