"""The active-active deployment variants agree with the base Deployment and the EPP's flags."""

from __future__ import annotations

import pytest

from epp.settings import parse_settings
from tests.unit.test_deploy_manifests import K8S, SELECTOR, docs, needs_helm, one, render

OPTIONAL = K8S / "optional"


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_the_patch_keeps_the_base_args_and_adds_state_sync() -> None:
    base = next(d for d in docs(K8S / "epp.yaml") if d["kind"] == "Deployment")
    (patch,) = docs(OPTIONAL / "active-active.yaml")
    assert patch["metadata"]["name"] == base["metadata"]["name"]
    assert patch["spec"]["replicas"] >= 2
    args = container(patch)["args"]
    assert args == container(base)["args"] + ["--state-sync=$(STATE_SYNC_URL)"]
    assert "--ha-enable-leader-election" not in args
    settings = parse_settings([a.replace("$(STATE_SYNC_URL)", "redis://r:6379")
                               for a in args])
    assert settings.state_sync == "redis://r:6379"


def test_the_replicas_spread_over_nodes_and_are_evicted_one_at_a_time() -> None:
    base = next(d for d in docs(K8S / "epp.yaml") if d["kind"] == "Deployment")
    labels = base["spec"]["selector"]["matchLabels"]
    (patch,) = docs(OPTIONAL / "active-active.yaml")
    (term,) = patch["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname",
                                       "labelSelector": {"matchLabels": labels}}
    (pdb,) = docs(OPTIONAL / "active-active-pdb.yaml")
    assert pdb["kind"] == "PodDisruptionBudget" and pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
    assert patch["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]


def test_the_secret_feeds_both_the_epp_and_the_trial_redis() -> None:
    (secret,) = docs(OPTIONAL / "state-sync-secret.yaml")
    (patch,) = docs(OPTIONAL / "active-active.yaml")
    (env,) = container(patch)["env"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    redis, service = docs(OPTIONAL / "redis.yaml")
    (pw,) = container(redis)["env"]
    assert pw["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                               "key": "password"}
    password = secret["stringData"]["password"]
    assert secret["stringData"]["url"] == (
        f"redis://:{password}@{service['metadata']['name']}:6379/0")


SYNC = ("inferenceExtension.stateSync.enabled=true",
        "inferenceExtension.stateSync.existingSecret=redis-url")


@needs_helm
def test_chart_state_sync_adds_the_flag_and_the_secret_and_no_leases() -> None:
    out = render(SELECTOR, *SYNC, "inferenceExtension.replicas=3")
    dep = one(out, "Deployment")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    c = container(dep)
    assert "--state-sync=$(STATE_SYNC_URL)" in c["args"]
    assert "--ha-enable-leader-election" not in c["args"]  # replicas > 1, yet no election
    env = {e["name"]: e for e in c["env"]}
    assert env["STATE_SYNC_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-url",
                                                                  "key": "url"}
    assert not [r for d in out if d["kind"] == "Role" for r in d["rules"]
                if "leases" in r["resources"]]


@needs_helm
def test_chart_state_sync_is_off_by_default_and_refuses_contradictions() -> None:
    dep = one(render(SELECTOR), "Deployment")
    assert not any(a.startswith("--state-sync") for a in container(dep)["args"])
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    with pytest.raises(RuntimeError, match="excludes inferenceExtension.leaderElection"):
        render(SELECTOR, *SYNC, "inferenceExtension.leaderElection=true")
    with pytest.raises(RuntimeError, match="existingSecret"):
        render(SELECTOR, "inferenceExtension.stateSync.enabled=true")
    with pytest.raises(RuntimeError, match="set inferenceExtension.stateSync instead"):
        render(SELECTOR, "inferenceExtension.flags.state-sync=redis://r:6379")


SPREAD = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
    "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                       "labelSelector": {"matchLabels": None}}}]}}


@needs_helm
def test_chart_active_active_gets_a_disruption_budget_and_spreads_over_nodes() -> None:
    out = render(SELECTOR, *SYNC, "inferenceExtension.replicas=2")
    dep = one(out, "Deployment")
    selector = dep["spec"]["selector"]["matchLabels"]
    pdb = one(out, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    affinity = dep["spec"]["template"]["spec"]["affinity"]
    term = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    term["podAffinityTerm"]["labelSelector"]["matchLabels"] = None
    assert affinity == SPREAD


@needs_helm
@pytest.mark.parametrize("sets", [
    (),  # one replica, no sync
    ("inferenceExtension.replicas=2",),  # leader election: one serves, the other waits
    (*SYNC,),  # one synced replica: nothing to spread
    (*SYNC, "inferenceExtension.replicas=2",
     "inferenceExtension.stateSync.podDisruptionBudget=false",
     "inferenceExtension.stateSync.spreadOverNodes=false"),
])
def test_chart_has_no_budget_or_spreading_unless_active_active_with_replicas(sets) -> None:
    out = render(SELECTOR, *sets)
    assert not [d for d in out if d["kind"] == "PodDisruptionBudget"]
    assert "affinity" not in one(out, "Deployment")["spec"]["template"]["spec"]


@needs_helm
def test_chart_affinity_given_wins_over_the_spreading() -> None:
    mine = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["cpu"]}]}]}}}
    out = render(SELECTOR, *SYNC, "inferenceExtension.replicas=3",
                 values={"inferenceExtension": {"affinity": mine}})
    assert one(out, "Deployment")["spec"]["template"]["spec"]["affinity"] == mine
    assert one(out, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
