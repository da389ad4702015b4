"""Exact prefix-cache routing end to end: epp-sim publishing KV events over ZeroMQ, the EPP
subscribed, a real Envoy in front.

The story: a long chat prompt is served by replica X; X then evicts its blocks (other long
prompts sent straight to X fill its small KV cache) while replica Y caches the prompt
(sent straight to Y). The approximate prefix-cache-scorer only knows what the EPP routed,
so it still says "X"; the engines' events say "Y". The request through Envoy goes to Y,
and Y reports the prompt's tokens as cached.

Both ways of getting the events: the EPP connecting to each replica's PUB socket (the
default), and the EPP binding one socket that every replica connects to
(`kvEventsConfig.zmqEndpoint`, llm-d's deployment; the topic names the replica).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from epp.sim import tinytok
from epp.v1 import pick_pb2, pick_pb2_grpc
from tests.support import (
    EnvoyProcess,
    EppProcess,
    Proc,
    free_port,
    post_json,
    scratch_dir,
    start_envoy,
    start_epp,
    wait_until,
)

pytestmark = pytest.mark.e2e

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
WORDS = ("model server cache token prefix route queue batch fast slow data pod food review "
         "great tasty design part metal question answer paragraph document reader").split()


def text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(words))


PROMPT = [{"role": "system", "content": "You are a helpful assistant. " + text(1, 220)},
          {"role": "user", "content": "What is a pod?"}]


@pytest.fixture(scope="module", params=["connect", "bound"])
def stack(request: pytest.FixtureRequest) -> Iterator[tuple[EppProcess, EnvoyProcess, dict[str, str]]]:
    mode = request.param
    d = Path(scratch_dir()) / f"precise-{mode}"
    tok = tinytok.write(d / "tokenizer")
    bind = f"tcp://127.0.0.1:{free_port()}"
    replicas = []
    for name in ("sim-x", "sim-y"):
        replicas.append({"name": name, "port": free_port(), "kv_events_port": free_port(),
                         "kv_events_replay_port": free_port()})
        if mode == "bound":
            replicas[-1]["kv_events_connect"] = bind
    (d / "fleet.yaml").write_text(yaml.safe_dump({
        "defaults": {"model": MODEL, "tokenizer": str(tok), "block_size": 16,
                     "num_gpu_blocks": 80, "max_model_len": 1280, "time_scale": 50.0},
        "replicas": replicas}))
    sim = Proc([sys.executable, "-m", "epp.sim", "--fleet-config", str(d / "fleet.yaml")], "sim")
    procs: list[Any] = [sim]
    try:
        wait_until(lambda: "ready" in sim.output() or sim.p.poll() is not None, 30, "epp-sim")
        assert sim.p.poll() is None, sim.output()
        urls = dict(re.findall(r"epp-sim: (sim-\w) (http://\S+)", sim.output()))
        (d / "endpoints.yaml").write_text(yaml.safe_dump([
            {"name": r["name"], "address": "127.0.0.1", "port": r["port"],
             "labels": {"kv-events.epp/port": str(r["kv_events_port"]),
                        "kv-events.epp/replay-port": str(r["kv_events_replay_port"])}}
            for r in replicas]))
        kv_events_config = (f"    kvEventsConfig: {{zmqEndpoint: '{bind}'}}\n"
                            if mode == "bound" else "")
        (d / "epp.yaml").write_text(f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: precise-prefix-cache-scorer
  parameters:
    blockSize: 16
    speculativeTTLSeconds: 0           # every precise score below comes from events
{kv_events_config}    tokenizers: {{"{MODEL}": "{tok}"}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv-cache-utilization-scorer
    weight: 1
  - pluginRef: prefix-cache-scorer   # weight 0: only shown, to compare with the guess
    weight: 0
  - pluginRef: precise-prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
""")
        epp = start_epp("--config-file", str(d / "epp.yaml"),
                        endpoints_file=str(d / "endpoints.yaml"))
        procs.append(epp.proc)
        envoy = start_envoy(epp.grpc_port)
        procs.append(envoy.proc)
        yield epp, envoy, urls
    finally:
        for p in reversed(procs):
            p.stop()


def chat(url: str, messages: list[dict[str, str]]) -> tuple[str, int]:
    """(replica that served it, prompt tokens it had cached)."""
    r = post_json(f"{url}/v1/chat/completions",
                  {"model": MODEL, "messages": messages, "max_tokens": 1})
    assert r.status == 200, r.body
    return r.headers["x-sim-replica"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def explain(epp: EppProcess) -> dict[str, dict[str, float]]:
    body = json.dumps({"model": MODEL, "messages": PROMPT}).encode()
    with grpc.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as ch:
        r = pick_pb2_grpc.PickerStub(ch).Explain(
            pick_pb2.PickRequest(body=body, path="/v1/chat/completions"), timeout=5)
    (profile,) = r.explanation.profiles
    return {c.endpoint_name: dict(c.raw) for c in profile.scores}


def test_routes_to_the_replica_that_really_holds_the_prefix(
        stack: tuple[EppProcess, EnvoyProcess, dict[str, str]]) -> None:
    epp, envoy, urls = stack
    x, _ = chat(envoy.url, PROMPT)  # through Envoy: the approximate index now says "x"
    y = next(n for n in urls if n != x)
    # Wait for x's BlockStored events, then evict them and cache the prompt on y.
    wait_until(lambda: explain(epp)[x]["precise-prefix-cache-scorer"] > 0.9, 10, "x's events")
    for seed in (2, 3):
        served, _ = chat(urls[x], [{"role": "user", "content": text(seed, 900)}])
        assert served == x
    assert chat(urls[y], PROMPT) == (y, 0)

    def indexed() -> bool:
        s = explain(epp)
        return s[y]["precise-prefix-cache-scorer"] > 0.9 and s[x]["precise-prefix-cache-scorer"] == 0
    wait_until(indexed, 10, "events of the eviction on x and the new blocks on y")
    scores = explain(epp)
    # The guess is still "x", where the EPP sent the prompt; the engines know better.
    assert scores[x]["prefix-cache-scorer"] > 0.9 and scores[y]["prefix-cache-scorer"] == 0

    served, cached = chat(envoy.url, PROMPT)
    assert served == y
    assert cached >= 16 * 10  # the engine really reused the blocks
