"""The precise-prefix-cache-scorer on known indexes: what engines report wins over guesses,
and "unknown" falls back to the approximate index instead of scoring as "holds nothing"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from epp import observability as obs
from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics, Snapshot
from epp.kvevents.bound import BoundKVEventsSubscriber
from epp.kvevents.decode import BlockRemoved, BlockStored, EventBatch
from epp.kvevents.subscriber import EndpointStream, StreamAddress
from epp.director import Director
from epp.objectives import Resolution
from epp.request import InferenceRequest, parse_body
from epp.scheduling import Scheduler, SchedulingRequest
from epp.scheduling.precise_prefix import PrecisePrefixCacheScorer
from epp.sim import tinytok

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
NOW = 1000.0
SYSTEM = "You are a helpful assistant. Answer the question below in one short paragraph. " * 6
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a pod?"}]


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinytok.write(tmp_path_factory.mktemp("tok"))


def pool(*names: str) -> Snapshot:
    ds = Datastore(staleness_threshold=1e9)
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(names)])
    for n in names:
        ds.update_metrics(n, EndpointMetrics(waiting=0, running=0, kv_usage=0.1, scraped_at=NOW,
                                             models=frozenset({MODEL})))
    return ds.snapshot()


def live(scorer: PrecisePrefixCacheScorer, *names: str) -> None:
    """Mark endpoints' event streams healthy, as a connected subscription would be."""
    for n in names:
        s = EndpointStream(None, n, StreamAddress("tcp://x:1", None), scorer.index,  # type: ignore[arg-type]
                           block_size=scorer.block_size)
        s.connected = True
        s.on_stored = scorer.subscriber.on_stored  # as the subscriber wires its streams
        scorer.subscriber.streams[n] = s


def engine_holds(scorer: PrecisePrefixCacheScorer, name: str, ids: list[int], blocks: int) -> None:
    """What an engine's BlockStored event says after caching `blocks` blocks of `ids`."""
    bs = scorer.block_size
    hashes = [hash((name, i)) & 0xFFFFFFFF for i in range(blocks)]
    scorer.index.apply(name, [BlockStored(hashes, None, ids[: blocks * bs], bs, None, "GPU")])


def request(path: str, body: dict) -> SchedulingRequest:
    """As the director builds it from a parsed body."""
    raw = json.dumps(body).encode()
    req = InferenceRequest("r", path, body=raw, parsed=parse_body(path, raw))
    return Director._scheduling_request(req, Resolution(req.model, 0, None))


def chat_request() -> SchedulingRequest:
    return request("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})


def chat_ids(scorer: PrecisePrefixCacheScorer) -> list[int]:
    tok = scorer.tokenizers.get(MODEL)
    return tok.encode(tok.render_chat(MESSAGES), add_special_tokens=False)


def test_scores_are_leading_blocks_held_over_prompt_blocks(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)})
    snap = pool("a", "b", "c")
    live(scorer, "a", "b", "c")
    ids = chat_ids(scorer)
    total = len(ids) // 16
    assert total >= 4
    engine_holds(scorer, "a", ids, 2)
    engine_holds(scorer, "b", ids, total)
    sched = Scheduler([_profile(scorer)])
    res = sched.schedule(chat_request(), snap, explain=True, now=NOW)
    assert res.endpoint.name == "b"
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw == {"a": pytest.approx(2 / total), "b": 1.0, "c": 0.0}


async def test_prepare_tokenizes_before_the_cycle(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)})
    scorer.tokenizers.inline_max_chars = 10  # this prompt goes to the worker thread
    req = chat_request()
    sched = Scheduler([_profile(scorer)])
    await sched.prepare(req)
    assert req.prepared[scorer.name] == chat_ids(scorer)
    scorer.tokenizers.close()


def test_unknown_endpoints_get_the_approximate_score_not_zero(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)})
    snap = pool("a", "b")
    live(scorer, "b")  # a's stream is down
    sched = Scheduler([_profile(scorer)])
    # The approximate index learns from a pick (the gateway's subset hint allowed only a).
    assert sched.schedule(chat_request(), snap, [0], now=NOW).endpoint.name == "a"
    res = sched.schedule(chat_request(), snap, explain=True, now=NOW)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw["a"] > 0.9 and raw["b"] == 0.0


def test_the_approximate_fallback_learns_only_picks_it_is_asked_about(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)})
    snap = pool("a", "b")
    live(scorer, "a")  # b's stream is down
    sched = Scheduler([_profile(scorer)])
    sched.schedule(chat_request(), snap, [0], now=NOW)
    assert len(scorer.approx.index) == 0  # a is live: its events are the truth
    sched.schedule(chat_request(), snap, [1], now=NOW)
    assert len(scorer.approx.index) == 1  # b's pick: the fallback will be asked about b


def test_a_group_keeps_its_home_among_equal_holders(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)},
                                      speculative_ttl=0)
    snap = pool("a", "b")
    live(scorer, "a", "b")
    ids = chat_ids(scorer)
    sched = Scheduler([_profile(scorer)])
    sched.schedule(chat_request(), snap, [1], now=NOW)  # b serves the group first
    for name in ("a", "b"):  # then both engines report holding it
        engine_holds(scorer, name, ids, len(ids) // 16)
    res = sched.schedule(chat_request(), snap, explain=True, now=NOW)
    assert res.endpoint.name == "b"
    scores = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert scores["b"] == 1.0 and scores["a"] < 1.0


def test_without_a_tokenizer_it_is_the_approximate_scorer(tokdir: Path, tmp_path: Path) -> None:
    before = obs.REGISTRY.get_sample_value("inference_extension_precise_prefix_fallbacks_total",
                                           {"reason": "tokenizer_missing"}) or 0.0
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tmp_path / "gone")})
    snap = pool("a", "b")
    live(scorer, "a", "b")
    sched = Scheduler([_profile(scorer)])
    sched.schedule(chat_request(), snap, [0], now=NOW)
    res = sched.schedule(chat_request(), snap, explain=True, now=NOW)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw["a"] > 0.9 and raw["b"] == 0.0  # the approximate index's guess
    after = obs.REGISTRY.get_sample_value("inference_extension_precise_prefix_fallbacks_total",
                                          {"reason": "tokenizer_missing"})
    assert after == before + 2


def test_adapters_are_other_blocks(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)})
    snap = pool("a", "b")
    live(scorer, "a", "b")
    tok = scorer.tokenizers.get(MODEL)
    ids = tok.encode("The model server keeps a cache " * 10, True)
    engine_holds(scorer, "a", ids, 3)  # base model blocks
    bs = 16
    scorer.index.apply("b", [BlockStored([1, 2, 3], None, ids[:48], bs, medium="GPU",
                                         lora_name="food-review")])
    req = request("/v1/completions", {"model": "food-review",
                                      "prompt": "The model server keeps a cache " * 10})
    res = Scheduler([_profile(scorer)]).schedule(req, snap, explain=True, now=NOW)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw["a"] == 0.0 and raw["b"] > 0
    assert res.endpoint.name == "b"


def test_config_parameters(tokdir: Path) -> None:
    cfg = load_config(f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    blockSize: 32
    maxPrefixBlocksToMatch: 64
    kvEventsPort: 6000
    kvEventsReplayPort: 0
    maxIndexedBlocks: 1000
    speculativeTTLSeconds: 3
    tokenizers: {{"{MODEL}": "{tokdir}"}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
""")
    p = cfg.plugin("precise-prefix-cache-scorer")
    assert isinstance(p, PrecisePrefixCacheScorer)
    assert (p.block_size, p.max_blocks, p.subscriber.port, p.subscriber.replay_port,
            p.index.max_entries, p.speculative_ttl) == (32, 64, 6000, 0, 1000, 3.0)
    bad_values = ("blockSize: 0", "kvEventsPort: 70000", "tokenizers: [a]", "typo: 1",
                  "kvEventsConfig: {}", "kvEventsConfig: tcp://*:5557",
                  "kvEventsConfig: {zmqEndpoint: '*:5557'}",
                  "kvEventsConfig: {zmqEndpoint: 'tcp://*:70000'}",
                  "kvEventsConfig: {zmqEndpoint: 'tcp://*:5557', concurrency: 4}",
                  "kvEventsConfig: {zmqEndpoint: 'tcp://*:5557', topicFilter: 1}",
                  "kvEventsConfig: {zmqEndpoint: 'tcp://*:5557'}, kvEventsPort: 5557")
    for bad in bad_values:
        with pytest.raises(ValueError):
            load_config(f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {{{bad}}}
""")


def test_bound_mode_takes_llm_ds_parameter_names() -> None:
    """kvEventsConfig.zmqEndpoint: the EPP binds and engines connect (epp.kvevents.bound);
    replay only when asked for, since llm-d's engines usually have no replay socket."""
    cfg = load_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    kvEventsConfig: {zmqEndpoint: "tcp://*:5557", topicFilter: "kv@"}
""")
    p = cfg.plugin("precise-prefix-cache-scorer")
    assert isinstance(p.subscriber, BoundKVEventsSubscriber)
    assert (p.subscriber.bind, p.subscriber.topic_filter, p.subscriber.replay_port) == \
        ("tcp://*:5557", "kv@", 0)
    p = PrecisePrefixCacheScorer.from_params("p", {
        "kvEventsConfig": {"zmqEndpoint": "tcp://0.0.0.0:6000"}, "kvEventsReplayPort": 5558})
    assert isinstance(p.subscriber, BoundKVEventsSubscriber)
    assert (p.subscriber.bind, p.subscriber.topic_filter, p.subscriber.replay_port) == \
        ("tcp://0.0.0.0:6000", "kv@", 5558)
    p = PrecisePrefixCacheScorer.from_params("p", {})
    assert not isinstance(p.subscriber, BoundKVEventsSubscriber)  # connect mode is the default


def _profile(scorer: PrecisePrefixCacheScorer):  # type: ignore[no-untyped-def]
    from epp.scheduling.pickers import MaxScorePicker
    from epp.scheduling.profile import Profile

    return Profile("default", scorers=[(scorer, 1.0)], picker=MaxScorePicker("max-score-picker"))


def test_scores_are_numpy_and_bounded(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)})
    snap = pool("a")
    live(scorer, "a")
    engine_holds(scorer, "a", chat_ids(scorer), 1)
    from epp.scheduling.cycle import CycleState, Derived

    st = CycleState(Derived(snap), chat_request(), NOW, None)
    s = scorer.score(st, st.derived.all)
    assert isinstance(s, np.ndarray) and 0 < s[0] <= 1


def test_a_pick_counts_until_events_confirm_it_or_its_ttl_ends(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)},
                                      speculative_ttl=2.0, cold_score=0.0)  # matches only
    snap = pool("a", "b")
    live(scorer, "a", "b")
    sched = Scheduler([_profile(scorer)])
    sched.schedule(chat_request(), snap, [1], now=NOW)  # b is prefilling the prompt
    res = sched.schedule(chat_request(), snap, explain=True, now=NOW + 0.5, learn=False)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw == {"a": 0.0, "b": 1.0} and res.endpoint.name == "b"
    # No event came: after the TTL the guess is gone.
    res = sched.schedule(chat_request(), snap, explain=True, now=NOW + 2.5, learn=False)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw == {"a": 0.0, "b": 0.0} and scorer.speculative.size == 0


def test_a_pick_stored_and_evicted_before_the_next_read_claims_nothing(tokdir: Path) -> None:
    """On a pod whose cache turns over in seconds a cold group is stored and evicted
    between two of its requests; the pick must not claim it back for the rest of its TTL."""
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)},
                                      speculative_ttl=10.0, cold_score=0.0)  # matches only
    snap = pool("a", "b")
    live(scorer, "a", "b")
    sched = Scheduler([_profile(scorer)])
    sched.schedule(chat_request(), snap, [1], now=NOW)  # to b
    ids = chat_ids(scorer)
    n = len(ids) // scorer.block_size
    hashes = [7000 + i for i in range(n)]
    stream = scorer.subscriber.streams["b"]
    stream._apply(EventBatch(0, NOW + 1, [BlockStored(hashes, None, ids[: n * 16], 16, None, "GPU")]))
    stream._apply(EventBatch(1, NOW + 2, [BlockRemoved(hashes[::-1], "GPU")]))
    res = sched.schedule(chat_request(), snap, explain=True, now=NOW + 3, learn=False)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw == {"a": 0.0, "b": 0.0}


def test_token_id_prompts_need_no_tokenizer(tmp_path: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={})  # none configured
    snap = pool("a", "b")
    live(scorer, "a", "b")
    ids = list(range(1000, 1064))
    engine_holds(scorer, "b", ids, 4)
    req = request("/v1/completions", {"model": MODEL, "prompt": ids})
    res = Scheduler([_profile(scorer)]).schedule(req, snap, explain=True, now=NOW)
    raw = {c.endpoint: c.raw[scorer.name] for c in res.explanation.profiles[0].scores}
    assert raw == {"a": 0.0, "b": 1.0}


async def test_a_prompt_the_tokenizer_refuses_falls_back(tokdir: Path) -> None:
    scorer = PrecisePrefixCacheScorer(block_size=16, tokenizers={MODEL: str(tokdir)})
    snap = pool("a", "b")
    live(scorer, "a", "b")
    sched = Scheduler([_profile(scorer)])
    req = request("/v1/completions", {"model": MODEL, "prompt": "lone \ud800 surrogate " * 30})
    await sched.prepare(req)
    assert sched.schedule(req, snap, now=NOW).endpoint.name in ("a", "b")
    scorer.tokenizers.close()
