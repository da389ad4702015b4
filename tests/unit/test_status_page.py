"""The status page's data and HTML: a real director routes a few requests, the page shows
the pool and the sampled decisions, and hostile names from clients and model servers come
out as text, never as markup."""

from __future__ import annotations

import asyncio
import json
import time
from html.parser import HTMLParser

from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.flowcontrol.saturation import UtilizationDetector
from epp.request import InferenceRequest, parse_body
from epp.scheduling import Scheduler
from epp.scheduling.inflight import InFlightTracker
from epp.server.status_page import StatusPage, StatusSource, render
from epp.telemetry import DecisionRing, RequestObserver

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def hostile_pool() -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint("pod-a", "10.0.0.1", 8000), Endpoint(HOSTILE, "10.0.0.2", 8000)])
    now = time.monotonic()
    ds.update_metrics("pod-a", EndpointMetrics(waiting=1, running=3, kv_usage=0.25, scraped_at=now,
                                               active_adapters=frozenset({"food-review"}), max_lora=2))
    ds.update_metrics(HOSTILE, EndpointMetrics(waiting=0, running=0, kv_usage=0.5, scraped_at=now,
                                               active_adapters=frozenset({HOSTILE}), max_lora=2))
    return ds


def request(model: str, rid: str) -> InferenceRequest:
    raw = json.dumps({"model": model, "prompt": "hello " * 50}).encode()
    return InferenceRequest(rid, "/v1/completions", body=raw,
                            parsed=parse_body("/v1/completions", raw))


def setup() -> tuple[Director, StatusSource]:
    config = load_config(None)
    ds = hostile_pool()
    inflight = InFlightTracker()
    scheduler = Scheduler.from_config(config, inflight=inflight)
    observer = RequestObserver(ring=DecisionRing(capacity=10, interval=0.0))  # keep every one
    director = Director(ds, scheduler, observer=observer, inflight=inflight)
    source = StatusSource(datastore=ds, observer=observer, config=config,
                          inflight=inflight, detector=UtilizationDetector(),
                          pool_name="pool-1")
    return director, source


async def test_the_page_lists_the_pool_and_the_decisions_with_scores() -> None:
    director, source = setup()
    decisions = [await director.route(request("food-review", f"req-{i}")) for i in range(3)]
    view = source.collect()
    assert [e.name for e in view.endpoints] == ["pod-a", HOSTILE]
    a = view.endpoints[0]
    assert (a.waiting, a.running, a.kv, a.adapters, a.max_lora) == ("1", "3", "25%", "food-review", "2")
    assert sum(e.in_flight for e in view.endpoints) == 3  # routed, not finished
    assert [d.request_id for d in view.decisions] == ["req-2", "req-1", "req-0"]  # newest first
    d = view.decisions[0]
    assert d.endpoint == decisions[2].endpoint.name
    assert d.winner is not None and d.winner.total > 0
    assert {name for name, _ in d.winner.scores} >= {"queue-scorer", "kv-cache-utilization-scorer"}
    html = render(view).decode()
    assert 'http-equiv="refresh"' in html and "<script" not in html
    assert "req-2" in html and "pool-1" in html


async def test_hostile_model_adapter_and_endpoint_names_render_as_text() -> None:
    director, source = setup()
    await director.route(request(HOSTILE, HOSTILE))
    html = render(source.collect()).decode()
    parsed = Elements()
    parsed.feed(html)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    text = "".join(parsed.text)
    assert HOSTILE in text  # shown, escaped, as what it is
    assert "&lt;script&gt;" in html


async def test_very_long_names_are_clipped() -> None:
    director, source = setup()
    await director.route(request("m" * 100_000, "r" * 100_000))
    html = render(source.collect()).decode()
    assert len(html) < 60_000
    assert "m" * 300 not in html and "m~" in html


async def test_control_characters_and_lone_surrogates_cannot_break_the_page() -> None:
    director, source = setup()
    # A client's model name with a NUL (lone surrogates there are a 400 in request.py),
    # and a model server's adapter name with a lone surrogate.
    raw = b'{"model": "bad\\u0000name<b>", "prompt": "hello hello hello hello"}'
    req = InferenceRequest("r-odd", "/v1/completions", body=raw,
                           parsed=parse_body("/v1/completions", raw))
    source.datastore.update_metrics("pod-a", EndpointMetrics(
        waiting=0, running=0, kv_usage=0.1, scraped_at=time.monotonic(),
        active_adapters=frozenset({"ad\ud800apter"}), max_lora=2))
    await director.route(req)
    html = render(source.collect()).decode()  # encodes: no lone surrogate survived
    assert "bad\ufffdname&lt;b&gt;" in html and "ad\ufffdapter" in html


async def test_the_page_is_collected_on_the_event_loop_from_another_thread() -> None:
    _, source = setup()
    page = StatusPage(source, asyncio.get_running_loop())
    html = await asyncio.to_thread(page.html)
    assert b"pod-a" in html
