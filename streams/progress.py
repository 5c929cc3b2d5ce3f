"""Is the worker making progress? Input lag against committed offsets, over time.

In: per assigned input partition, the broker's high watermark and the group's committed offset,
sampled every few seconds. Out: how long the worst partition has had lag while its committed
offset stood still. A worker whose agent is wedged (waiting on something that never comes) still
answers HTTP and holds its partitions; this is what tells it apart from a slow one, whose
committed offsets keep moving. Readiness fails after ``wedged_after_s``, liveness after twice
that, so Kubernetes first stops routing to the worker and then restarts it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable


class Progress:
    def __init__(self) -> None:
        # partition -> (committed offset last seen, monotonic time it was first seen with lag)
        self._since: dict[Hashable, tuple[int | None, float]] = {}

    def reset(self) -> None:
        """Forget everything (a rebalance or recovery is under way: offsets move for other reasons)."""
        self._since.clear()

    def observe(self, samples: Iterable[tuple[Hashable, int | None, int | None]], now: float) -> float:
        """``samples``: (partition, high watermark, committed offset). Returns the longest time,
        in seconds, that one partition has had lag with an unchanged committed offset."""
        seen: dict[Hashable, tuple[int | None, float]] = {}
        worst = 0.0
        for tp, high, committed in samples:
            if high is None or high <= (committed or 0):
                continue  # no lag: nothing to wait for
            prev = self._since.get(tp)
            since = prev[1] if prev is not None and prev[0] == committed else now
            seen[tp] = (committed, since)
            worst = max(worst, now - since)
        self._since = seen
        return worst
