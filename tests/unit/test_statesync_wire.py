"""The state-sync batch format and the other replicas' load: pure logic, no Redis."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import InFlightTracker
from epp.statesync import wire
from epp.statesync.remote import RemoteLoad
from epp.statesync.setup import check_url

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=40)
records = st.lists(st.builds(
    wire.PrefixRecord, names, names, st.integers(1, 1 << 20),
    st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=50).map(tuple),
    st.booleans()), max_size=20)


@settings(deadline=None)  # a loaded CI machine must not turn a slow example red
@given(names, st.none() | st.dictionaries(names, st.integers(0, 1000), max_size=10), records)
def test_a_batch_survives_the_round_trip(replica: str, load: dict[str, int] | None,
                                         recs: list[wire.PrefixRecord]) -> None:
    batch = wire.decode(wire.encode(replica, load, recs))
    assert (batch.replica, batch.load) == (replica, load)
    assert [(r.scorer, r.endpoint, r.capacity, tuple(r.hashes), r.continues)
            for r in batch.records] == [
        (r.scorer, r.endpoint, r.capacity, r.hashes, r.continues) for r in recs]


@settings(deadline=None)  # a loaded CI machine must not turn a slow example red
@given(st.dictionaries(st.binary(max_size=4), st.binary(max_size=64), max_size=6))
def test_arbitrary_fields_decode_or_raise_wire_error(fields: dict[bytes, bytes]) -> None:
    try:
        wire.decode(fields)
    except wire.WireError:
        pass


@settings(deadline=None)  # a loaded CI machine must not turn a slow example red
@given(records.filter(bool), st.data())
def test_corrupted_hash_bytes_never_half_merge(recs: list[wire.PrefixRecord],
                                               data: st.DataObject) -> None:
    fields = wire.encode("r1", None, recs)
    cut = data.draw(st.integers(1, len(fields[b"ph"])))
    fields[b"ph"] = fields[b"ph"][:-cut]
    with pytest.raises(wire.WireError):
        wire.decode(fields)


def mp(v: object) -> bytes:
    return msgspec.msgpack.encode(v)


@pytest.mark.parametrize("fields, why", [
    ({b"v": b"1", b"r": b"x"}, "version"),  # the JSON format of before: counted, skipped
    ({b"v": b"2"}, "replica"),
    ({b"v": b"2", b"r": b"x", b"l": mp({"a": -1})}, "load"),
    ({b"v": b"2", b"r": b"x", b"l": mp({"a": True})}, "load"),
    ({b"v": b"2", b"r": b"x", b"l": b'{"a": 1}'}, "load"),
    ({b"v": b"2", b"r": b"x", b"pm": mp([])}, "together"),
    ({b"v": b"2", b"r": b"x", b"pm": mp([["s", "e", 1, 0, False]]), b"ph": b""}, r"\[3\]"),
    ({b"v": b"2", b"r": b"x", b"pm": mp([["s", "e", 1, 2, False]]), b"ph": b"\0" * 8},
     "disagree"),
    ({b"v": b"2", b"r": b"x", b"pm": mp([]), b"ph": b"\0" * 8}, "disagree"),
    ({b"v": b"2", b"r": b"x", b"pm": mp([["s", "e", 1, 1, True]]), b"ph": b"\0" * 8},
     "continuing"),
    ({b"v": b"2", b"r": b"x", b"pm": mp([["", "e", 1, 1, False]]), b"ph": b"\0" * 8},
     r"\[0\]"),
    ({b"v": b"2", b"r": b"x", b"pm": b"\xc1", b"ph": b""}, "MessagePack"),
    ({b"v": b"2", b"r": "é".encode("latin-1")}, "UTF-8"),
])
def test_malformed_entries_are_refused_with_a_reason(fields: dict[bytes, bytes], why: str) -> None:
    with pytest.raises(wire.WireError, match=why):
        wire.decode(fields)


def pool(*names: str) -> Datastore:
    ds = Datastore()
    ds.set_endpoints([Endpoint(n, f"10.0.0.{i + 1}", 8000) for i, n in enumerate(names)])
    return ds


def test_peers_load_adds_to_local_in_flight_and_expires_with_silence() -> None:
    ds = pool("a", "b", "c")
    snap = ds.snapshot()
    tracker = InFlightTracker()
    remote = RemoteLoad(ttl=5.0)
    tracker.remote = remote
    tracker.started("mine", "a", now=100.0)  # never scraped: counts
    remote.update("peer-1", {"a": 2, "c": 1}, now=100.0)
    remote.update("peer-2", {"c": 4, "gone-pod": 9}, now=101.0)
    assert tracker.extra_waiting(snap, 100.0).tolist() == [3, 0, 5]
    assert tracker.local_extra_waiting(snap, 100.0).tolist() == [1, 0, 0]
    remote.update("peer-2", None, now=104.0)  # heartbeat only: counts stay
    assert remote.expire(now=105.5) == ["peer-1"]
    assert tracker.extra_waiting(snap, 105.5).tolist() == [1, 0, 4]
    assert remote.expire(now=109.5) == ["peer-2"]
    assert tracker.extra_waiting(snap, 109.5).tolist() == [1, 0, 0]


def test_remote_load_is_recomputed_only_when_something_changed() -> None:
    ds = pool("a", "b")
    remote = RemoteLoad(ttl=1.0)
    assert remote.extra_waiting(ds.snapshot()) is None
    remote.update("p", {"b": 3}, now=0.0)
    first = remote.extra_waiting(ds.snapshot())
    assert first is remote.extra_waiting(ds.snapshot())
    ds.update_metrics("a", EndpointMetrics(waiting=1, scraped_at=time.monotonic()))
    again = remote.extra_waiting(ds.snapshot())
    assert again is not first and np.array_equal(again, first)


@pytest.mark.parametrize("url", ["redis://r:6379", "rediss://user:pw@r.example:6380/2",
                                 "unix:///run/redis.sock"])
def test_redis_urls_accepted(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize("url, why", [("http://r:6379", "scheme"), ("r:6379", "scheme"),
                                      ("redis://:pw@", "no host"),
                                      ("redis://r:notaport", "not a valid URL")])
def test_bad_redis_urls_rejected_without_echoing_secrets(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as e:
        check_url(url)
    assert "pw" not in str(e.value)


# -- merging another replica's records keeps the index's invariant ------------------------


chains = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 12), st.booleans()),
                  min_size=1, max_size=40)


@settings(deadline=None)  # a loaded CI machine must not turn a slow example red
@given(chains, st.integers(3, 20))
def test_remote_records_keep_every_endpoint_prefix_closed(ops: list[tuple[int, int, bool]],
                                                          capacity: int) -> None:
    """Chains are prefixes of 4 base prompts; some recorded locally, some as another
    replica's (refresh=False); under eviction, holding block k still implies 0..k-1."""
    from epp.scheduling.prefix import PrefixIndex, block_hashes

    bases = [block_hashes("m", bytes([65 + b]) * 64 * 12, 64, 12) for b in range(4)]
    index = PrefixIndex()
    for base, length, remote in ops:
        chain = bases[base][:length]
        held = index.held("e", chain)
        if remote:
            index.record("e", chain, capacity, held, refresh=False)
        else:
            index.record("e", chain, capacity, held)
        assert index.held("e", chain) == length or index.blocks_of("e") == capacity
        for b in bases:
            k = index.held("e", b)
            linear = next((i for i, h in enumerate(b) if index.match([h]) == {}), len(b))
            assert k == linear, (k, linear)
            assert all(index.match([h]) == {} for h in b[linear:])  # nothing deeper held
    assert index.blocks_of("e") <= capacity


# -- configuration: flags and the EndpointPickerConfig's stateSync section ---------------------


def test_config_section_supplies_what_flags_leave_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from epp.config import load_config
    from epp.settings import parse_settings
    from epp.statesync.setup import sync_settings

    cfg = load_config("stateSync:\n  urlFromEnv: SYNC_URL\n  interval: 20ms\n  ttl: 3s\n")
    monkeypatch.setenv("SYNC_URL", "rediss://epp:pw@redis:6380")
    s = sync_settings(parse_settings([]), cfg.state_sync)
    assert (s.state_sync, s.state_sync_interval, s.state_sync_ttl) == (
        "rediss://epp:pw@redis:6380", 0.02, 3.0)
    flags = parse_settings(["--state-sync", "redis://other:6379", "--state-sync-ttl", "9s"])
    s = sync_settings(flags, cfg.state_sync)
    assert (s.state_sync, s.state_sync_interval, s.state_sync_ttl) == (
        "redis://other:6379", 0.02, 9.0)
    assert sync_settings(parse_settings([]), {}).state_sync is None


@pytest.mark.parametrize("section, why", [({"urlFromEnv": "NOPE_NOT_SET"}, "not set"),
                                          ({"url": "redis://r", "interval": "fast"}, "interval"),
                                          ({"uri": "redis://r"}, "unknown keys")])
def test_bad_config_sections_are_refused(section: dict, why: str) -> None:
    from epp.settings import parse_settings
    from epp.statesync.setup import sync_settings

    with pytest.raises(ValueError, match=why):
        sync_settings(parse_settings([]), section)


def test_state_sync_turns_leader_election_off() -> None:
    from epp.config import load_config
    from epp.settings import parse_settings
    from epp.statesync.setup import state_sync_from_settings

    s = parse_settings(["--state-sync", "redis://r:6379", "--ha-enable-leader-election"])
    cfg = load_config(None)
    sync = state_sync_from_settings(s, pool("a"), InFlightTracker(), cfg.plugins)
    assert sync is not None and s.ha_enable_leader_election is False
    assert sync.options.key == "epp:state:default/standalone"
    assert set(sync.scorers) == {"prefix-cache-scorer"}


def test_the_precise_scorers_approximate_fallback_is_shared_too() -> None:
    from epp.config import load_config
    from epp.statesync.setup import approximate_indexes

    cfg = load_config("plugins:\n- type: precise-prefix-cache-scorer\n"
                      "schedulingProfiles:\n- name: default\n  plugins:\n"
                      "  - pluginRef: precise-prefix-cache-scorer\n")
    precise = cfg.plugins["precise-prefix-cache-scorer"]
    assert approximate_indexes(cfg.plugins) == {precise.approx.name: precise.approx}


# -- a shared prefix crosses the stream once per endpoint ----------------------------------


def test_a_shared_prefix_goes_out_once_per_endpoint_and_the_peer_learns_it_whole() -> None:
    """Replica A routes 3 prompts sharing a 40-block system prompt to one endpoint; what
    it publishes (without Redis: the batches go straight to B's merge) carries the shared
    blocks once, and B's index ends up holding every prompt A's holds."""
    from epp.scheduling.prefix import block_hashes
    from epp.scheduling.scorers import PrefixCacheScorer
    from epp.statesync.sync import StateSync, SyncOptions

    def replica(name: str) -> tuple[StateSync, PrefixCacheScorer]:
        scorer = PrefixCacheScorer()
        sync = StateSync(SyncOptions(url="redis://unused"), pool("pod-a", "pod-b"),
                         InFlightTracker(), {scorer.name: scorer}, replica=name)
        return sync, scorer

    def publish(sync: StateSync) -> dict[bytes, bytes]:
        records, done = sync._outgoing()
        done()
        return wire.encode(sync.replica, None, records)

    (a, a_scorer), (b, b_scorer) = replica("a"), replica("b")
    system = "You are a helpful assistant. " * 90
    prompts = [block_hashes("m", (system + q).encode(), 64, 256)
               for q in ("What is 2+2?" * 3, "Name a colour." * 3, "Spell cat." * 3)]
    for chain in prompts:
        a._on_record(a_scorer.name, "pod-a", 1000, chain)
    first = publish(a)
    shared = sum(h == prompts[0][i] for i, h in enumerate(prompts[1]))
    assert shared >= 40
    # 3 records; the second and third start at the last shared block.
    assert len(first[b"ph"]) // 8 == len(prompts[0]) + 2 * (len(prompts[1]) - shared + 1)
    b._apply(first, bootstrap=False)
    for chain in prompts:
        assert b_scorer.index.held("pod-a", chain) == len(chain)
    # Routed again: nothing new to send. To another endpoint: the whole chain once.
    a._on_record(a_scorer.name, "pod-a", 1000, prompts[2])
    a._on_record(a_scorer.name, "pod-b", 1000, prompts[2])
    again = wire.decode(publish(a))
    assert [(r.endpoint, r.continues, len(r.hashes)) for r in again.records] == [
        ("pod-b", False, len(prompts[2]))]


def test_a_tail_whose_head_never_arrived_is_dropped_until_the_chain_comes_whole() -> None:
    from epp.scheduling.scorers import PrefixCacheScorer

    scorer = PrefixCacheScorer()
    assert not scorer.learn_remote("pod-a", [11, 12, 13], 100, continues=True)
    assert scorer.index.blocks_of("pod-a") == 0  # nothing half-merged: still prefix-closed
    assert scorer.learn_remote("pod-a", [10, 11], 100)
    assert scorer.learn_remote("pod-a", [11, 12, 13], 100, continues=True)
    assert scorer.index.held("pod-a", [10, 11, 12, 13]) == 4
