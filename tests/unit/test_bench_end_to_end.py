"""``bench/end_to_end.py``'s tail shape (where a phase's slowest events fell): known answers."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.unit.bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return bench_script("end_to_end")


def test_slow_events_every_commit_interval_are_one_crowded_tenth(bench: ModuleType) -> None:
    # 1,000 events a second for 10 s at 10 ms, but the 40 events at 0.50-0.54 s of every 2 s at
    # 200 ms: 2 % of them, so the p99 is 200 ms and exactly those 200 are above 0.9 of it
    timeline = []
    for i in range(10_000):
        slow = 500 <= i % 2000 < 540
        timeline.append((100.0 + i / 1000, 0.2 if slow else 0.01))
    shape = bench.tail_shape(timeline, period=2.0)
    assert shape == {"slow": 200, "episodes": 5, "crowded": 1.0}


def test_slow_events_spread_evenly_fill_every_tenth_alike(bench: ModuleType) -> None:
    # one slow event every 50 ms (2 %) over 20 s, each an episode of its own at a 10 ms gap:
    # 4 in each tenth of every 2 s
    timeline = [(i / 1000, 0.5 if i % 50 == 25 else 0.01) for i in range(20_000)]
    shape = bench.tail_shape(timeline, period=2.0, gap=0.01)
    assert shape["slow"] == 400 and shape["episodes"] == 400
    assert shape["crowded"] == pytest.approx(0.1)


def test_no_events_no_tail(bench: ModuleType) -> None:
    assert bench.tail_shape([], period=2.0) == {"slow": 0, "episodes": 0, "crowded": 0.0}
