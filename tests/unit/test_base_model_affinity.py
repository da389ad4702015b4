"""A mixed pool: adapter requests stay on LoRA-enabled pods, base-model requests go anywhere."""

from __future__ import annotations

import time

from epp.config import load_config
from epp.datalayer.engines import EngineRegistry
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import Scheduler, SchedulingRequest

BASE = "meta-llama/Llama-3.1-8B-Instruct"

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: lora-affinity
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: lora-affinity
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"""


def mixed_pool() -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint(f"p{i}", f"10.0.0.{i}", 8000) for i in range(4)])
    now = time.monotonic()
    for i in range(4):
        lora = i < 2  # p0, p1 run with --enable-lora; p2, p3 without
        ds.update_metrics(f"p{i}", EndpointMetrics(
            waiting=5 if lora else 0, running=1, kv_usage=0.2,
            max_lora=2 if lora else 0, models=frozenset({BASE}), scraped_at=now))
    return ds


def pick(model: str, ds: Datastore) -> str:
    s = Scheduler.from_config(load_config(CONFIG))
    return s.schedule(SchedulingRequest("r", model, "hi", {}, 0), ds.snapshot()).endpoint.name


def test_adapter_requests_go_only_where_an_adapter_can_load() -> None:
    # p2/p3 are idle but cannot load adapters: the request must not reach them (404 there).
    assert {pick("food-review", mixed_pool()) for _ in range(20)} <= {"p0", "p1"}


def test_base_model_requests_may_use_every_pod() -> None:
    assert {pick(BASE, mixed_pool()) for _ in range(20)} <= {"p2", "p3"}  # the idle ones


def test_base_model_names_come_from_the_model_name_label() -> None:
    page = ('vllm:num_requests_waiting{engine="0",model_name="%s"} 1\n'
            'vllm:num_requests_running{engine="0",model_name="%s"} 2\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="%s"} 0.5\n') % (BASE, BASE, BASE)
    m = EngineRegistry.from_config(None).for_labels({}).parse(page, 1.0)
    assert m.models == frozenset({BASE})
