"""``streams.consumer``: what may be committed and what must be read again, without Kafka.

Known answers for the three fixes of faust-streaming 0.15.3's offset handling: a commit only
covers a run of acks that starts at the committed offset (faust-streaming#606), a record handed to
a stream and dropped unprocessed is found and read again (faust-streaming#596), and what was handed
on for a partition is forgotten when it is assigned again.
"""

from __future__ import annotations

import asyncio
import gc
from collections import defaultdict
from typing import Any, NamedTuple

import pytest

from streams.consumer import HandedOn, ShopstreamConsumer, first_unacked_run_end


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


def test_the_fetch_loop_seeks_back_to_a_dropped_record_of_an_assigned_partition_only() -> None:
    """``_seek_back_dropped``: an assigned partition is sought back to its oldest dropped record;
    a revoked one and one already sought back before it are only forgotten."""
    c: Any = object.__new__(ShopstreamConsumer)
    c._handed_on = HandedOn()
    sought: list[tuple[TP, int]] = []
    refetched: list[tuple[TP, int]] = []
    mine, gone, behind = TP("t", 0), TP("t", 1), TP("t", 2)

    async def seek(tp: TP, offset: int) -> None:
        sought.append((tp, offset))

    c.seek = seek
    c.assignment = lambda: {mine, behind}
    c.on_refetch = lambda tp, offset: refetched.append((tp, offset))
    for tp in (mine, gone, behind):
        for o in (7, 8):
            c._handed_on.hand(tp, o, Msg(str(tp), o))  # released at once: dropped
    expected = {mine: 9, gone: 9, behind: 7}  # behind: perform_seek already sought back to 7
    rewound: dict[Any, int] = {}
    asyncio.run(c._seek_back_dropped(expected, rewound))
    assert sought == [(mine, 7)] and refetched == [(mine, 7)] and rewound == {mine: 7}
    assert c._handed_on.dropped() == {mine: 7}  # the fake seek does not forget; the real one does
