"""Speculative picks: a pick's blocks count on its endpoint until the TTL ends."""

from __future__ import annotations

from epp.scheduling.speculative import SpeculativePicks, common_run


def test_common_run_is_the_shared_leading_run_of_chained_keys() -> None:
    assert common_run([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert common_run([1, 2, 3, 4], [1, 2, 9, 9]) == 2
    assert common_run([1, 2], [1, 2, 3]) == 2
    assert common_run([5], [6]) == 0
    assert common_run([], [1]) == 0


def test_a_pick_matches_requests_of_its_group_until_the_ttl_ends() -> None:
    picks = SpeculativePicks(ttl=2.0)
    picks.record("a", [1, 2, 3, 4], now=10.0)
    picks.record("b", [1, 2, 7], now=10.5)
    assert picks.match([1, 2, 3, 9], now=11.0) == {"a": 3, "b": 2}
    assert picks.match([8, 2, 3], now=11.0) == {}  # another group
    assert picks.match([1, 2, 3, 9], now=12.2) == {"b": 2}  # a's pick is past its TTL
    picks.expire(12.6)
    assert picks.size == 0 and not picks


def test_a_later_pick_renews_the_entry() -> None:
    picks = SpeculativePicks(ttl=2.0)
    picks.record("a", [1, 2, 3], now=10.0)
    picks.record("a", [1, 2, 4], now=11.5)
    picks.expire(12.5)  # the first pick's expiry must not drop the renewed entry
    assert picks.match([1, 2, 4], now=12.5) == {"a": 3}
    assert picks.size == 1


def test_bounded_and_forgets_endpoints() -> None:
    picks = SpeculativePicks(ttl=60.0, max_picks=3)
    for g in range(10):
        picks.record("a", [g, g + 100], now=float(g))
    assert picks.size <= 3
    assert picks.match([9, 109], now=9.0) == {"a": 2}
    picks.record("b", [9, 109], now=9.0)
    picks.forget("a")
    assert picks.match([9, 109], now=9.0) == {"b": 2}
    assert SpeculativePicks(ttl=0.0).match([1], now=0.0) == {}


def test_the_engines_events_settle_a_pick_before_its_ttl() -> None:
    held: set[tuple[str, int]] = set()
    holds = lambda name, key: (name, key) in held  # noqa: E731  (the index's `holds`)
    picks = SpeculativePicks(ttl=10.0)
    picks.record("a", [1, 2, 3], now=0.0)
    assert picks.match([1, 2, 3], now=1.0, holds=holds) == {"a": 3}  # prefill still running
    held |= {("a", 1), ("a", 2), ("a", 3)}  # BlockStored: the index speaks for "a" now
    assert picks.match([1, 2, 3], now=2.0, holds=holds) == {}
    held.discard(("a", 3))  # BlockRemoved: evicted, and the pick must not claim it back
    assert picks.match([1, 2, 3], now=3.0, holds=holds) == {}
    assert picks.size == 0


def test_events_applied_between_two_reads_settle_a_pick() -> None:
    """A cold group's blocks can be stored and evicted before its next request is read:
    the intake settles the pick when the blocks are stored, so the eviction ends it."""
    held: set[tuple[str, int]] = set()
    holds = lambda name, key: (name, key) in held  # noqa: E731  (the index's `holds`)
    picks = SpeculativePicks(ttl=10.0)
    picks.record("a", [1, 2, 3], now=0.0)
    picks.record("b", [1, 2, 3], now=0.0)
    held |= {("a", 1), ("a", 2), ("a", 3)}  # BlockStored on a
    picks.settle("a", holds)
    picks.settle("b", holds)  # b's prefill has not ended: its pick stands
    held.clear()  # BlockRemoved on a: evicted before anyone read the group
    assert picks.match([1, 2, 3], now=1.0, holds=holds) == {"b": 3}
    assert picks.size == 1
