"""A batch's records handed to the producer as one aiokafka record batch per topic partition.

In: (topic, key, value, headers, timestamp) records, keyed (the worker keys every output by user
id). Out: the records queued in the producer, in their order within each partition, the futures
of their batches in the worker's ``Deliveries`` (confirmed before any offset after them is
committed, ``streams.consumer``).

Why: ``app.producer.send`` per record goes through faust's producer, the metadata check, the
serialisers, the partitioner and the accumulator, and returns a future per record; a batch of 64
events makes 64 recommendations and, on the router, 64 forwards. Here each record is one append to
a batch builder, and a partition's records share one future. The partition is the producer's own
partitioner's choice for the key (murmur2, as ``send`` would choose), so consumers and the tables
see the same placement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from streams.delivery import Deliveries
from streams.producer import known_without_narrowing

Record = tuple[str, bytes, bytes, Sequence[tuple[str, bytes]] | None, float | None]  # timestamp in s


class Publisher:
    def __init__(self, producer: Callable[[], Any], deliveries: Deliveries) -> None:
        """``producer()``: the started aiokafka producer (faust's ``app.producer._ensure_producer``)."""
        self.producer = producer
        self.deliveries = deliveries

    async def publish(self, records: Iterable[Record]) -> int:
        """Queue ``records``; returns how many. Their futures join ``deliveries``."""
        producer = self.producer()
        partitioner = producer._partitioner
        known: dict[str, tuple[list[int], list[int]]] = {}  # topic -> (all, available) partitions
        parts: dict[tuple[str, int], list[Record]] = {}
        for rec in records:
            topic, key = rec[0], rec[1]
            where = known.get(topic)
            if where is None:
                await known_without_narrowing(producer.client, topic)
                await producer.client._wait_on_metadata(topic)  # known now: this narrows nothing
                cluster = producer.client.cluster
                where = known[topic] = (
                    sorted(cluster.partitions_for_topic(topic)),
                    sorted(cluster.available_partitions_for_topic(topic)),
                )
            parts.setdefault((topic, partitioner(key, *where)), []).append(rec)
        total = 0
        for (topic, partition), recs in parts.items():
            batch, n = producer.create_batch(), 0
            for _, key, value, headers, ts in recs:
                stamp = int(ts * 1000) if ts else None
                if batch.append(key=key, value=value, timestamp=stamp, headers=headers or []) is None:
                    sent = await producer.send_batch(batch, topic, partition=partition)
                    self.deliveries.add(sent, topic, n)
                    batch, n = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=stamp, headers=headers or []) is None:
                        raise ValueError(f"a {topic} record of {len(value)} bytes fits in no batch")
                n += 1
            self.deliveries.add(await producer.send_batch(batch, topic, partition=partition), topic, n)
            total += len(recs)
        return total
