"""Deterministic request schedules for the routing benchmark.

Two shapes, as the field benchmarks them:

- **shared prefix**: `num_groups` long system prompts, each followed by one of
  `prompts_per_group` questions (think: many tenants, each with its own instructions and
  RAG context). Requests pick a (group, question) pair uniformly at random, so every group
  recurs and a router that keeps a group on the same server skips most of the prefill.
- **skewed shared prefix**: the same, but groups have Zipf popularity (`zipf_s` > 0), so
  the hottest group alone can need more than one server even when fully cached: a router
  must spread it without scattering the cold groups.
- **multi-LoRA**: `num_adapters` adapters on one base model with Zipf popularity
  (adapter of rank k drawn with probability proportional to 1 / k**s); a router that keeps
  an adapter where it is loaded avoids swapping it in and out of the GPU slots.

Arrivals are a Poisson process (exponential gaps at rate `qps`). Everything is drawn from
one `random.Random(seed)`, so a (shape, qps, count, seed) tuple always gives the same
schedule byte for byte. Lengths are in tokens of ~4 characters, the approximation the
simulator uses, so `system_prompt_len` tokens of text cost that many prefill tokens there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4
_WORDS = (
    "the", "model", "server", "token", "cache", "batch", "queue", "route", "fast", "slow",
    "data", "pod", "of", "and", "to", "is", "a", "for", "food", "review", "great", "tasty",
    "design", "part", "metal", "order", "ship", "price", "policy", "user", "answer", "ask",
)


@dataclass(frozen=True)
class SharedPrefixShape:
    """Groups of prompts sharing a long system prompt (lengths in tokens)."""

    num_groups: int = 32
    prompts_per_group: int = 16
    system_prompt_len: int = 1500
    question_len: int = 100
    output_len: int = 32
    zipf_s: float = 0.0
    """Group popularity: 0 = uniform; s > 0 draws the group of rank k with probability
    proportional to 1 / k**s (rank 1 hottest)."""

    def validate(self) -> SharedPrefixShape:
        for name in ("num_groups", "prompts_per_group", "question_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.zipf_s >= 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")
        if self.system_prompt_len < 0:
            raise ValueError(f"system_prompt_len must be >= 0, got {self.system_prompt_len}")
        return self


    def popularity(self) -> list[float]:
        """Probability of each group, hottest first; sums to 1."""
        w = [1.0 / (k + 1) ** self.zipf_s for k in range(self.num_groups)]
        total = sum(w)
        return [x / total for x in w]


SKEWED_PREFIX = SharedPrefixShape(zipf_s=2.0)
"""The skewed shape of the routing benchmark: group 0 takes 43 % of the requests, which at
48 requests/s (where round-robin saturates on the uniform shape) is ~21 requests/s, more
than one simulated pod serves with its prefix cached (~16-19/s before its TTFT climbs);
the next groups take 15 %, 8 %, 5 %, ..."""


@dataclass(frozen=True)
class StalePrefixShape:
    """Where an approximate prefix index goes stale: more groups than the fleet's KV caches
    hold, long system prompts so that eviction never stops, Zipf-skewed popularity (a
    few hot groups, a long tail that keeps evicting). Lengths in ~4-character tokens."""

    num_groups: int = 150
    prompts_per_group: int = 8
    system_prompt_len: int = 1500
    question_len: int = 60
    output_len: int = 16
    zipf_s: float = 1.0

    def shared(self) -> SharedPrefixShape:
        return SharedPrefixShape(self.num_groups, self.prompts_per_group, self.system_prompt_len,
                                 self.question_len, self.output_len).validate()


@dataclass(frozen=True)
class LoraShape:
    """Requests spread over adapters of Zipf popularity (lengths in tokens)."""

    num_adapters: int = 8
    zipf_s: float = 1.0
    prompt_len: int = 200
    output_len: int = 32
    adapter_prefix: str = "adapter-"

    def validate(self) -> LoraShape:
        if self.num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {self.num_adapters}")
        if self.zipf_s < 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError("prompt_len and output_len must be >= 1")
        return self

    @property
    def adapters(self) -> list[str]:
        """Adapter names, most popular first."""
        return [f"{self.adapter_prefix}{k}" for k in range(self.num_adapters)]

    def popularity(self) -> list[float]:
        """Probability of each adapter (same order as `adapters`); sums to 1."""
        w = [1.0 / (k + 1) ** self.zipf_s for k in range(self.num_adapters)]
        total = sum(w)
        return [x / total for x in w]


@dataclass(frozen=True)
class Request:
    """One request of a schedule: when to send it (seconds from the start) and what."""

    at: float
    model: str
    prompt: str
    max_tokens: int
    group: int = -1
    """Shared-prefix group, or adapter rank for the LoRA shape."""
    labels: dict[str, str] = field(default_factory=dict)

    def body(self, stream: bool = True) -> dict[str, Any]:
        """The OpenAI /v1/completions body (streaming with a final usage chunk)."""
        b: dict[str, Any] = {"model": self.model, "prompt": self.prompt,
                             "max_tokens": self.max_tokens, "temperature": 0}
        if stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        return b


def poisson_arrivals(qps: float, count: int, rng: random.Random) -> list[float]:
    """`count` arrival times of a Poisson process of rate `qps`, starting after 0."""
    if not qps > 0:
        raise ValueError(f"qps must be > 0, got {qps!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(qps)
        out.append(t)
    return out


def random_text(tokens: int, rng: random.Random, head: str = "") -> str:
    """Exactly `tokens` * 4 characters of word salad starting with `head`."""
    want = tokens * CHARS_PER_TOKEN
    parts = [head] if head else []
    size = len(head)
    while size < want:
        w = rng.choice(_WORDS)
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)[:want]


def shared_prefix_schedule(shape: SharedPrefixShape, qps: float, count: int, seed: int = 0,
                           model: str = "meta-llama/Llama-3.1-8B-Instruct") -> list[Request]:
    """`count` shared-prefix requests arriving as a Poisson process of rate `qps`."""
    shape.validate()
    rng = random.Random(seed)
    systems = [random_text(shape.system_prompt_len, rng, head=f"[group {g}]")
               if shape.system_prompt_len else "" for g in range(shape.num_groups)]
    questions = [[random_text(shape.question_len, rng, head=f"[q {g}.{q}]")
                  for q in range(shape.prompts_per_group)] for g in range(shape.num_groups)]
    times = poisson_arrivals(qps, count, rng)
    weights = shape.popularity() if shape.zipf_s > 0 else None
    out = []
    for t in times:
        if weights is None:  # uniform: the draws of the original shape, byte for byte
            g = rng.randrange(shape.num_groups)
        else:
            g = rng.choices(range(shape.num_groups), weights=weights)[0]
        q = rng.randrange(shape.prompts_per_group)
        out.append(Request(at=t, model=model, prompt=systems[g] + questions[g][q],
                           max_tokens=shape.output_len, group=g))
    return out


def lora_schedule(shape: LoraShape, qps: float, count: int, seed: int = 0) -> list[Request]:
    """`count` requests over Zipf-popular adapters, Poisson arrivals of rate `qps`.

    Each prompt is unique (no shared prefix), so only adapter placement matters.
    """
    shape.validate()
    rng = random.Random(seed)
    names, weights = shape.adapters, shape.popularity()
    times = poisson_arrivals(qps, count, rng)
    ranks = rng.choices(range(shape.num_adapters), weights=weights, k=count)
    out = []
    for i, (t, k) in enumerate(zip(times, ranks)):
        prompt = random_text(shape.prompt_len, rng, head=f"[r {i}]")
        out.append(Request(at=t, model=names[k], prompt=prompt,
                           max_tokens=shape.output_len, group=k))
    return out


def stale_prefix_schedule(shape: StalePrefixShape, qps: float, count: int, seed: int = 0,
                          model: str = "meta-llama/Llama-3.1-8B-Instruct") -> list[Request]:
    """`count` requests of Zipf-popular groups (rank k with weight 1 / (k+1)**s)."""
    base = shape.shared()
    rng = random.Random(seed)
    systems = [random_text(base.system_prompt_len, rng, head=f"[group {g}]")
               for g in range(base.num_groups)]
    questions = [[random_text(base.question_len, rng, head=f"[q {g}.{q}]")
                  for q in range(base.prompts_per_group)] for g in range(base.num_groups)]
    weights = [1.0 / (k + 1) ** shape.zipf_s for k in range(base.num_groups)]
    times = poisson_arrivals(qps, count, rng)
    groups = rng.choices(range(base.num_groups), weights=weights, k=count)
    return [Request(at=t, model=model, prompt=systems[g] + questions[g][rng.randrange(base.prompts_per_group)],
                    max_tokens=base.output_len, group=g) for t, g in zip(times, groups)]


SHAPES = ("shared-prefix", "skewed-prefix", "lora")


def schedule_for(shape_name: str, qps: float, count: int, seed: int,
                 model: str = "meta-llama/Llama-3.1-8B-Instruct") -> list[Request]:
    """The schedule of one of the routing benchmark's `SHAPES` (LoRA requests name their
    adapter as the model; the prefix shapes use `model`)."""
    if shape_name == "lora":
        return lora_schedule(LoraShape(), qps, count, seed=seed)
    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r} (known: {', '.join(SHAPES)})")
    shape = SKEWED_PREFIX if shape_name == "skewed-prefix" else SharedPrefixShape()
    return shared_prefix_schedule(shape, qps, count, seed=seed, model=model)
