"""ObjectiveStore: priorities from objectives, model rewrites, precedence and pool filtering."""

from __future__ import annotations

import pytest

from epp.manifests import parse_manifests
from epp.objectives import (
    CRITICALITY_PRIORITY,
    KIND_OBJECTIVE,
    KIND_REWRITE,
    InferenceModel,
    InferenceModelRewrite,
    InferenceObjective,
    ObjectiveStore,
    ObjectKey,
    ObjectMeta,
    Resolution,
    RewriteRule,
    WeightedTarget,
)

POOL = "vllm-llama3-8b-instruct"

GKE_GUIDE = f"""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: llama3-base-model}}
spec:
  priority: 20
  poolRef: {{name: {POOL}}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: food-review}}
spec:
  priority: 10
  poolRef: {{name: {POOL}}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: batch}}
spec:
  priority: -1
  poolRef: {{name: {POOL}}}
"""


def store_from(text: str, pool: str = POOL) -> ObjectiveStore:
    store = ObjectiveStore(pool)
    store.replace_all(parse_manifests(text))
    return store


def meta(kind: str, name: str, created: float = float("inf"), pool: str = POOL,
         namespace: str = "default") -> ObjectMeta:
    return ObjectMeta(ObjectKey(kind, namespace, name), pool, created)


def test_objective_header_gives_priority() -> None:
    store = store_from(GKE_GUIDE)
    assert store.resolve("llama3", "llama3-base-model", None, 0.5) == Resolution("llama3", 20, "llama3-base-model")
    assert store.resolve("food-review-1", "food-review", None, 0.5).priority == 10
    assert store.resolve("llama3", "batch", None, 0.5).priority == -1


def test_unknown_or_absent_objective_is_priority_zero() -> None:
    store = store_from(GKE_GUIDE)
    assert store.resolve("llama3", "no-such-objective", None, 0.5) == Resolution("llama3", 0, None)
    assert store.resolve("llama3", None, None, 0.5) == Resolution("llama3", 0, None)
    assert ObjectiveStore(POOL).resolve("m", "x", None, 0.0) == Resolution("m", 0, None)


REWRITES = f"""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {{name: canary, creationTimestamp: "2025-01-02T00:00:00Z"}}
spec:
  poolRef: {{group: inference.networking.k8s.io, name: {POOL}}}
  rules:
    - matches: [{{model: {{type: Exact, value: food-review}}}}]
      targets:
        - {{modelRewrite: food-review-v1, weight: 90}}
        - {{modelRewrite: food-review-v2, weight: 10}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {{name: fallback, creationTimestamp: "2025-01-01T00:00:00Z"}}
spec:
  poolRef: {{name: {POOL}}}
  rules:
    - targets: [{{modelRewrite: base-model}}]
"""


def test_weighted_targets_follow_rand() -> None:
    store = store_from(REWRITES)
    assert store.resolve("food-review", None, None, 0.0).target_model == "food-review-v1"
    assert store.resolve("food-review", None, None, 0.8999).target_model == "food-review-v1"
    assert store.resolve("food-review", None, None, 0.9).target_model == "food-review-v2"
    assert store.resolve("food-review", None, None, 0.99999).target_model == "food-review-v2"


def test_weights_split_traffic_in_proportion() -> None:
    store = store_from(REWRITES)
    picks = [store.resolve("food-review", None, None, i / 1000).target_model for i in range(1000)]
    assert picks.count("food-review-v2") == 100


def test_exact_match_beats_older_generic_rule() -> None:
    # `fallback` is older, but an exact rule wins over a generic one.
    store = store_from(REWRITES)
    assert store.resolve("food-review", None, None, 0.0).target_model == "food-review-v1"
    assert store.resolve("anything-else", None, None, 0.0).target_model == "base-model"


def test_header_overrides_rewrite_rules() -> None:
    store = store_from(REWRITES)
    r = store.resolve("food-review", None, "my-adapter", 0.0)
    assert r.target_model == "my-adapter"


def test_oldest_object_wins_a_tie() -> None:
    older = InferenceModelRewrite(meta(KIND_REWRITE, "b-old", created=100.0),
                                  (RewriteRule(("m",), (WeightedTarget("from-old"),)),))
    newer = InferenceModelRewrite(meta(KIND_REWRITE, "a-new", created=200.0),
                                  (RewriteRule(("m",), (WeightedTarget("from-new"),)),))
    store = ObjectiveStore(POOL)
    store.upsert(newer)
    store.upsert(older)
    assert store.resolve("m", None, None, 0.0).target_model == "from-old"
    store.delete(older.meta.key)
    assert store.resolve("m", None, None, 0.0).target_model == "from-new"


def test_without_timestamps_first_seen_is_oldest() -> None:
    text = "\n---\n".join(
        f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: shared, namespace: {ns}}}
spec: {{priority: {p}, poolRef: {{name: {POOL}}}}}""" for ns, p in (("zz", 5), ("aa", 7)))
    assert store_from(text).resolve("m", "shared", None, 0.0).priority == 5


def test_legacy_inference_model_criticality_and_targets() -> None:
    text = f"""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: chatbot}}
spec:
  modelName: chatbot
  criticality: Sheddable
  poolRef: {{name: {POOL}}}
  targetModels:
    - {{name: chatbot-v1, weight: 1}}
    - {{name: chatbot-v2, weight: 1}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {{name: vip}}
spec: {{modelName: vip, criticality: Critical, poolRef: {{name: {POOL}}}}}
"""
    store = store_from(text)
    assert store.resolve("chatbot", None, None, 0.1) == Resolution("chatbot-v1", -1, "chatbot")
    assert store.resolve("chatbot", None, None, 0.6).target_model == "chatbot-v2"
    assert store.resolve("vip", None, None, 0.0) == Resolution("vip", 1, "vip")
    # An explicit InferenceObjective header wins over the legacy criticality.
    store.upsert(InferenceObjective(meta(KIND_OBJECTIVE, "gold"), 50))
    assert store.resolve("chatbot", "gold", None, 0.1).priority == 50


def test_criticality_mapping_is_documented_order() -> None:
    assert CRITICALITY_PRIORITY["Critical"] > CRITICALITY_PRIORITY["Standard"] == 0
    assert CRITICALITY_PRIORITY["Sheddable"] < 0


def test_new_rewrite_kind_beats_legacy_targets_but_legacy_beats_generic() -> None:
    store = ObjectiveStore(POOL)
    store.upsert(InferenceModel(meta("InferenceModel", "legacy", created=1.0), "m",
                                targets=(WeightedTarget("legacy-target"),)))
    store.upsert(InferenceModelRewrite(meta(KIND_REWRITE, "generic", created=0.0),
                                       (RewriteRule((), (WeightedTarget("generic-target"),)),)))
    assert store.resolve("m", None, None, 0.0).target_model == "legacy-target"
    store.upsert(InferenceModelRewrite(meta(KIND_REWRITE, "exact", created=9.0),
                                       (RewriteRule(("m",), (WeightedTarget("exact-target"),)),)))
    assert store.resolve("m", None, None, 0.0).target_model == "exact-target"


def test_objects_of_other_pools_are_ignored() -> None:
    store = ObjectiveStore(POOL)
    assert not store.upsert(InferenceObjective(meta(KIND_OBJECTIVE, "x", pool="other-pool"), 9))
    assert len(store) == 0
    assert store.resolve("m", "x", None, 0.0).priority == 0


def test_update_moving_object_to_another_pool_drops_it() -> None:
    store = ObjectiveStore(POOL)
    store.upsert(InferenceObjective(meta(KIND_OBJECTIVE, "x"), 9))
    assert store.resolve("m", "x", None, 0.0).priority == 9
    store.upsert(InferenceObjective(meta(KIND_OBJECTIVE, "x", pool="other-pool"), 9))
    assert store.resolve("m", "x", None, 0.0).priority == 0


def test_pool_namespace_filter() -> None:
    store = ObjectiveStore(POOL, pool_namespace="prod")
    store.upsert(InferenceObjective(meta(KIND_OBJECTIVE, "x", namespace="dev"), 9))
    store.upsert(InferenceObjective(meta(KIND_OBJECTIVE, "y", namespace="prod"), 3))
    assert store.resolve("m", "x", None, 0.0).priority == 0
    assert store.resolve("m", "y", None, 0.0).priority == 3


def test_watch_style_add_update_delete() -> None:
    store = ObjectiveStore(POOL)
    key = ObjectKey(KIND_OBJECTIVE, "default", "team-a")
    store.upsert(InferenceObjective(ObjectMeta(key, POOL), 5))
    assert store.resolve("m", "team-a", None, 0.0).priority == 5
    store.upsert(InferenceObjective(ObjectMeta(key, POOL), 7))
    assert store.resolve("m", "team-a", None, 0.0).priority == 7
    assert store.delete(key)
    assert not store.delete(key)
    assert store.resolve("m", "team-a", None, 0.0).priority == 0


def test_replace_all_keeps_age_of_survivors() -> None:
    a = InferenceObjective(meta(KIND_OBJECTIVE, "dup", namespace="a"), 1)
    b = InferenceObjective(meta(KIND_OBJECTIVE, "dup", namespace="b"), 2)
    store = ObjectiveStore(POOL)
    store.replace_all([a, b])
    assert store.resolve("m", "dup", None, 0.0).priority == 1
    # Reordered file: `a` was seen first, so it stays the oldest.
    store.replace_all([b, a])
    assert store.resolve("m", "dup", None, 0.0).priority == 1
    store.replace_all([b])
    assert store.resolve("m", "dup", None, 0.0).priority == 2


@pytest.mark.parametrize("rand", [-0.5, 1.0, 7.0])
def test_out_of_range_rand_is_clamped(rand: float) -> None:
    store = store_from(REWRITES)
    assert store.resolve("food-review", None, None, rand).target_model in {"food-review-v1", "food-review-v2"}


def test_store_without_pool_name_accepts_every_pool() -> None:
    store = ObjectiveStore(None)
    assert store.upsert(InferenceObjective(meta(KIND_OBJECTIVE, "x", pool="any-pool"), 4))
    assert store.resolve("m", "x", None, 0.0).priority == 4
