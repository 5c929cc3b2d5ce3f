"""``streams.publish.Publisher``: records go out as one batch per topic partition, in order, on
the partition the producer's own partitioner picks for the key; against a fake aiokafka producer
with aiokafka's real partitioner, without Kafka."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from streams.delivery import Deliveries
from streams.errors import DeliveryFailed
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


class Queued:
    """aiokafka's ``MessageBatch`` as far as the publisher sees it: the builder and the future."""

    def __init__(self, builder: Batch) -> None:
        self._builder = builder
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


class Producer:
    """aiokafka's producer as far as the publisher sees it: batches queue per partition until the
    sender takes them (``drain``), and their futures resolve when the broker replies (``reply``)."""

    def __init__(self, room: int = 100) -> None:
        self.room = room
        self._partitioner = DefaultPartitioner()
        self._message_accumulator = SimpleNamespace(_batches={})
        self.in_flight: list[Queued] = []
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
        queued = Queued(batch)
        self._message_accumulator._batches.setdefault(TopicPartition(topic, partition), deque()).append(
            queued
        )
        return asyncio.shield(queued.future)

    def drain(self) -> None:
        """The sender takes every queued batch into a request."""
        for queue in self._message_accumulator._batches.values():
            while queue:
                self.in_flight.append(queue.popleft())

    def reply(self, error: Exception | None = None) -> None:
        for queued in self.in_flight:
            if error is None:
                queued.future.set_result(None)
            else:
                queued.future.set_exception(error)
        self.in_flight.clear()

    def acked(self) -> None:
        self.drain()
        self.reply()


def test_one_batch_per_partition_in_order_on_the_keys_partition() -> None:
    producer = Producer()
    deliveries = Deliveries(5.0)
    users = [f"user-{i}".encode() for i in range(20)]
    records: list[Record] = [("recs", u, b"r%d" % i, None, None) for i, u in enumerate(users)]
    records += [("by-user", users[0], b"fwd", [("trace", b"1")], 1_700_000_000.5)]

    async def main() -> int:
        n = await Publisher(lambda: producer, deliveries).publish(records)
        producer.acked()
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
        producer.acked()
        return await deliveries.confirm()

    assert asyncio.run(main()) == 5  # the records the three futures stand for
    assert [[v for _, v, _, _ in r] for _, _, r in producer.sent] == [[b"0", b"1"], [b"2", b"3"], [b"4"]]


def test_records_join_the_batch_still_queued_instead_of_waiting_for_the_request_in_flight() -> None:
    """A second micro-batch while the first's batch waits for the sender: its records are appended
    to that batch (aiokafka's ``send_batch`` would wait for the broker's reply to the request in
    flight); once it is full the rest go in a new batch; after the sender took it, a new batch."""
    producer = Producer(room=4)
    deliveries = Deliveries(5.0)
    publisher = Publisher(lambda: producer, deliveries)

    def records(*values: bytes) -> list[Record]:
        return [("recs", b"same-user", v, None, None) for v in values]

    async def main() -> None:
        await publisher.publish(records(b"0", b"1"))
        await publisher.publish(records(b"2", b"3", b"4"))  # 2 and 3 fit the queued batch
        assert [[v for _, v, _, _ in r] for _, _, r in producer.sent] == [[b"0", b"1", b"2", b"3"], [b"4"]]
        first = deliveries.take()
        producer.drain()  # both batches taken into a request
        await publisher.publish(records(b"5"))  # nothing queued: a batch of its own
        assert [[v for _, v, _, _ in r] for _, _, r in producer.sent][-1] == [b"5"]
        producer.reply()
        assert await first.confirm() == 5
        producer.drain()
        producer.reply(RuntimeError("NotLeaderForPartition"))
        with pytest.raises(DeliveryFailed, match="NotLeaderForPartition"):
            await deliveries.confirm()

    asyncio.run(main())


def test_records_appended_to_a_queued_batch_fail_with_it() -> None:
    producer = Producer()
    deliveries = Deliveries(5.0)
    publisher = Publisher(lambda: producer, deliveries)

    async def main() -> None:
        await publisher.publish([("recs", b"u", b"first", None, None)])
        sent_first = deliveries.take()
        await publisher.publish([("recs", b"u", b"appended", None, None)])
        assert len(producer.sent) == 1 and len(deliveries) == 1
        producer.drain()
        producer.reply(RuntimeError("MessageSizeTooLarge"))
        for taken in (sent_first, deliveries.take()):
            with pytest.raises(DeliveryFailed, match="MessageSizeTooLarge"):
                await taken.confirm()

    asyncio.run(main())
