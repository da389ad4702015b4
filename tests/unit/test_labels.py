"""Label hygiene: no client string can break `/metrics` or grow it without bound (issue 12)."""

from __future__ import annotations

import json
import time

from prometheus_client import generate_latest

from epp import observability as obs
from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.director import Director
from epp.labels import OTHER, LabelFolder, for_log, known_names, safe
from epp.manifests import parse_manifests
from epp.objectives import ObjectiveStore
from epp.request import ApiKind, InferenceRequest, ParsedBody, parse_body
from epp.scheduling import Scheduler


def pool(models: frozenset[str] = frozenset()) -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint("a", "10.0.0.1", 8000)])
    ds.update_metrics("a", EndpointMetrics(waiting=0, running=0, kv_usage=0.1,
                                           scraped_at=time.monotonic(), models=models))
    return ds


def request_for(model: str) -> InferenceRequest:
    """A request as parsed, built directly so that any model string can reach the director."""
    parsed = ParsedBody(ApiKind.COMPLETIONS, model, False, {"model": model, "prompt": "hi"})
    return InferenceRequest("r", "/v1/completions", body=b"{}", parsed=parsed)


def series_of(metric: str, prefix: str) -> set[str]:
    return {s.labels["model_name"] for m in obs.REGISTRY.collect() if m.name == metric
            for s in m.samples if s.labels.get("model_name", "").startswith(prefix)
            or s.labels.get("model_name") == OTHER}


def test_safe_values_are_bounded_and_encodable() -> None:
    assert safe("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert safe("bad\ud800model") == "bad\ufffdmodel"
    assert safe("two\nlines\x00") == "two\ufffdlines\ufffd"
    long = safe("x" * 10_000)
    assert len(long) == 128 and long.endswith("~")
    for s in ("bad\ud800", "\udfff" * 300, "é\x7f"):
        safe(s).encode("utf-8")  # never raises


def test_log_fields_are_one_printable_line() -> None:
    assert for_log("req-1") == "req-1"
    assert "\n" not in for_log("a\nb") and for_log("a b") == "'a b'"


async def test_a_lone_surrogate_model_never_breaks_the_exposition() -> None:
    d = Director(pool(), Scheduler.from_config(load_config(None)))
    req = request_for("bad\ud800model")
    decision = await d.route(req)
    d.finished(decision)
    text = generate_latest(obs.REGISTRY).decode()  # raised UnicodeEncodeError (issue 12)
    assert 'model_name="bad\ufffdmodel"' in text


def test_the_parser_rejects_a_lone_surrogate_model_with_400() -> None:
    body = json.dumps({"model": "bad\ud800model", "prompt": "x"}).encode()
    try:
        parse_body("/v1/completions", body)
    except Exception as e:
        assert getattr(e, "code").http_status == 400 and "Unicode" in str(e)
    else:
        raise AssertionError("accepted")


async def test_client_chosen_model_names_fold_into_other_past_the_cap() -> None:
    store = ObjectiveStore(None)
    store.replace_all(parse_manifests("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: InferenceModelRewrite
metadata: {name: capfold-rewrite}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {value: capfold-alias}}]
    targets: [{modelRewrite: capfold-target}]
"""))
    ds = pool(models=frozenset({"capfold-served"}))
    labels = LabelFolder(known_names(ds, store), cap=5)
    d = Director(ds, Scheduler.from_config(load_config(None)), resolver=store, labels=labels)
    for i in range(2000):
        req = request_for(f"capfold-random-{i}")
        d.finished(await d.route(req))
    for known in ("capfold-served", "capfold-alias"):
        req = request_for(known)
        d.finished(await d.route(req))
    seen = series_of("inference_objective_request", "capfold-")
    assert seen == {f"capfold-random-{i}" for i in range(5)} | {
        OTHER, "capfold-served", "capfold-alias"}
    assert labels.folded >= 2 * (2000 - 5)  # model and target of every later request
    targets = {s.labels["target_model_name"] for m in obs.REGISTRY.collect()
               if m.name == "inference_objective_request"
               for s in m.samples if s.labels.get("model_name") == "capfold-alias"}
    assert targets == {"capfold-target"}


def test_a_cap_of_zero_folds_every_unknown_name() -> None:
    labels = LabelFolder(lambda: {"known"}, cap=0)
    assert labels.label("known") == "known"
    assert labels.label("anything") == OTHER
    assert labels.label("") == ""
