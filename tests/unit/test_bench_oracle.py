"""The routing benchmark's oracle and its virtual-clock harness (benchmarks/routing)."""

from __future__ import annotations

from dataclasses import replace

from benchmarks.routing import desim
from benchmarks.routing.oracle import best, estimate
from benchmarks.routing.workload import SharedPrefixShape, shared_prefix_schedule
from epp.sim.config import SimConfig
from epp.sim.engine import Engine, Sequence
from epp.sim.tokens import text_prompt

CFG = SimConfig(model="m", port=0, num_gpu_blocks=512, block_size=16, max_num_seqs=8,
                max_num_batched_tokens=512, step_time=0.02, prefill_time_per_token=0.0002,
                decode_time_per_seq=0.0003)
PREFIX = "system prompt for group A. " * 40


def engines(n: int = 3) -> list[Engine]:
    return [Engine(replace(CFG, name=f"e{i}")) for i in range(n)]


def queue(e: Engine, prompt: str, k: int = 1) -> None:
    for j in range(k):
        seq = Sequence(request_id=f"{e.cfg.name}-{j}", prompt=text_prompt(prompt, 16),
                       max_tokens=8)
        e.waiting.append(seq)


def test_a_pod_with_the_prefix_queued_counts_as_cached() -> None:
    es = engines()
    queue(es[1], PREFIX + "first question")
    p = text_prompt(PREFIX + "second question", 16)
    est = [estimate(e, p, 8, None) for e in es]
    assert est[1].cached_tokens >= len(PREFIX) // 4 - 16 and est[0].cached_tokens == 0
    assert best(es, PREFIX + "second question", "m", 8, [{}] * 3) == 1


def test_a_long_queue_outweighs_the_cached_prefix() -> None:
    es = engines()
    queue(es[1], PREFIX + "first question")
    queue(es[1], "x" * 4000, k=30)  # long uncached prompts ahead
    assert best(es, PREFIX + "second question", "m", 8, [{}] * 3) != 1


def test_an_adapter_in_a_slot_saves_its_load_time() -> None:
    es = [Engine(replace(CFG, name=f"e{i}", lora_modules={"sql": "/a"}, max_loras=1,
                         lora_load_time=0.5)) for i in range(2)]
    es[1].lora_slots["sql"] = None
    assert best(es, "a unique prompt", "sql", 8, [{"sql": "/a"}] * 2) == 1


def test_desim_is_repeatable_and_the_oracle_keeps_groups_together() -> None:
    sims = [replace(CFG, name=f"s{i}", seed=i, num_gpu_blocks=2048) for i in range(4)]
    shape = SharedPrefixShape(num_groups=4, system_prompt_len=400, question_len=20,
                              output_len=8)
    sched = shared_prefix_schedule(shape, 20, 120, seed=5, model="m")
    a = desim.run(sims, sched, "oracle")
    assert a == desim.run(sims, sched, "oracle")
    rr = desim.run(sims, sched, "round-robin")
    epp = desim.run(sims, sched, "")
    assert a.prefix_hit_rate > rr.prefix_hit_rate and epp.prefix_hit_rate > rr.prefix_hit_rate
    assert a.ttft_p90 is not None and a.ttft_p90 > 0


def test_desim_feeds_kv_events_to_the_precise_scorer_of_every_replica(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from benchmarks.routing.stack import profile
    from benchmarks.routing.workload import StalePrefixShape, stale_prefix_schedule
    from epp.sim import tinytok

    tok = str(tinytok.write(tmp_path / "tok"))
    sims = [replace(CFG, name=f"s{i}", seed=i, tokenizer=tok) for i in range(4)]
    shape = StalePrefixShape(num_groups=12, prompts_per_group=2, system_prompt_len=300,
                             question_len=20, output_len=4)
    sched = stale_prefix_schedule(shape, 10, 120, seed=3, model="m")
    precise = profile({"queue-scorer": 1, "precise-prefix-cache-scorer": 3},
                      params={"precise-prefix-cache-scorer":
                              f'{{blockSize: 16, tokenizers: {{"m": "{tok}"}}}}'})
    a = desim.run(sims, sched, precise, replicas=2)
    assert a == desim.run(sims, sched, precise, replicas=2)
    # Replicas that scrape the pods themselves, at staggered times: as repeatable.
    own = desim.run(sims, sched, precise, replicas=2, own_scrapes=True)
    assert own == desim.run(sims, sched, precise, replicas=2, own_scrapes=True)
    rr = desim.run(sims, sched, "round-robin")
    assert a.prefix_hit_rate > rr.prefix_hit_rate and own.prefix_hit_rate > rr.prefix_hit_rate
    # Requests another client sends straight to the pods are left out of the figures,
    # and restarts (caches cleared) cost hits.
    assert desim.run(sims, sched, "round-robin", direct=1.0).ttft_p90 is None
    assert desim.run(sims, sched, precise, replicas=2, restart_every=0.5).prefix_hit_rate \
        < a.prefix_hit_rate
