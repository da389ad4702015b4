"""The Envoy configs we ship pass Envoy's own validation and match the generator."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from epp.envoyconfig import EnvoyOptions, render
from tests.support import ROOT, envoy_binary

SHIPPED = {
    "envoy.yaml": EnvoyOptions(epp_tls=False),
    "envoy-tls.yaml": EnvoyOptions(epp_tls=True),
}


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_is_valid_and_up_to_date(name: str) -> None:
    path = ROOT / "deploy" / "envoy" / name
    r = validate(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert path.read_text() == render(SHIPPED[name]), f"regenerate with: epp envoy-config ... > {path}"


@pytest.mark.parametrize("mode", ["buffered", "streamed", "full-duplex-streamed"])
def test_every_body_mode_validates(mode: str, tmp_path: Path) -> None:
    p = tmp_path / "envoy.yaml"
    p.write_text(render(EnvoyOptions(body_mode=mode, process_response=mode != "buffered")))
    r = validate(p)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_pitfalls_from_design_are_encoded() -> None:
    cfg = yaml.safe_load(render(EnvoyOptions()))
    hcm = cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    ext_proc = hcm["httpFilters"][0]["typedConfig"]
    assert ext_proc["processingMode"]["requestHeaderMode"] == "SEND"
    assert ext_proc.get("failureModeAllow", False) is False
    assert ext_proc["metadataOptions"]["receivingNamespaces"]["untyped"] == ["envoy.lb", "epp.response"]
    upstream = next(c for c in cfg["staticResources"]["clusters"] if c["type"] == "ORIGINAL_DST")
    assert upstream["originalDstLbConfig"]["httpHeaderName"] == "x-gateway-destination-endpoint"


def test_envoy_and_xds_protos_share_the_envoy_package() -> None:
    # Both install a top-level `envoy` package: the stubs must import and the binary exist.
    from envoy.service.ext_proc.v3 import external_processor_pb2  # noqa: F401

    assert Path(envoy_binary()).exists()


def test_several_epp_replicas_share_the_cluster_with_outlier_detection(tmp_path: Path) -> None:
    """Active-active: listed replicas (or one headless Service name) in the `epp` cluster;
    a replica that refuses connections is ejected at its first failure."""
    text = render(EnvoyOptions(epp_address="10.0.0.1:9002, epp-1.epp ,[fd00::3]:9100, fd00::4"))
    p = tmp_path / "envoy.yaml"
    p.write_text(text)
    r = validate(p)
    assert r.returncode == 0, r.stdout + r.stderr
    (epp,) = [c for c in yaml.safe_load(text)["staticResources"]["clusters"]
              if c["name"] == "epp"]
    addresses = [e["endpoint"]["address"]["socketAddress"]
                 for e in epp["loadAssignment"]["endpoints"][0]["lbEndpoints"]]
    assert [(a["address"], a["portValue"]) for a in addresses] == [
        ("10.0.0.1", 9002), ("epp-1.epp", 9002), ("fd00::3", 9100), ("fd00::4", 9002)]
    assert epp["outlierDetection"] == {
        "splitExternalLocalOriginErrors": True, "consecutiveLocalOriginFailure": 1,
        "enforcingConsecutiveLocalOriginFailure": 100, "interval": "1s",
        "baseEjectionTime": "10s", "maxEjectionPercent": 50}
    # A stream a dead replica refused is opened on another; nothing after the EPP saw it.
    grpc = ext_proc_of(yaml.safe_load(text))["grpcService"]
    assert grpc["retryPolicy"]["retryOn"] == "connect-failure,refused-stream"
    headless = yaml.safe_load(render(EnvoyOptions(epp_address="epp-headless",
                                                  epp_outlier_detection=True)))
    assert "outlierDetection" in headless["staticResources"]["clusters"][0]
    single = yaml.safe_load(render(EnvoyOptions()))
    assert "outlierDetection" not in single["staticResources"]["clusters"][0]
    assert "retryPolicy" not in ext_proc_of(single)["grpcService"]


def ext_proc_of(cfg: dict) -> dict:
    hcm = cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    return hcm["httpFilters"][0]["typedConfig"]


@pytest.mark.parametrize("address", ["epp:0", "epp:http", "epp:9002,", "[fd00::1]:x"])
def test_a_bad_epp_address_is_refused_by_the_command(address: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from epp.envoyconfig import main

    with pytest.raises(SystemExit) as e:
        main(["--epp-address", address])
    assert e.value.code == 2
    assert "--epp-address: not a host[:port]" in capsys.readouterr().err


def _hcm(o: EnvoyOptions) -> dict:
    cfg = yaml.safe_load(render(o))
    return cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]


def test_observed_response_path_waits_on_the_epp_only_for_rewritten_requests() -> None:
    hcm = _hcm(EnvoyOptions())
    routing, restorer, observer, router = hcm["httpFilters"]
    assert router["name"] == "envoy.filters.http.router"
    # The routing filter sees the request only, and says so to the EPP.
    mode = routing["typedConfig"]["processingMode"]
    assert mode["responseHeaderMode"] == "SKIP" and mode.get("responseBodyMode", "NONE") == "NONE"
    assert routing["typedConfig"]["grpcService"]["initialMetadata"] == [
        {"key": "x-epp-response-path", "value": "observed"}]
    assert observer["typedConfig"]["observabilityMode"] is True
    assert restorer["typedConfig"].get("observabilityMode", False) is False
    # Each route disables the response filter it does not use; the marker never goes upstream.
    marked, plain = hcm["routeConfig"]["virtualHosts"][0]["routes"]
    assert marked["match"]["headers"][0]["name"] == "x-gateway-model-name-restore"
    assert list(marked["typedPerFilterConfig"]) == [observer["name"]]
    assert list(plain["typedPerFilterConfig"]) == [restorer["name"]]
    for route in (marked, plain):
        assert route["requestHeadersToRemove"] == ["x-gateway-model-name-restore"]


@pytest.mark.parametrize("options", [
    EnvoyOptions(response_path="blocking"),
    EnvoyOptions(process_response=False),
    # Several replicas: each stream is balanced on its own, so the response is followed on
    # the routing stream (the observed path needs one replica to see all of a request).
    EnvoyOptions(epp_address="10.0.0.1:9002,10.0.0.2:9002"),
])
def test_blocking_and_request_only_configs_keep_one_filter(options: EnvoyOptions,
                                                           tmp_path: Path) -> None:
    hcm = _hcm(options)
    assert [f["name"] for f in hcm["httpFilters"]] == ["envoy.filters.http.ext_proc",
                                                       "envoy.filters.http.router"]
    assert "initialMetadata" not in hcm["httpFilters"][0]["typedConfig"]["grpcService"]
    p = tmp_path / "envoy.yaml"
    p.write_text(render(options))
    r = validate(p)
    assert r.returncode == 0, r.stdout + r.stderr
