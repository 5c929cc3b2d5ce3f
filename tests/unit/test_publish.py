"""``streams.publish.Publisher``: records go out as one batch per topic partition, in order, on
the partition the producer's own partitioner picks for the key; against a fake aiokafka producer
with aiokafka's real partitioner, without Kafka."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

from streams.delivery import Deliveries
from streams.publish import Publisher, Record
from streams.state import user_partition


class Batch:
    def __init__(self, room: int) -> None:
        self.room = room
        self.records: list[tuple[bytes, bytes, Any, Any]] = []

    def append(self, *, key: bytes, value: bytes, timestamp: Any, headers: Any) -> Any:
        if len(self.records) == self.room:
            return None
        self.records.append((key, value, timestamp, headers))
        return object()


class Producer:
    def __init__(self, room: int = 100) -> None:
        self.room = room
        self._partitioner = DefaultPartitioner()
        self.sent: list[tuple[str, int, list[Any]]] = []
        self.waited: list[str] = []
        cluster = SimpleNamespace(
            partitions_for_topic=lambda t: set(range(8)),
            available_partitions_for_topic=lambda t: set(range(8)),
        )

        async def wait_on_metadata(topic: str) -> None:
            self.waited.append(topic)

        self.client = SimpleNamespace(_topics=set(), cluster=cluster, _wait_on_metadata=wait_on_metadata)

    def create_batch(self) -> Batch:
        return Batch(self.room)

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        self.sent.append((topic, partition, batch.records))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def test_one_batch_per_partition_in_order_on_the_keys_partition() -> None:
    producer = Producer()
    deliveries = Deliveries(5.0)
    users = [f"user-{i}".encode() for i in range(20)]
    records: list[Record] = [("recs", u, b"r%d" % i, None, None) for i, u in enumerate(users)]
    records += [("by-user", users[0], b"fwd", [("trace", b"1")], 1_700_000_000.5)]

    async def main() -> int:
        n = await Publisher(lambda: producer, deliveries).publish(records)
        assert await deliveries.confirm() == 21  # records, not batches
        return n

    assert asyncio.run(main()) == 21
    assert producer.waited == ["recs", "by-user"]  # metadata once per topic
    by_partition = {(t, p): r for t, p, r in producer.sent}
    assert len(producer.sent) == len(by_partition)  # one batch per topic partition
    for (topic, p), batch in by_partition.items():
        for key, _, _, _ in batch:
            assert p == user_partition(key, 8)  # where ``send`` (murmur2) would put it
        if topic == "recs":  # in input order within the partition
            assert [v for _, v, _, _ in batch] == [
                v for t, k, v, _, _ in records if t == topic and k in {b[0] for b in batch}
            ]
    ((key, value, stamp, headers),) = by_partition[("by-user", user_partition(users[0], 8))]
    assert (key, value, stamp, headers) == (users[0], b"fwd", 1_700_000_000_500, [("trace", b"1")])


def test_a_full_batch_is_sent_and_the_rest_follows_in_order() -> None:
    producer = Producer(room=2)
    deliveries = Deliveries(5.0)
    records: list[Record] = [("recs", b"same-user", b"%d" % i, None, None) for i in range(5)]

    async def main() -> int:
        await Publisher(lambda: producer, deliveries).publish(records)
        assert len(deliveries) == 3
        return await deliveries.confirm()

    assert asyncio.run(main()) == 5  # the records the three futures stand for
    assert [[v for _, v, _, _ in r] for _, _, r in producer.sent] == [[b"0", b"1"], [b"2", b"3"], [b"4"]]
