"""deploy/kubernetes and deploy/helm/epp are well-formed and agree with the EPP's parsers.

(The k8s tests go further and apply deploy/kubernetes to a real API server.) The Helm
tests render the chart with `helm template` (values as the upstream `inferencepool` chart
names them, checked by values.schema.json); helm is not a Debian package, so
tests/k8s/build_apiserver.sh builds it from Go modules into the same cache. Without it
those tests are skipped. tests/k8s/test_gke_guide.py installs the chart for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.config import DEFAULT_CONFIG_TEXT, load_config
from epp.datalayer.engines import EngineRegistry
from epp.k8s.objects import parse_pool
from epp.k8s.settings import GROUP_V1, GROUP_X
from epp.manifests import parse_manifests
from epp.settings import build_parser, parse_settings

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
        "inferenceobjectives.inference.networking.k8s.io",
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

RELEASE = "vllm-llama3-8b-instruct"
EPP = f"{RELEASE}-epp"
# The GKE guide's command: helm install vllm-llama3-8b-instruct --set <these> --version v1.0.0 ...
GUIDE_SETS = (f"inferencePool.modelServers.matchLabels.app={RELEASE}", "provider.name=gke")
SELECTOR = GUIDE_SETS[0]


def helm_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)


def render(*sets: str, values: dict[str, Any] | None = None) -> list[dict]:
    """`helm template` with `--set`s and, when given, a values file holding `values`."""
    args = ["template", RELEASE, str(CHART), "--namespace", "ns"]
    for s in sets:
        args += ["--set", s]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        if values is not None:
            yaml.safe_dump(values, f)
            f.flush()
            args += ["-f", f.name]
        out = helm_run(*args)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def container(docs: list[dict]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def args_of(docs: list[dict]) -> list[str]:
    return container(docs)["args"]


def config_in_use(docs: list[dict]) -> str:
    """The EndpointPickerConfig text that --config-file points at."""
    (path,) = [a.split("=", 1)[1] for a in args_of(docs) if a.startswith("--config-file=")]
    return one(docs, "ConfigMap")["data"][path.removeprefix("/config/")]


def test_chart_values_load():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["provider"]["name"] == "none"
    assert values["inferenceExtension"]["replicas"] == 1
    assert values["inferencePool"]["targetPorts"] == [{"number": 8000}]


@needs_helm
def test_guide_command_renders_the_pool_the_epp_and_the_gke_policies():
    out = render(*GUIDE_SETS)
    pool = one(out, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["name"] == RELEASE
    spec = parse_pool(pool, GROUP_V1)
    assert spec.selector == {"app": RELEASE} and spec.target_ports == (8000,)
    assert pool["spec"]["endpointPickerRef"] == {"kind": "Service", "name": EPP, "port": {"number": 9002},
                                                 "failureMode": "FailClose"}
    assert one(out, "Deployment")["metadata"]["name"] == EPP
    svc = one(out, "Service")
    assert svc["metadata"]["name"] == EPP
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "grpc-ext-proc": 9002, "grpc-health": 9003, "http-metrics": 9090}
    target = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": RELEASE}
    hc, backend = one(out, "HealthCheckPolicy"), one(out, "GCPBackendPolicy")
    assert hc["spec"]["targetRef"] == target and backend["spec"]["targetRef"] == target
    assert hc["spec"]["default"]["config"]["httpHealthCheck"] == {"requestPath": "/health", "port": 8000}
    assert backend["spec"]["default"]["timeoutSec"] == 300


@needs_helm
def test_rendered_args_are_flags_this_epp_accepts():
    out = render(SELECTOR, "inferenceExtension.flags.refresh-metrics-interval=100ms")
    ns = build_parser().parse_args(args_of(out))
    assert (ns.pool_name, ns.pool_namespace, ns.pool_group) == (RELEASE, "ns", GROUP_V1)
    assert (ns.grpc_port, ns.grpc_health_port, ns.metrics_port) == (9002, 9003, 9090)
    assert ns.config_file == "/config/default-plugins.yaml"
    assert ns.verbosity == 1 and ns.refresh_metrics_interval == 0.1
    assert ns.metrics_endpoint_auth is True and not ns.ha_enable_leader_election


@needs_helm
def test_default_plugins_file_is_the_default_profile_with_the_engine():
    """The chart spells out the EPP's built-in default, plus the engine."""
    text = config_in_use(render(SELECTOR))
    ours, builtin = yaml.safe_load(text), yaml.safe_load(DEFAULT_CONFIG_TEXT)
    assert ours["schedulingProfiles"] == builtin["schedulingProfiles"]
    assert {p["type"] for p in ours["plugins"]} == \
        {p["type"] for p in builtin["plugins"]} - {"single-profile-handler"}
    assert EngineRegistry.from_config(load_config(text).data).default == "vllm"


@needs_helm
@pytest.mark.parametrize("server_type", ["vllm", "sglang", "triton-tensorrt-llm", "trtllm-serve"])
def test_model_server_type_is_the_default_engine(server_type):
    cfg = load_config(config_in_use(render(SELECTOR, f"inferencePool.modelServerType={server_type}")))
    assert EngineRegistry.from_config(cfg.data).default == server_type


CUSTOM = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


@needs_helm
def test_custom_plugins_config_is_used_and_gets_the_engine_unless_it_names_one():
    out = render(SELECTOR, "inferencePool.modelServerType=trtllm-serve", values={"inferenceExtension": {
        "pluginsConfigFile": "custom.yaml",
        "pluginsCustomConfig": {"custom.yaml": CUSTOM,
                                "own-engine.yaml": CUSTOM + "data: {defaultEngine: sglang}\n"}}})
    cfg = load_config(config_in_use(out))
    assert "flowControl" in cfg.feature_gates and set(cfg.plugin_types) == {"queue-scorer", "max-score-picker"}
    assert cfg.data == {"defaultEngine": "trtllm-serve"}
    own = load_config(one(out, "ConfigMap")["data"]["own-engine.yaml"])
    assert own.data == {"defaultEngine": "sglang"}


@needs_helm
@pytest.mark.parametrize("flags", [
    {"v": 3, "max-body-bytes": 1048576},  # upstream v1.1+
    [{"name": "v", "value": 3}, {"name": "max-body-bytes", "value": 1048576}],  # upstream v1.0
], ids=["map", "list"])
def test_flags_in_either_upstream_form(flags):
    out = render(SELECTOR, values={"inferenceExtension": {"flags": flags}})
    ns = build_parser().parse_args(args_of(out))
    assert ns.verbosity == 3 and ns.max_body_bytes == 1048576


@needs_helm
@pytest.mark.parametrize("sets,message", [
    (("inferenceExtension.flags.total-queued-requests-metric=x",),
     "inferenceExtension.flags.total-queued-requests-metric: this EPP has no flag "
     "--total-queued-requests-metric"),
    (("inferenceExtension.flags.tracing=true",), "the chart sets --tracing"),
    (("inferenceExtension.flags.grpc-port=9100",),
     "the chart sets --grpc-port; set inferenceExtension.extProcPort instead"),
    (("inferenceExtension.flags.pool-name=other",), "the chart sets --pool-name"),
])
def test_flags_the_epp_lacks_or_the_chart_owns_fail_the_render(sets, message):
    with pytest.raises(RuntimeError, match=message.replace(".", r"\.")):
        render(SELECTOR, *sets)


@needs_helm
def test_tracing_passes_the_flag_and_upstreams_otel_variables():
    off = one(render(SELECTOR), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--tracing") for a in off["args"])
    assert not any(e["name"].startswith("OTEL_") for e in off["env"])
    out = render(SELECTOR, "inferenceExtension.tracing.enabled=true",
                 "inferenceExtension.tracing.otelExporterEndpoint=http://collector:4317",
                 "inferenceExtension.tracing.sampling.samplerArg=0.25")
    assert parse_settings(args_of(out)).tracing is True
    (c,) = one(out, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
    assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == (
        "parentbased_traceidratio", "0.25")
    assert env["OTEL_SERVICE_NAME"] == "gateway-api-inference-extension/epp"
    assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]


def test_chart_flag_list_is_the_epps():
    """The chart checks inferenceExtension.flags against this list; it must follow the CLI."""
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    start = text.index('define "epp.knownFlags"')
    listed = text[start:text.index("| toJson", start)]
    chart = set(listed.split('"')[3::2])
    parser = {o.lstrip("-") for a in build_parser()._actions for o in a.option_strings
              if o.startswith("--") and o != "--help"}
    assert chart == parser, ("update epp.knownFlags in deploy/helm/epp/templates/_helpers.tpl: "
                             f"missing {sorted(parser - chart)}, extra {sorted(chart - parser)}")


@needs_helm
def test_replicas_turn_leader_election_on_as_upstream():
    out = render(SELECTOR, "inferenceExtension.replicas=2")
    assert one(out, "Deployment")["spec"]["replicas"] == 2
    assert "--ha-enable-leader-election" in args_of(out)
    leases = [r for d in out if d["kind"] == "Role" for r in d["rules"] if "leases" in r["resources"]]
    assert leases == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "verbs": ["get", "create", "update"]}]
    off = render(SELECTOR, "inferenceExtension.replicas=2", "inferenceExtension.leaderElection=false")
    assert "--ha-enable-leader-election" not in args_of(off)
    assert not any("leases" in r["resources"] for d in off if d["kind"] == "Role" for r in d["rules"])


@needs_helm
def test_default_render_and_least_privilege():
    out = render(SELECTOR)
    assert sorted(d["kind"] for d in out) == sorted([
        "ConfigMap", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding",
        "ClusterRole", "ClusterRoleBinding", "InferencePool"])
    role = one(out, "Role")
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in role["rules"])
    reviewer = one(out, "ClusterRole")
    assert reviewer["metadata"]["name"] == f"{RELEASE}-ns-epp"
    assert reviewer["rules"] == REVIEWER_RULES
    assert one(out, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "namespace": "ns", "name": EPP}]
    probes = container(out)
    assert probes["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert probes["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}


@needs_helm
def test_image_in_either_upstream_form():
    assert container(render(SELECTOR, "inferenceExtension.image.registry=ghcr.io/me",
                            "inferenceExtension.image.tag=v1"))["image"] == "ghcr.io/me/epp:v1"
    assert container(render(SELECTOR, "inferenceExtension.image.hub=registry.example/x",
                            "inferenceExtension.image.name=epp", "inferenceExtension.image.tag=v2")
                     )["image"] == "registry.example/x/epp:v2"


@needs_helm
def test_istio_destination_rule():
    out = render(SELECTOR, "provider.name=istio",
                 "provider.istio.destinationRule.trafficPolicy.connectionPool.http.maxRequestsPerConnection=256000")
    dr = one(out, "DestinationRule")
    assert dr["spec"]["host"] == f"{EPP}.ns.svc.cluster.local"
    assert dr["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
    assert dr["spec"]["trafficPolicy"]["connectionPool"] == {"http": {"maxRequestsPerConnection": 256000}}


@needs_helm
def test_gke_request_timeout_is_ours_to_set():
    out = render(*GUIDE_SETS, "provider.gke.timeoutSec=600")
    assert one(out, "GCPBackendPolicy")["spec"]["default"]["timeoutSec"] == 600


@needs_helm
def test_prometheus_service_monitor_with_the_metrics_token():
    out = render(SELECTOR, "inferenceExtension.monitoring.prometheus.enabled=true")
    sm, secret = one(out, "ServiceMonitor"), one(out, "Secret")
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == EPP
    assert sm["spec"]["endpoints"][0]["authorization"]["credentials"] == {
        "key": "token", "name": secret["metadata"]["name"]}
    assert sm["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert {"nonResourceURLs": ["/metrics"], "verbs": ["get"]} in one(out, "ClusterRole")["rules"]
    no_auth = render(SELECTOR, "inferenceExtension.monitoring.prometheus.enabled=true",
                     "inferenceExtension.monitoring.prometheus.auth.enabled=false")
    assert "--metrics-endpoint-auth=false" in args_of(no_auth)
    assert not [d for d in no_auth if d["kind"] == "Secret"]


@needs_helm
def test_prometheus_on_gke_is_a_pod_monitoring_with_a_reader_account():
    out = render(*GUIDE_SETS, "inferenceExtension.monitoring.prometheus.enabled=true")
    assert not [d for d in out if d["kind"] == "ServiceMonitor"]
    pm = one(out, "PodMonitoring")
    assert pm["spec"]["selector"]["matchLabels"] == {"inferencepool": EPP}
    secret = one(out, "Secret")
    assert pm["spec"]["endpoints"][0]["authorization"]["credentials"]["secret"]["name"] == \
        secret["metadata"]["name"]
    binding = next(d for d in out if d["kind"] == "RoleBinding" and d["metadata"]["name"].startswith("gmp-system:"))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "collector", "namespace": "gmp-system"}]


@needs_helm
def test_legacy_pool_api_version():
    out = render(SELECTOR, "inferencePool.apiVersion=inference.networking.x-k8s.io/v1alpha2",
                 "inferencePool.targetPortNumber=9000")
    pool = one(out, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
    spec = parse_pool(pool, GROUP_X)
    assert spec.target_ports == (9000,) and spec.selector == {"app": RELEASE}
    assert pool["spec"]["extensionRef"]["name"] == EPP
    assert f"--pool-group={GROUP_X}" in args_of(out)


@needs_helm
def test_objectives_and_http_route():
    out = render(SELECTOR, "inferenceObjectives[0].name=food-review", "inferenceObjectives[0].priority=10",
                 "inferenceObjectives[1].name=llama3-base-model", "inferenceObjectives[1].priority=20",
                 "experimentalHttpRoute.enabled=true")
    text = yaml.safe_dump_all([d for d in out if d["kind"] == "InferenceObjective"])
    objs = {o.meta.key.name: o.priority for o in parse_manifests(text)}
    assert objs == {"food-review": 10, "llama3-base-model": 20}
    route = one(out, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["name"] == "inference-gateway"
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": RELEASE}]
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "300s"}
    on_gke = one(render(*GUIDE_SETS, "experimentalHttpRoute.enabled=true"), "HTTPRoute")
    assert "timeouts" not in on_gke["spec"]["rules"][0]  # the GCPBackendPolicy's timeout rules


@needs_helm
@pytest.mark.parametrize("sets,message", [
    ((), "inferencePool.modelServers.matchLabels is required"),
    ((SELECTOR, "inferencePool.selector.app=x"), "selector"),  # our chart's old name
    ((SELECTOR, "inferencePool.targetPorts={8000}"), "targetPorts"),  # must be [{number: 8000}]
    ((SELECTOR, "epp.replicas=2"), "epp"),
    ((SELECTOR, "inferenceExtension.replica=2"), "replica"),
    ((SELECTOR, "provider.name=aws"), "provider"),
    ((SELECTOR, "inferencePool.modelServerType=tgi"), "modelServerType"),
    ((SELECTOR, "inferenceExtension.latencyPredictor.enabled=true"), "latencyPredictor"),
    ((SELECTOR, "inferenceExtension.pluginsConfigFile=missing.yaml"), "missing.yaml"),
    ((SELECTOR, "istio.destinationRule.host=x"), "istio"),  # upstream v1.0's place: now provider.istio
])
def test_values_the_chart_does_not_take_fail_loudly(sets, message):
    with pytest.raises(RuntimeError, match=message):
        render(*sets)


@needs_helm
def test_helm_lint_passes_with_the_schema():
    r = helm_run("lint", "--strict", str(CHART), "--set", SELECTOR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (CHART / "values.schema.json").is_file()
