"""``partition_counts`` waits for a topic created a moment ago to show its partitions (a fresh broker
on a busy machine took over 10 s), and reports 0 for one that never does, after its deadline."""

from __future__ import annotations

from typing import Any

from streams.admin import partition_counts


class SlowMetadata:
    """describe_topics answers with no partitions for the first ``late`` calls."""

    def __init__(self, late: int, partitions: int = 4) -> None:
        self.late, self.partitions, self.calls = late, partitions, 0

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        self.calls += 1
        n = self.partitions if self.calls > self.late else 0
        return [{"topic": t, "partitions": [{"partition": p} for p in range(n)]} for t in topics]


async def test_a_topic_whose_partitions_show_late_is_counted() -> None:
    admin = SlowMetadata(late=5)
    assert await partition_counts(admin, ["t"], wait_s=60) == {"t": 4}
    assert admin.calls == 6


async def test_a_topic_that_never_shows_partitions_counts_zero_after_the_deadline() -> None:
    admin = SlowMetadata(late=10**9)
    assert await partition_counts(admin, ["t"], wait_s=0.3) == {"t": 0}
    assert admin.calls >= 2
