"""The rules that turn Kubernetes objects into endpoints, without an API server."""

from __future__ import annotations

import random

import pytest

from epp.k8s.objects import (
    InvalidObject,
    parse_pool,
    pod_endpoints,
    pod_is_ready,
    references_pool,
)
from epp.k8s.reflector import Backoff
from epp.k8s.settings import (
    GROUP_V1,
    GROUP_X,
    KubernetesSettings,
    SettingsError,
    parse_ports,
    parse_selector,
)


def pod(name="vllm-0", ip="10.0.0.1", ready=True, labels=None, annotations=None,
        deleting=False):
    meta = {"name": name, "namespace": "ns", "labels": labels or {"app": "vllm"},
            "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "status": {"podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


V1_POOL = {"metadata": {"name": "p", "namespace": "ns", "resourceVersion": "7"},
           "spec": {"selector": {"matchLabels": {"app": "vllm"}},
                    "targetPorts": [{"number": 8000}, {"number": 8001}],
                    "appProtocol": "kubernetes.io/h2c",
                    "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}


def test_v1_pool_reads_match_labels_ports_protocol_and_picker():
    p = parse_pool(V1_POOL, GROUP_V1)
    assert (p.name, p.namespace, dict(p.selector)) == ("p", "ns", {"app": "vllm"})
    assert p.target_ports == (8000, 8001)
    assert p.app_protocol == "kubernetes.io/h2c"
    assert p.endpoint_picker["name"] == "epp"


def test_v1alpha2_pool_reads_flat_selector_and_target_port_number():
    obj = {"metadata": {"name": "p", "namespace": "ns"},
           "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000,
                    "extensionRef": {"name": "epp"}}}
    p = parse_pool(obj, GROUP_X)
    assert p.target_ports == (8000,) and dict(p.selector) == {"app": "vllm"}
    assert p.app_protocol == "http"


@pytest.mark.parametrize("spec", [
    {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 8000}]},
    {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": []},
    {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 70000}]},
    {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 1}, {"number": 1}]},
    {"selector": {"matchLabels": {"app": 3}}, "targetPorts": [{"number": 8000}]},
])
def test_unusable_pool_specs_are_rejected(spec):
    with pytest.raises(InvalidObject):
        parse_pool({"metadata": {"name": "p"}, "spec": spec}, GROUP_V1)


def test_each_ready_pod_and_port_is_one_ranked_endpoint():
    eps = pod_endpoints(pod(), {"app": "vllm"}, (8000, 8001))
    assert [(e.name, e.hostport) for e in eps] == [("vllm-0-rank-0", "10.0.0.1:8000"),
                                                  ("vllm-0-rank-1", "10.0.0.1:8001")]
    assert eps[0].labels == {"app": "vllm"}


def test_active_ports_annotation_keeps_the_rank_of_each_port():
    p = pod(annotations={"inference.networking.k8s.io/active-ports": "8001"})
    assert [e.name for e in pod_endpoints(p, {"app": "vllm"}, (8000, 8001))] == ["vllm-0-rank-1"]


@pytest.mark.parametrize("p", [pod(ready=False), pod(ip=""), pod(deleting=True),
                               pod(labels={"app": "other"})])
def test_unready_unaddressed_deleting_or_unselected_pods_give_nothing(p):
    assert pod_endpoints(p, {"app": "vllm"}, (8000,)) == []


def test_pod_without_ready_condition_is_not_ready():
    p = pod()
    p["status"]["conditions"] = []
    assert not pod_is_ready(p)


def test_objects_match_the_pool_by_pool_ref():
    def obj(ref):
        return {"spec": {"poolRef": ref}}

    assert references_pool(obj({"name": "p"}), "p", GROUP_V1)
    assert references_pool(obj({"name": "p", "group": GROUP_X}), "p", GROUP_V1)
    assert not references_pool(obj({"name": "q"}), "p", GROUP_V1)
    assert not references_pool(obj({"name": "p", "kind": "Service"}), "p", GROUP_V1)
    assert not references_pool({"spec": {}}, "p", GROUP_V1)


def test_selector_and_port_flags():
    assert parse_selector("app=vllm, tier==gpu") == {"app": "vllm", "tier": "gpu"}
    assert parse_ports("8000,8001") == (8000, 8001)
    for bad in ("app", "app!=x", ""):
        with pytest.raises(SettingsError):
            parse_selector(bad)
    for bad in ("x", "0", "8000,8000", ""):
        with pytest.raises(SettingsError):
            parse_ports(bad)


def test_settings_need_a_pool_or_a_selector_with_ports():
    KubernetesSettings(pool_name="p")
    KubernetesSettings(endpoint_selector={"app": "x"}, endpoint_target_ports=(8000,))
    for kwargs in ({}, {"pool_name": "p", "endpoint_selector": {"a": "b"}},
                   {"endpoint_selector": {"a": "b"}}, {"pool_name": "p", "pool_group": "x.io"},
                   {"pool_name": "p", "leader_election": True, "lease_duration": 5,
                    "renew_deadline": 5}):
        with pytest.raises(SettingsError):
            KubernetesSettings(**kwargs)


def test_backoff_doubles_to_a_cap_with_jitter_and_resets():
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next() for _ in range(6)]
    caps = [0.5, 1, 2, 4, 4, 4]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps))
    assert len(set(delays)) == len(delays)  # jittered, not lockstep
    b.reset()
    assert b.next() <= 0.5
