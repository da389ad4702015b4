"""What a client sees when things go wrong around the EPP, through a real Envoy."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

import pytest

from tests.e2e.test_envoy_routing import COMPLETION
from tests.support import (
    EppProcess,
    UpstreamFleet,
    free_port,
    post_json,
    start_envoy,
    start_epp,
    wait_until,
)

pytestmark = pytest.mark.e2e


def subset_hint(subset: list[str]) -> Callable[[dict[str, Any]], None]:
    """A set_metadata filter before ext_proc plays a gateway that narrows the pool."""

    def patch(cfg: dict[str, Any]) -> None:
        hcm = cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
        hcm["httpFilters"].insert(0, {
            "name": "envoy.filters.http.set_metadata",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                "metadata": [{"metadataNamespace": "envoy.lb.subset_hint",
                              "value": {"x-gateway-destination-endpoint-subset": subset}}],
            },
        })

    return patch


def test_subset_hint_limits_the_candidates(epp: EppProcess, fleet: UpstreamFleet) -> None:
    only = fleet.upstreams[1]
    envoy = start_envoy(epp.grpc_port, patch=subset_hint([only.hostport]))
    try:
        served = {post_json(envoy.url + "/v1/completions", COMPLETION).json()["served_by"] for _ in range(4)}
        assert served == {only.name}
    finally:
        envoy.proc.stop()


def test_subset_hint_matching_nothing_is_a_503(epp: EppProcess, fleet: UpstreamFleet) -> None:
    envoy = start_envoy(epp.grpc_port, patch=subset_hint(["10.9.9.9:1"]))
    try:
        r = post_json(envoy.url + "/v1/completions", COMPLETION)
        assert r.status == 503
        assert r.body == b"inference error: ServiceUnavailable - no endpoints match the subset hint"
    finally:
        envoy.proc.stop()


def test_epp_down_fails_closed(fleet: UpstreamFleet) -> None:
    # Nothing listens on the EPP port: Envoy must answer with an error and never fall back
    # to the host named by the client.
    target = fleet.upstreams[0]
    before = len(target.requests)
    envoy = start_envoy(free_port())
    try:
        r = post_json(envoy.url + "/v1/completions", COMPLETION,
                      headers={"x-gateway-destination-endpoint": target.hostport})
        assert r.status >= 500
        assert len(target.requests) == before
    finally:
        envoy.proc.stop()


def test_sigterm_drains_streams_in_flight(fleet: UpstreamFleet, endpoints_file: str) -> None:
    epp = start_epp(endpoints_file=endpoints_file)
    envoy = start_envoy(epp.grpc_port)
    results: list[tuple[int, bytes]] = []
    try:
        def client() -> None:
            # A slow streamed response keeps its ext_proc stream open while the EPP drains.
            r = post_json(envoy.url + "/v1/completions",
                          {**COMPLETION, "stream": True, "test_delay": 0.5})
            results.append((r.status, r.body))

        before = sum(len(u.requests) for u in fleet.upstreams)
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        # SIGTERM only once all four were routed (their streams are open), however slow
        # the machine: a fixed sleep could signal before a request reached the EPP.
        wait_until(lambda: sum(len(u.requests) for u in fleet.upstreams) - before >= 4,
                   15, "four streams in flight")
        epp.proc.p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        assert epp.proc.p.wait(20) == 0
        assert len(results) == 4
        for status, body in results:
            assert status == 200
            assert body.rstrip().endswith(b"data: [DONE]")
        assert "drained; exiting" in epp.proc.output()
        # Once drained, nothing routes: Envoy fails closed.
        assert post_json(envoy.url + "/v1/completions", COMPLETION).status >= 500
    finally:
        envoy.proc.stop()
        epp.proc.stop()
