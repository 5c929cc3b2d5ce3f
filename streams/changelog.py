"""A checkpoint of a faust table written without faust's per-record path.

In: the changed keys of one table since the last checkpoint (``streams.writeback.WriteBack``),
key -> value bytes or None (deleted). Out: the table's store updated, and one aiokafka record
batch per changelog partition whose future joins the worker's ``Deliveries``; once the broker
acknowledges a batch, the partition's persisted changelog offset in the store moves to its last
record (what faust's ``Collection._on_changelog_sent`` does per record, so a restart recovers
from there).

Why: a table write through faust (``table[key] = value``) costs a changelog record its own trip
through ``send_changelog`` -> ``Topic.send_soon`` -> the producer buffer task -> the producer ->
a future, a callback and a RocksDB write of the persisted offset (about 12 % of the worker's CPU
at 1.2 changelog records per event on REES46, py-spy). A checkpoint writes many keys at once:
one RocksDB write batch, one record batch and one callback per partition. The records are the same
(key, value or a tombstone, on the partition faust would choose: ``table.partition_for_key``),
so recovery and standby replicas read them as faust's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiokafka.structs import TopicPartition
from rocksdict import WriteBatch

from streams.delivery import Deliveries
from streams.producer import known_without_narrowing
from streams.writeback import Scope


class DirectChangelog:
    """Writes checkpoints of ``table`` (a raw-bytes faust table) to its store and changelog."""

    def __init__(self, table: Any, producer: Callable[[], Any], deliveries: Deliveries) -> None:
        """``producer()``: the started aiokafka producer (faust's ``app.producer._ensure_producer``)."""
        self.table = table
        self.producer = producer
        self.deliveries = deliveries

    async def write(self, changes: dict[bytes, bytes | None], scope: Scope) -> int:
        """Store ``changes`` and send them to the changelog; returns how many were written (a
        delete of a key the store does not hold writes nothing)."""
        store = self.table.data
        changed: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for key, value in changes.items():
            changed.setdefault(self.table.partition_for_key(key), []).append((key, value))
        parts: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for partition, records in changed.items():
            if getattr(store, "use_rocksdict", False):
                stored = _write_rocksdb(store, partition, records)
            else:
                stored = _write_each(store, partition, records, scope)
            if stored:
                parts[partition] = stored
        if not parts:
            return 0
        topic = self.table.changelog_topic.get_topic_name()
        producer = self.producer()
        await known_without_narrowing(producer.client, topic)
        written = 0
        for partition, records in parts.items():
            batch, n = producer.create_batch(), 0
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
                    await self._send(producer, batch, topic, partition, n)
                    batch, n = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a {topic} record of {len(value or b'')} bytes fits in no batch")
                n += 1
            await self._send(producer, batch, topic, partition, n)
            written += len(records)
        return written

    async def _send(self, producer: Any, batch: Any, topic: str, partition: int, n: int) -> None:
        fut = await producer.send_batch(batch, topic, partition=partition)
        store = self.table.data
        tp = TopicPartition(topic, partition)

        def persisted(done: Any) -> None:
            if not done.cancelled() and done.exception() is None:
                store.set_persisted_offset(tp, done.result().offset + n - 1)

        fut.add_done_callback(persisted)
        self.deliveries.add(fut, topic, n)


def _write_rocksdb(
    store: Any, partition: int, records: list[tuple[bytes, bytes | None]]
) -> list[tuple[bytes, bytes | None]]:
    """Write ``records`` to faust's RocksDB store of ``partition`` as one write batch (as faust's
    own ``apply_changelog_batch`` does in recovery); returns those written.

    faust's per-key path (``store[key] = value``) costs each key the current-event lookup, its
    key-index cache and a RocksDB write of its own: about 10-17 us per key in the worker at 1,000
    events/s, 70 ms per 2 s checkpoint with the scoring stopped (``bench/end_to_end.py``). The
    key index is left alone: it only shortcuts lookups made outside a partition's scope, which
    search every partition's database when a key is not indexed, and a key never changes
    partition."""
    db = store._db_for_partition(partition)
    batch = WriteBatch(raw_mode=True)
    written = []
    for key, value in records:
        if value is not None:
            batch.put(key, value)
        elif db.get(key) is not None:
            batch.delete(key)
        else:
            continue  # a delete of a key never stored: no tombstone either
        written.append((key, value))
    if written:
        db.write(batch)
    return written


def _write_each(
    store: Any, partition: int, records: list[tuple[bytes, bytes | None]], scope: Scope
) -> list[tuple[bytes, bytes | None]]:
    """Write ``records`` through the store's own mapping (the in-memory store), inside
    ``scope(partition)``; returns those written."""
    written = []
    with scope(partition):
        for key, value in records:
            if value is not None:
                store[key] = value
            elif key in store:
                del store[key]
            else:
                continue
            written.append((key, value))
    return written
