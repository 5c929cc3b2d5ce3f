"""The idle-user expiry index: known answers, a brute-force comparison, its memory per user."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.expiry import ExpiryIndex
from streams.state import UserState, seen_ms_of, user_partition

TTL = 1_000
BUCKET = 100


def raw(seen_ms: int) -> bytes:
    return UserState(seen_ms=seen_ms, counts={"view": 1}).dumps()


class Scope:
    """A no-op ``scope(p)`` that records which partitions were entered."""

    def __init__(self) -> None:
        self.entered: list[int] = []

    @contextmanager
    def __call__(self, partition: int) -> Iterator[None]:
        self.entered.append(partition)
        yield


def test_idle_user_is_deleted_exactly_once() -> None:
    index, table, scope = ExpiryIndex(TTL, BUCKET), {b"a": raw(0), b"b": raw(500)}, Scope()
    index.touch(0, b"a", 0)
    index.touch(0, b"b", 500)
    assert index.sweep({0}, TTL, table, scope, 10) == 0  # a's bucket has not ended yet
    assert index.sweep({0}, TTL + BUCKET, table, scope, 10) == 1
    assert table == {b"b": raw(500)}
    assert scope.entered == [0]
    assert index.sweep({0}, TTL + BUCKET, table, scope, 10) == 0
    assert len(index) == 1


def test_user_touched_before_the_sweep_is_kept_and_reindexed() -> None:
    index, table = ExpiryIndex(TTL, BUCKET), {b"a": raw(0)}
    index.touch(0, b"a", 0)
    table[b"a"] = raw(900)
    index.touch(0, b"a", 900)
    assert not index.has_due({0}, 1_500)
    assert index.sweep({0}, 1_500, table, Scope(), 10) == 0
    assert index.pending(0) == 1
    assert index.sweep({0}, 2_000, table, Scope(), 10) == 1
    assert table == {}


def test_user_who_came_back_after_being_indexed_is_kept() -> None:
    index, table = ExpiryIndex(TTL, BUCKET), {b"a": raw(0)}
    index.seed(0, table.items())
    table[b"a"] = raw(1_200)  # written without a touch: the index still says 0
    assert index.due({0}, 1_500, 10) == [(0, b"a")]
    index.touch(0, b"a", 0)  # put it back as stale
    assert index.sweep({0}, 1_500, table, Scope(), 10) == 0
    assert table == {b"a": raw(1_200)}
    assert index.pending() == 1
    assert not index.has_due({0}, 1_500)  # re-indexed at 1_200, not due until 2_300
    assert index.sweep({0}, 2_300, table, Scope(), 10) == 1


def test_unowned_and_dropped_partitions_are_never_swept() -> None:
    index, table, scope = ExpiryIndex(TTL, BUCKET), {b"a": raw(0), b"b": raw(0)}, Scope()
    index.touch(1, b"a", 0)
    index.touch(2, b"b", 0)
    index.drop(2)
    assert index.partitions == {1}
    assert index.due({0}, 10_000, 10) == []
    assert index.sweep({0, 2}, 10_000, table, scope, 10) == 0
    assert table == {b"a": raw(0), b"b": raw(0)}
    assert scope.entered == []
    assert index.pending(1) == 1 and index.pending(2) == 0


def test_limit_bounds_each_call_and_later_calls_continue() -> None:
    index = ExpiryIndex(TTL, BUCKET)
    table = {f"u{i}".encode(): raw(i * 10) for i in range(25)}
    for p in (0, 1):
        index.seed(p, [(k, v) for k, v in table.items() if user_partition(k, 2) == p])
    assert len(index) == 25
    counts = []
    while index.has_due({0, 1}, 10_000):
        counts.append(index.sweep({0, 1}, 10_000, table, Scope(), 10))
    assert counts == [10, 10, 5]
    assert table == {} and len(index) == 0


def test_due_takes_the_oldest_buckets_first_across_partitions() -> None:
    index = ExpiryIndex(TTL, BUCKET)
    index.touch(0, b"late", 300)
    index.touch(1, b"early", 0)
    index.touch(0, b"mid", 150)
    assert index.due({0, 1}, 5_000, 2) == [(1, b"early"), (0, b"mid")]
    assert index.due({0, 1}, 5_000, 2) == [(0, b"late")]


def test_key_deleted_from_the_table_meanwhile_is_forgotten() -> None:
    index, table = ExpiryIndex(TTL, BUCKET), {b"a": raw(0)}
    index.touch(0, b"a", 0)
    del table[b"a"]
    assert index.sweep({0}, 5_000, table, Scope(), 10) == 0
    assert len(index) == 0 and table == {}


def test_seed_reads_the_last_seen_time_of_stored_states() -> None:
    table = {b"old": raw(100), b"new": raw(2_000)}
    index = ExpiryIndex(TTL, BUCKET)
    index.touch(3, b"stale", 0)  # seeding replaces whatever the partition had
    assert index.seed(3, table.items()) == 2
    assert index.due({3}, 1_200, 10) == [(3, b"old")]
    assert not index.has_due({3}, 3_000)
    assert index.due({3}, 3_100, 10) == [(3, b"new")]


def test_rejects_a_bucket_of_zero() -> None:
    with pytest.raises(ValueError, match="bucket_ms"):
        ExpiryIndex(TTL, 0)


def _retained(build: Any) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = build()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        del index


def test_memory_per_user_and_per_bucket() -> None:
    """The figures quoted in ``streams.expiry``'s docstring: keys are 16 bytes, made inside the
    build so that they count (a worker reading RocksDB holds its own copy of each key)."""
    n = 20_000

    def dense() -> ExpiryIndex:  # 10 buckets: the cost of a user
        index = ExpiryIndex(TTL, BUCKET)
        for i in range(n):
            index.touch(0, b"user-%011d" % i, i % 10 * BUCKET)
        return index

    def sparse() -> ExpiryIndex:  # a bucket per user: the cost of a bucket on top
        index = ExpiryIndex(TTL, BUCKET)
        for i in range(n):
            index.touch(0, b"user-%011d" % i, i * BUCKET)
        return index

    per_user = _retained(dense) / n
    per_bucket = _retained(sparse) / n - per_user
    print(f"expiry index: {per_user:.0f} B per user, {per_bucket:.0f} B per bucket")
    assert per_user < 200
    assert per_bucket < 500


KEYS = [f"u{i}".encode() for i in range(12)]
PARTS = 3


def part_of(key: bytes) -> int:
    return user_partition(key, PARTS)


op = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(KEYS), st.integers(0, 400)),
    st.tuples(st.just("untouched"), st.sampled_from(KEYS), st.integers(0, 400)),
    st.tuples(st.just("remove"), st.sampled_from(KEYS), st.just(0)),
    st.tuples(st.just("sweep"), st.integers(1, 4), st.integers(0, 800)),
    st.tuples(st.just("revoke"), st.integers(0, PARTS - 1), st.just(0)),
    st.tuples(st.just("assign"), st.integers(0, PARTS - 1), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op, max_size=60), bucket_ms=st.sampled_from([1, 7, 100, 2_000]))
def test_sweeps_match_a_full_scan(ops: list[tuple[str, Any, int]], bucket_ms: int) -> None:
    """After random writes, out-of-band deletes, rebalances and sweeps, each sweep deletes exactly
    what a full scan of the owned partitions finds idle as of the bucket boundary."""
    index, table, owned, now = ExpiryIndex(TTL, bucket_ms), dict[bytes, bytes](), set(range(PARTS)), 0
    for p in owned:
        index.seed(p, [])

    def sweep_all(limit: int) -> None:
        boundary = now // bucket_ms * bucket_ms  # buckets that ended by now
        idle = {k for k, v in table.items() if part_of(k) in owned and seen_ms_of(v) + TTL < boundary}
        before, deleted = dict(table), 0
        while index.has_due(owned, now):
            deleted += index.sweep(owned, now, table, Scope(), limit)
        assert deleted == len(idle)
        assert table == {k: v for k, v in before.items() if k not in idle}

    for kind, arg, dt in ops:
        now += dt
        if kind == "write":  # the owner folds an event: stored, then touched
            table[arg] = raw(now)
            if part_of(arg) in owned:
                index.touch(part_of(arg), arg, now)
        elif kind == "untouched" and arg in table:  # a newer state the index missed
            table[arg] = raw(now)
        elif kind == "remove":
            table.pop(arg, None)
        elif kind == "sweep":
            sweep_all(arg)
        elif kind == "revoke":
            owned.discard(arg)
            index.drop(arg)
        elif kind == "assign" and arg not in owned:
            owned.add(arg)
            index.seed(arg, [(k, v) for k, v in table.items() if part_of(k) == arg])
    for p in owned:
        assert index.pending(p) >= sum(part_of(k) == p for k in table)
    now += TTL + 2 * bucket_ms  # everything idle: no user of an owned partition was lost
    sweep_all(3)
    assert all(part_of(k) not in owned for k in table)
