"""deploy/kubernetes and deploy/helm/epp are well-formed and agree with the EPP's parsers.

(The k8s tests go further and apply deploy/kubernetes to a real API server.) The Helm
tests render the chart with `helm template`; helm is not a Debian package, so
tests/k8s/build_apiserver.sh builds it from Go modules into the same cache. Without it
those tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from epp.k8s.objects import parse_pool
from epp.k8s.settings import GROUP_V1
from epp.manifests import parse_manifests

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
CHART = ROOT / "deploy" / "helm" / "epp"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


ALL = sorted(K8S.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(K8S)) for p in ALL])
def test_every_manifest_is_yaml_with_kind_and_name(path):
    for d in docs(path):
        assert isinstance(d.get("apiVersion"), str) and isinstance(d.get("kind"), str)
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"]


def test_kustomization_lists_every_manifest_but_the_optional_ones():
    listed = set(docs(K8S / "kustomization.yaml")[0]["resources"])
    present = {str(p.relative_to(K8S)) for p in ALL
               if p.name != "kustomization.yaml" and p.parent.name != "optional"}
    assert listed == present


def test_crds_have_schemas_and_match_their_file_names():
    crds = [d for p in (K8S / "crds").glob("*.yaml") for d in docs(p)]
    assert {c["metadata"]["name"] for c in crds} == {
        "inferencepools.inference.networking.k8s.io",
        "inferencepools.inference.networking.x-k8s.io",
        "inferenceobjectives.inference.networking.x-k8s.io",
        "inferencemodelrewrites.inference.networking.x-k8s.io",
        "inferencemodels.inference.networking.x-k8s.io",
    }
    for c in crds:
        assert c["metadata"]["name"] == f"{c['spec']['names']['plural']}.{c['spec']['group']}"
        for v in c["spec"]["versions"]:
            spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
            assert spec["type"] == "object" and spec["properties"]


def test_example_pool_points_at_the_epp_service_and_parses():
    pool = docs(K8S / "inferencepool.yaml")[0]
    services = [d for d in docs(K8S / "epp.yaml") if d["kind"] == "Service"]
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == services[0]["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in services[0]["spec"]["ports"]]
    assert parse_pool(pool, GROUP_V1).target_ports == (8000,)


def test_epp_service_ports_and_grpc_health_probes():
    dep, svc = docs(K8S / "epp.yaml")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [9002, 9003, 9090]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}


def test_objectives_are_the_guides_and_parse():
    objs = {o.meta.key.name: o for o in parse_manifests((K8S / "objectives.yaml").read_text())}
    assert {n: o.priority for n, o in objs.items()} == {"food-review": 10, "llama3-base-model": 20}


def test_rbac_is_read_only_and_leases_are_optional():
    rules = [r for d in docs(K8S / "rbac.yaml") if d["kind"] == "Role" for r in d["rules"]]
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in rules)
    assert not any("leases" in r["resources"] for r in rules)
    ha = [r for d in docs(K8S / "optional" / "leader-election.yaml") if d["kind"] == "Role"
          for r in d["rules"]]
    assert ha == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                   "verbs": ["get", "create", "update"]}]


REVIEWER_RULES = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
     "verbs": ["create"]},
]


def test_epp_may_review_tokens_for_metrics_auth_and_nothing_more_cluster_wide():
    """--metrics-endpoint-auth asks the API server about scrapers' tokens: the EPP's only
    cluster-wide rights are creating TokenReviews and SubjectAccessReviews."""
    ds = docs(K8S / "rbac.yaml")
    (role,) = [d for d in ds if d["kind"] == "ClusterRole"]
    assert role["rules"] == REVIEWER_RULES
    (binding,) = [d for d in ds if d["kind"] == "ClusterRoleBinding"]
    sa = next(d for d in ds if d["kind"] == "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [sa["metadata"]["name"]]


def test_sim_pods_are_selected_by_the_pool():
    pool = docs(K8S / "inferencepool.yaml")[0]
    sim = docs(K8S / "sim.yaml")[0]
    labels = sim["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- Helm --------------------------------------------------------------------------


def helm() -> str | None:
    cache = Path(os.environ.get("EPP_K8S_CACHE", Path.home() / ".cache" / "epp-k8s"))
    for candidate in (os.environ.get("EPP_HELM"), shutil.which("helm"),
                      str(cache / "bin" / "helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


needs_helm = pytest.mark.skipif(helm() is None, reason="helm not found (build_apiserver.sh builds it)")


def render(*sets: str) -> list[dict]:
    args = [helm(), "template", "t", str(CHART), "--namespace", "ns"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_chart_values_load():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["provider"]["name"] == "none" and values["epp"]["replicas"] == 1


@needs_helm
def test_chart_default_render():
    out = render()
    kinds = sorted(d["kind"] for d in out)
    assert kinds == sorted(["Deployment", "Service", "ServiceAccount", "Role", "RoleBinding",
                            "ClusterRole", "ServiceAccount", "ClusterRoleBinding", "Secret",
                            "ClusterRole", "ClusterRoleBinding", "InferencePool"])
    pool = next(d for d in out if d["kind"] == "InferencePool")
    svc = next(d for d in out if d["kind"] == "Service")
    assert pool["spec"]["endpointPickerRef"]["name"] == svc["metadata"]["name"]
    role = next(d for d in out if d["kind"] == "Role")
    assert not any("leases" in r["resources"] for r in role["rules"])
    reviewer = next(d for d in out if d["kind"] == "ClusterRole"
                    and d["metadata"]["name"].endswith("-auth-reviewer"))
    assert reviewer["metadata"]["name"] == "vllm-llama3-8b-instruct-epp-ns-auth-reviewer"
    assert reviewer["rules"] == REVIEWER_RULES
    binding = next(d for d in out if d["kind"] == "ClusterRoleBinding"
                   and d["roleRef"]["name"] == reviewer["metadata"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": "ns",
                                    "name": "vllm-llama3-8b-instruct-epp"}]


@needs_helm
def test_chart_ha_adds_leases_and_the_flag():
    out = render("epp.replicas=2", "epp.leaderElection=true")
    dep = next(d for d in out if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert "--ha-enable-leader-election" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    role = next(d for d in out if d["kind"] == "Role")
    assert any("leases" in r["resources"] for r in role["rules"])


@needs_helm
@pytest.mark.parametrize("provider,kinds", [("gke", {"HealthCheckPolicy", "GCPBackendPolicy"}),
                                            ("istio", {"DestinationRule"})])
def test_chart_providers(provider, kinds):
    out = render(f"provider.name={provider}")
    assert kinds <= {d["kind"] for d in out}


@needs_helm
def test_chart_legacy_group_and_selector():
    out = render("inferencePool.group=inference.networking.x-k8s.io",
                 "inferencePool.selector.app=sim", "inferencePool.targetPorts={9000}")
    pool = next(d for d in out if d["kind"] == "InferencePool")
    assert pool["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
    assert pool["spec"]["targetPortNumber"] == 9000
    assert pool["spec"]["selector"]["app"] == "sim"


@needs_helm
def test_chart_rejects_unknown_provider():
    with pytest.raises(RuntimeError, match="provider.name"):
        render("provider.name=aws")
