"""What the cyclic garbage collector traverses in a running worker (``streams.gctune``): startup
objects frozen once, and long-lived timers held in tuples it stops tracking."""

from __future__ import annotations

import gc

from streams.gctune import freeze_startup
from streams.promotions import CartTimers


def test_freeze_startup_moves_every_live_object_out_of_the_generations() -> None:
    built = [{"item": i} for i in range(1000)]  # like a loaded vocabulary: lives as long as the worker
    try:
        frozen = freeze_startup()
        assert frozen >= len(built) and gc.get_freeze_count() == frozen
        assert gc.get_count()[0] < 50  # the young generation starts empty
        assert not any(o is built for o in gc.get_objects())  # no longer traversed by collections
    finally:
        gc.unfreeze()
    assert any(o is built for o in gc.get_objects())


def test_cart_timers_are_tuples_the_collector_stops_tracking() -> None:
    timers = CartTimers(after_s=60.0)
    for i in range(100):
        timers.schedule(i % 4, b"user-%d" % i, 1000.0 + i)
    gc.collect()
    entries = [e for heap in timers.heaps.values() for e in heap]
    assert len(entries) == 100 and not any(gc.is_tracked(e) for e in entries)
    # and they still come due in time order, per partition
    assert timers.next_due() == 1000.0
    assert timers.due(1, 1005.0) == [b"user-1", b"user-5"]
