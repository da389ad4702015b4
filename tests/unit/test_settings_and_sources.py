"""Flags keep the upstream names; endpoint lists and files are checked with clear errors."""

from __future__ import annotations

import argparse

import pytest

from epp.datastore import Datastore
from epp.settings import parse_bool, parse_duration, parse_settings
from epp.sources import EndpointsFileSource, parse_endpoint_list, parse_endpoints_yaml


def test_defaults_match_upstream() -> None:
    s = parse_settings([])
    assert (s.grpc_port, s.grpc_health_port, s.metrics_port) == (9002, 9003, 9090)
    assert s.secure_serving is True
    assert s.refresh_metrics_interval == pytest.approx(0.05)
    assert s.metrics_staleness_threshold == 2.0


def test_go_style_flags() -> None:
    s = parse_settings(["--secure-serving=false", "--refresh-metrics-interval=100ms",
                        "--v=3", "--endpoint-target-ports", "8000,8001"])
    assert s.secure_serving is False
    assert s.refresh_metrics_interval == pytest.approx(0.1)
    assert s.verbosity == 3
    assert s.endpoint_target_ports == [8000, 8001]


def test_observability_flags_are_off_by_default() -> None:
    s = parse_settings([])
    assert (s.tracing, s.log_format) == (False, "text")
    s = parse_settings(["--tracing", "--log-format", "json"])
    assert (s.tracing, s.log_format) == (True, "json")
    assert parse_settings(["--tracing=false"]).tracing is False
    with pytest.raises(SystemExit):
        parse_settings(["--log-format", "xml"])


@pytest.mark.parametrize("text, seconds", [("50ms", 0.05), ("2s", 2.0), ("1m30s", 90.0), ("0.5", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["fast", "10 parsecs", "", "5x"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(bad)


def test_bools() -> None:
    assert parse_bool("True") and not parse_bool("0")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bool("maybe")


def test_endpoint_list() -> None:
    eps = parse_endpoint_list("10.0.0.1:8000, 10.0.0.2:8000,[::1]:9000")
    assert [e.hostport for e in eps] == ["10.0.0.1:8000", "10.0.0.2:8000", "[::1]:9000"]


@pytest.mark.parametrize("bad", ["10.0.0.1", "10.0.0.1:http", ":80", "h:70000"])
def test_bad_endpoint_list(bad: str) -> None:
    with pytest.raises(ValueError, match="expected ip:port"):
        parse_endpoint_list(bad)


def test_endpoints_yaml() -> None:
    eps = parse_endpoints_yaml("- {name: a, address: 10.0.0.1, port: 8000, labels: {inference.networking.k8s.io/engine-type: sglang}}\n"
                               "- {address: 10.0.0.2, port: 8000}\n")
    assert eps[0].labels == {"inference.networking.k8s.io/engine-type": "sglang"}
    assert eps[1].name == "10.0.0.2:8000"


@pytest.mark.parametrize("text, message", [
    ("- {address: 10.0.0.1}", "port must be an integer"),
    ("- {name: a, address: x, port: 1}\n- {name: a, address: y, port: 2}", "duplicate endpoint names: a"),
    ("just text", "must be a list"),
    ("- 5", "expected a mapping"),
])
def test_bad_endpoints_yaml(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_endpoints_yaml(text)


async def test_endpoints_file_reload_keeps_last_good_set(tmp_path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text("- {name: a, address: 10.0.0.1, port: 8000}\n")
    ds = Datastore()
    src = EndpointsFileSource(ds, str(path))
    assert await src.load_once()
    assert [e.name for e in ds.endpoints()] == ["a"]
    path.write_text("- {name: a, address: 10.0.0.1}\n")  # broken edit
    assert not await src.load_once()
    assert [e.name for e in ds.endpoints()] == ["a"]
    path.write_text("- {name: b, address: 10.0.0.2, port: 8000}\n- {name: c, address: 10.0.0.3, port: 8000}\n")
    assert await src.load_once()
    assert sorted(e.name for e in ds.endpoints()) == ["b", "c"]
