"""The Pick API and reflection, on a running EPP process beside ext_proc."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from epp.v1 import pick_pb2, pick_pb2_grpc
from tests.support import EppProcess, UpstreamFleet

pytestmark = pytest.mark.e2e


def stub(epp: EppProcess) -> pick_pb2_grpc.PickerStub:
    return pick_pb2_grpc.PickerStub(grpc.insecure_channel(f"127.0.0.1:{epp.grpc_port}"))


def test_pick_names_the_least_loaded_endpoint(epp: EppProcess, fleet: UpstreamFleet) -> None:
    r = stub(epp).Pick(pick_pb2.PickRequest(model="food-review", prompt="hello"), timeout=5)
    assert (r.endpoint_name, r.endpoint) == ("u1", fleet.by_name("u1").hostport)
    assert r.target_model == "food-review"


def test_explain_shows_every_candidate_and_scorer(epp: EppProcess) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = stub(epp).Explain(pick_pb2.PickRequest(body=body, path="/v1/chat/completions"), timeout=5)
    assert r.pick.endpoint_name == "u1"
    (profile,) = r.explanation.profiles
    assert {s.type for s in profile.scorers} == {
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer"}
    totals = {c.endpoint_name: c.total for c in profile.scores}
    assert set(totals) == {"u0", "u1", "u2"}
    assert max(totals, key=totals.get) == "u1"


def test_bad_pick_request_is_invalid_argument(epp: EppProcess) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub(epp).Pick(pick_pb2.PickRequest(body=b"{not json"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference error: BadRequest" in e.value.details()


def test_reflection_lists_the_services(epp: EppProcess) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{epp.grpc_port}")
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in resp.list_services_response.service}
    assert {"envoy.service.ext_proc.v3.ExternalProcessor", "epp.v1.Picker"} <= names


@pytest.mark.parametrize("symbol", ["envoy.service.ext_proc.v3.ExternalProcessor.Process",
                                    "epp.v1.Picker.Pick", "epp.v1.Picker"])
def test_reflection_resolves_methods_as_ghz_asks_for_them(epp: EppProcess, symbol: str) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(f"127.0.0.1:{epp.grpc_port}"))
    assert db.FindFileContainingSymbol(symbol).name.endswith(".proto")
