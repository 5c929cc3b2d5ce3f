"""``streams.consumer``: what may be committed and what must be read again, without Kafka.

Known answers for the three fixes of faust-streaming 0.15.3's offset handling: a commit only
covers a run of acks that starts at the committed offset (faust-streaming#606), a record handed to
a stream and dropped unprocessed is found and read again (faust-streaming#596), and what was handed
on for a partition is forgotten when it is assigned again.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from prometheus_client import CollectorRegistry

from streams.consumer import HandedOn, ShopstreamConsumer, first_unacked_run_end
from streams.metrics import Metrics


class TP(NamedTuple):
    topic: str
    partition: int


class Msg:
    """A stand-in for faust's ``Message`` (weakly referenceable, like it)."""

    def __init__(self, tp: str, offset: int) -> None:
        self.tp = tp
        self.offset = offset
        self.topic = tp


@pytest.mark.parametrize(
    ("acked", "committed", "want"),
    [
        ([5, 6, 7], 5, 8),  # the run starts at the committed offset
        ([6, 7, 8], 5, None),  # 5 still in flight: faust 0.15.3 commits 9 here (#606)
        ([7, 8], 5, None),
        ([5, 6, 8, 9], 5, 7),  # up to the first gap
        ([3, 4, 5], 5, 6),  # stale acks below the commit point: only the run's end counts
        ([0, 1, 2], None, 3),  # no commit yet: from the first ack
        ([], 5, None),
    ],
)
def test_a_commit_covers_only_the_run_of_acks_from_the_committed_offset(
    acked: list[int], committed: int | None, want: int | None
) -> None:
    assert first_unacked_run_end(acked, committed) == want


def consumer(committed: int | None, acked: list[int]) -> Any:
    """A ``ShopstreamConsumer`` with only the bookkeeping ``_new_offset`` reads."""
    c: Any = object.__new__(ShopstreamConsumer)
    c._acked = defaultdict(list, {"t0": list(acked)})
    c._acked_index = defaultdict(set, {"t0": set(acked)})
    c._committed_offset = defaultdict(lambda: None, {"t0": committed})
    return c


def test_new_offset_keeps_the_acks_past_the_first_gap_for_later() -> None:
    c = consumer(10, [13, 10, 11, 12, 15])
    assert c._new_offset("t0") == 14
    assert c._acked["t0"] == [15] and c._acked_index["t0"] == {15}


def test_new_offset_does_not_commit_over_a_record_in_flight_at_the_head() -> None:
    c = consumer(10, [11, 12, 13])
    assert c._new_offset("t0") is None
    assert c._acked["t0"] == [11, 12, 13]  # kept until 10 is acked
    c._acked["t0"].append(10)
    c._acked_index["t0"].add(10)
    assert c._new_offset("t0") == 14


def test_a_record_released_without_an_ack_is_reported_dropped() -> None:
    handed = HandedOn()
    queue = [Msg("t0", o) for o in range(10, 15)]
    for m in queue:
        handed.hand("t0", m.offset, m)
    assert handed.dropped() == {}  # all still on their way
    for m in queue[:2]:  # processed and acked, then released
        handed.ack("t0", m.offset)
    del m
    queue = queue[2:3]  # 13 and 14 cleared from the queue; 12 still waiting in a buffer
    gc.collect()
    assert handed.dropped() == {}  # 12 is still held: the ones after it wait behind it
    handed.ack("t0", 12)
    queue.clear()
    assert handed.dropped() == {"t0": 13}
    assert len(handed) == 2  # the acked head was let go


def test_an_acked_record_released_is_never_reported() -> None:
    handed = HandedOn()
    for o in range(3):
        m = Msg("t0", o)
        handed.hand("t0", o, m)
        handed.ack("t0", o)
        del m
    assert handed.dropped() == {} and len(handed) == 0


def test_forget_from_an_offset_keeps_what_came_before() -> None:
    handed = HandedOn()
    held = [Msg("t0", o) for o in range(5)]
    for m in held:
        handed.hand("t0", m.offset, m)
    handed.forget("t0", 3)
    assert len(handed) == 3
    held.clear()
    assert handed.dropped() == {"t0": 0}
    handed.forget("t0")
    assert handed.dropped() == {} and len(handed) == 0


def test_after_a_queue_clear_the_oldest_dropped_record_is_found_behind_one_still_waiting() -> None:
    handed = HandedOn()
    waiting = Msg("t0", 0)  # in a stream's buffer
    handed.hand("t0", 0, waiting)
    for o in (1, 2, 3):  # in the queue faust clears
        handed.hand("t0", o, Msg("t0", o))
    assert handed.dropped() == {}  # the cheap look stops at the record still waiting
    assert handed.dropped(everywhere=True) == {"t0": 1}


def bare_consumer(assigned: set[Any]) -> tuple[Any, list[tuple[Any, int]], list[tuple[Any, int]]]:
    """A ``ShopstreamConsumer`` whose seeks and refetch reports are recorded."""
    c: Any = object.__new__(ShopstreamConsumer)
    c._handed_on = HandedOn()
    c._expected = {}
    sought: list[tuple[Any, int]] = []
    refetched: list[tuple[Any, int]] = []

    async def seek(tp: Any, offset: int) -> None:
        sought.append((tp, offset))

    c.seek = seek
    c.assignment = lambda: assigned
    c.on_refetch = lambda tp, offset: refetched.append((tp, offset))
    return c, sought, refetched


def test_a_queue_clear_lowers_the_next_offset_at_once_then_the_fetch_loop_seeks_back() -> None:
    """``on_queues_cleared``: no record after a dropped one is handed on before it is read
    again (the next offset to hand on drops to it in the clear itself); the fetch loop then
    seeks there. A partition sought back before the dropped record (perform_seek) and a
    revoked one (no next offset) are left alone."""
    mine, behind, gone = TP("t", 0), TP("t", 1), TP("t", 2)
    c, sought, refetched = bare_consumer({mine, behind})
    waiting = Msg("t", 4)
    c._handed_on.hand(mine, 4, waiting)  # still in a stream's buffer
    for tp in (mine, behind, gone):
        for o in (7, 8):
            c._handed_on.hand(tp, o, Msg("t", o))  # released at once: the cleared queue
    c._expected.update({mine: 9, behind: 7})  # behind: perform_seek already sought back to 7
    c.on_queues_cleared()
    assert c._expected == {mine: 7, behind: 7} and refetched == [(mine, 7)]
    assert c._rewinds == {mine: 7} and len(c._handed_on) == 1  # only the waiting record
    rewound: dict[Any, int] = {}
    asyncio.run(c._seek_back_dropped(c._expected, rewound))
    assert sought == [(mine, 7)] and rewound == {mine: 7} and c._rewinds == {}


def test_the_fetch_loop_seeks_back_to_a_record_released_unacked_on_an_assigned_partition_only() -> None:
    mine, gone = TP("t", 0), TP("t", 1)
    c, sought, refetched = bare_consumer({mine})
    c._rewinds = {}
    for tp in (mine, gone):
        for o in (7, 8):
            c._handed_on.hand(tp, o, Msg("t", o))
    c._expected.update({mine: 9, gone: 9})
    rewound: dict[Any, int] = {}
    asyncio.run(c._seek_back_dropped(c._expected, rewound))
    assert sought == [(mine, 7)] and rewound == {mine: 7} and refetched == [(mine, 7)]
    assert len(c._handed_on) == 0  # gone (revoked): forgotten, its next owner reads it


def test_a_partition_never_committed_is_sought_to_its_first_offset_and_the_rest_to_their_commits() -> None:
    """``perform_seek``: faust seeks only the partitions with a committed offset; the records
    aiokafka returned for the others while faust had them paused were dropped unseen, so those
    start again at their first offset (the reset policy, earliest). Changelogs (no acks) are
    the recovery's, not touched."""
    committed_tp, fresh_tp, trimmed_tp, changelog = TP("t", 0), TP("t", 1), TP("t", 2), TP("t-changelog", 1)
    c, sought, refetched = bare_consumer({committed_tp, fresh_tp, trimmed_tp, changelog})
    c._read_offset = defaultdict(lambda: None)
    c._committed_offset = defaultdict(lambda: None)
    c.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: "changelog" not in topic))
    asked: list[tuple[Any, ...]] = []

    async def seek_to_committed() -> dict[Any, int | None]:
        return {committed_tp: 40, fresh_tp: None, trimmed_tp: None, changelog: None}

    async def earliest_offsets(*tps: Any) -> dict[Any, int]:
        asked.append(tps)
        return {fresh_tp: 0, trimmed_tp: 12}  # 12: retention deleted the first records

    # aiokafka's positions: fetching got to 30 on fresh_tp (records faust dropped unseen),
    # trimmed_tp still waits for its offset reset
    positions = {fresh_tp: 30, trimmed_tp: None}
    states = SimpleNamespace(
        state_value=lambda tp: SimpleNamespace(
            _position=positions[tp], has_valid_position=positions[tp] is not None
        )
    )
    kafka = SimpleNamespace(_subscription=SimpleNamespace(subscription=SimpleNamespace(assignment=states)))
    c._thread = SimpleNamespace(
        seek_to_committed=seek_to_committed, earliest_offsets=earliest_offsets, _ensure_consumer=lambda: kafka
    )
    asyncio.run(c.perform_seek())
    assert asked == [(fresh_tp, trimmed_tp)]
    assert sought == [(committed_tp, 40), (fresh_tp, 0), (trimmed_tp, 12)]
    assert refetched == [(fresh_tp, 0)]  # reported (log, metric) where records were dropped
    assert c._committed_offset[committed_tp] == 40 and c._committed_offset[fresh_tp] is None
    assert c._first == {fresh_tp: 0, trimmed_tp: 12}


def test_a_partition_never_committed_commits_only_a_run_from_its_first_offset() -> None:
    """Without a committed offset faust commits from the first ack, wherever it is: records
    before it that were dropped unseen would be committed over. After ``perform_seek`` the run
    must start at the offset the partition was sought to."""
    c = consumer(None, [5, 6, 7])
    c._first = {"t0": 0}
    assert c._new_offset("t0") is None  # 0-4 not processed yet
    c._acked["t0"] += [0, 1, 2, 3, 4]
    assert c._new_offset("t0") == 8
    c = consumer(None, [5, 6, 7])  # never sought (no seek_to_committed yet): faust's rule
    assert c._new_offset("t0") == 8


def test_aiokafka_is_handed_a_copy_of_the_active_partitions() -> None:
    """``_getmany``: faust pauses a partition by emptying its set of active partitions in place,
    and aiokafka reads an empty set as "every partition": the set it waits with is a copy."""
    tp0, tp1 = TP("t", 0), TP("t", 1)
    c: Any = object.__new__(ShopstreamConsumer)
    active = {tp0, tp1}
    seen: list[set[Any] | None] = []

    async def getmany(partitions: set[Any] | None, timeout: float) -> dict[Any, list[Any]]:
        active.clear()  # faust pauses them while aiokafka waits
        seen.append(partitions)
        return {}

    c._thread = SimpleNamespace(getmany=getmany)
    asyncio.run(c._getmany(active_partitions=active, timeout=1.0))
    assert seen == [{tp0, tp1}] and seen[0] is not active


def test_a_seek_runs_on_the_consumer_thread_not_the_workers() -> None:
    """``_seek``: aiokafka's seek deletes the fetcher's buffered records, which the consumer thread
    iterates in ``fetched_records``; called from the worker's thread it raced that loop and crashed
    the fetcher (robinhood/aiokafka#19). It goes through the thread's ``call_thread`` instead."""

    seeks: list[tuple[Any, int, int]] = []

    def seek(tp: Any, offset: int) -> None:
        seeks.append((tp, offset, threading.get_ident()))

    async def call_thread(fun: Callable[..., Any], *args: Any) -> Any:
        done: list[Any] = []
        consumer_thread = threading.Thread(target=lambda: done.append(fun(*args)))
        consumer_thread.start()
        consumer_thread.join()
        return done[0]

    c: Any = object.__new__(ShopstreamConsumer)
    c._thread = SimpleNamespace(seek=seek, call_thread=call_thread)
    asyncio.run(c._seek(TP("carts", 1), 42))
    [(tp, offset, ident)] = seeks
    assert (tp, offset) == (TP("carts", 1), 42) and ident != threading.get_ident()


def test_jumps_and_refetches_are_counted_per_topic() -> None:
    """The worker's hooks (``Metrics.offset_jumped``, ``Metrics.refetching``): one count per seek
    back, by topic, whichever way the consumer found the records to read again."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    views, carts = TP("views", 0), TP("carts", 3)
    c, _, _ = bare_consumer({views, carts})
    c.on_refetch, c.on_jump = metrics.refetching, metrics.offset_jumped
    c._rewinds = {}
    for o in (7, 8):
        c._handed_on.hand(views, o, Msg("views", o))  # released at once: a cleared queue
    c._expected.update({views: 9})
    c.on_queues_cleared()
    c._jumped(carts, 4, 9)
    c._jumped(carts, 9, 12)

    def count(name: str, topic: str) -> float | None:
        return registry.get_sample_value(name, {"topic": topic})

    assert count("shopstream_records_refetched_total", "views") == 1.0
    assert count("shopstream_records_refetched_total", "carts") is None
    assert count("shopstream_offset_jumps_total", "carts") == 2.0
    assert count("shopstream_offset_jumps_total", "views") is None
