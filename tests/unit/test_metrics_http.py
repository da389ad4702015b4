"""The /metrics server with `--metrics-endpoint-auth`: status codes and the decision cache.

The reviewer is faked here (a dict of tokens and a set of allowed users) so that every
status code and cache expiry can be driven exactly; the real TokenReview and
SubjectAccessReview against a kube-apiserver are tested in tests/k8s/test_metrics_auth.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from epp.server.metrics_http import MetricsAuth, MetricsServer, ReviewUnavailable, User


class FakeReviewer:
    def __init__(self) -> None:
        self.tokens = {"reader-token": User("system:serviceaccount:ns:reader"),
                       "other-token": User("system:serviceaccount:ns:other")}
        self.allowed = {("system:serviceaccount:ns:reader", "/metrics", "get")}
        self.down = False
        self.calls: list[str] = []

    def authenticate(self, token: str) -> User | None:
        self.calls.append("authn")
        if self.down:
            raise ReviewUnavailable("connection refused")
        return self.tokens.get(token)

    def authorize(self, user: User, path: str, verb: str) -> bool:
        self.calls.append("authz")
        if self.down:
            raise ReviewUnavailable("connection refused")
        return (user.name, path, verb) in self.allowed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("epp_test_scrapes", "a metric to find on the page", registry=r).inc()
    return r


@pytest.fixture
def reviewer() -> FakeReviewer:
    return FakeReviewer()


@pytest.fixture
async def server(registry: CollectorRegistry, reviewer: FakeReviewer) -> AsyncIterator[str]:
    srv = MetricsServer(registry, auth=MetricsAuth(reviewer))
    port = srv.start("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}"
    srv.stop()


async def get(url: str, token: str | None = None, header: str | None = None) -> tuple[int, str]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if header is not None:
        headers["Authorization"] = header
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.text()


async def test_reader_token_gets_the_page(server: str):
    status, body = await get(f"{server}/metrics", "reader-token")
    assert status == 200
    assert "epp_test_scrapes_total 1.0" in body


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic cmVhZGVyOng="])
async def test_no_bearer_token_is_401(server: str, reviewer: FakeReviewer, header: str | None):
    status, body = await get(f"{server}/metrics", header=header)
    assert status == 401 and "Unauthorized" in body
    assert reviewer.calls == []  # nothing to ask the API server


async def test_unknown_token_is_401(server: str):
    assert (await get(f"{server}/metrics", "forged"))[0] == 401


async def test_valid_token_without_the_role_is_403(server: str):
    status, body = await get(f"{server}/metrics", "other-token")
    assert status == 403
    assert "system:serviceaccount:ns:other" in body
    assert "epp_test_scrapes" not in body


async def test_the_role_covers_only_the_path_it_names(server: str):
    assert (await get(f"{server}/debug", "reader-token"))[0] == 403


async def test_the_status_page_sits_behind_the_same_auth(registry: CollectorRegistry,
                                                      reviewer: FakeReviewer):
    reviewer.allowed.add(("system:serviceaccount:ns:reader", "/debug/status", "get"))
    srv = MetricsServer(registry, auth=MetricsAuth(reviewer), status_page=lambda: b"<p>pool</p>")
    url = f"http://127.0.0.1:{srv.start('127.0.0.1', 0)}/debug/status"
    try:
        assert (await get(url))[0] == 401
        assert (await get(url, "other-token"))[0] == 403
        assert await get(url, "reader-token") == (200, "<p>pool</p>")
    finally:
        srv.stop()


async def test_a_status_page_that_cannot_be_made_is_503_not_a_crash(registry: CollectorRegistry):
    def busy() -> bytes:
        raise TimeoutError

    srv = MetricsServer(registry, status_page=busy)
    base = f"http://127.0.0.1:{srv.start('127.0.0.1', 0)}"
    try:
        assert (await get(base + "/debug/status"))[0] == 503
        assert (await get(base + "/metrics"))[0] == 200
    finally:
        srv.stop()


async def test_unreachable_api_server_is_503_and_the_server_keeps_serving(
        server: str, reviewer: FakeReviewer, caplog: pytest.LogCaptureFixture):
    reviewer.down = True
    assert (await get(f"{server}/metrics", "reader-token"))[0] == 503
    assert "cannot reach the API server" in caplog.text
    reviewer.down = False  # not cached: the next scrape asks again
    assert (await get(f"{server}/metrics", "reader-token"))[0] == 200


async def test_without_auth_everyone_gets_the_page(registry: CollectorRegistry):
    srv = MetricsServer(registry)
    port = srv.start("127.0.0.1", 0)
    try:
        status, body = await get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "epp_test_scrapes_total" in body
    finally:
        srv.stop()


def test_allowed_decision_is_cached_for_the_allow_ttl(reviewer: FakeReviewer):
    clock = Clock()
    auth = MetricsAuth(reviewer, allow_ttl=60, deny_ttl=10, clock=clock)
    assert auth.check("Bearer reader-token", "/metrics").status == 200
    assert reviewer.calls == ["authn", "authz"]
    clock.now += 59
    assert auth.check("Bearer reader-token", "/metrics").status == 200
    assert reviewer.calls == ["authn", "authz"]  # from the cache
    clock.now += 2
    reviewer.allowed.clear()  # the role binding was removed meanwhile
    assert auth.check("Bearer reader-token", "/metrics").status == 403
    assert reviewer.calls == ["authn", "authz"] * 2


def test_denied_decisions_expire_sooner(reviewer: FakeReviewer):
    clock = Clock()
    auth = MetricsAuth(reviewer, allow_ttl=60, deny_ttl=10, clock=clock)
    assert auth.check("Bearer other-token", "/metrics").status == 403
    assert auth.check("Bearer forged", "/metrics").status == 401
    reviewer.allowed.add(("system:serviceaccount:ns:other", "/metrics", "get"))
    reviewer.tokens["forged"] = User("late")
    reviewer.allowed.add(("late", "/metrics", "get"))
    clock.now += 9
    assert auth.check("Bearer other-token", "/metrics").status == 403
    assert auth.check("Bearer forged", "/metrics").status == 401
    clock.now += 2
    assert auth.check("Bearer other-token", "/metrics").status == 200
    assert auth.check("Bearer forged", "/metrics").status == 200


def test_cache_is_bounded_and_keeps_the_recently_used(reviewer: FakeReviewer):
    auth = MetricsAuth(reviewer, max_entries=3, clock=Clock())
    for i in range(10):
        auth.check(f"Bearer junk-{i}", "/metrics")
    assert len(auth) == 3
    auth.check("Bearer reader-token", "/metrics")
    calls = len(reviewer.calls)
    for i in range(2):
        auth.check(f"Bearer more-{i}", "/metrics")
    auth.check("Bearer reader-token", "/metrics")  # still cached: used after the junk
    assert len(auth) == 3
    assert len(reviewer.calls) == calls + 2


def test_cache_keeps_no_token_in_clear(reviewer: FakeReviewer):
    auth = MetricsAuth(reviewer, clock=Clock())
    auth.check("Bearer reader-token", "/metrics")
    assert "reader-token" not in repr(auth._cache)


def test_flag_is_go_style_and_on_by_default():
    from epp.settings import parse_settings

    assert parse_settings([]).metrics_endpoint_auth is True
    assert parse_settings(["--metrics-endpoint-auth=false"]).metrics_endpoint_auth is False
    assert parse_settings(["--metrics-endpoint-auth"]).metrics_endpoint_auth is True


async def test_standalone_epp_serves_metrics_without_auth_and_says_why(
        caplog: pytest.LogCaptureFixture):
    # No Kubernetes source, so no API server to ask: the default (auth on) cannot apply.
    from epp.app import EppApp
    from epp.settings import parse_settings

    caplog.set_level("INFO", logger="epp.app")
    app = EppApp(parse_settings(["--endpoints", "127.0.0.1:9", "--bind-address", "127.0.0.1",
                                 "--secure-serving=false", "--grpc-port", "0",
                                 "--grpc-health-port", "0", "--metrics-port", "0"]))
    await app.start()
    try:
        status, page = await get(f"http://127.0.0.1:{app.metrics_port}/metrics")
        assert status == 200 and "inference_pool_ready_pods" in page
        assert "metrics endpoint auth is off" in caplog.text
    finally:
        await app.stop(0)
