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

A packed changelog (``packed=True``, the baseline's ``items`` table) sends a partition's changed
keys as a few records instead of one per key: each record (``packed_key``) carries many keys and
their values (``pack``), and the table unpacks them when faust recovers it or keeps a standby
replica (``unpacked``, from ``apply_changelog_batch``; the store holds the keys as before). A
compacted topic keeps every packed record, since each has a key of its own, so every write also
packs again as many unchanged keys of the partition as it has changed ones (a cursor over the
store, ``_Cycle``); once the cursor has been through the whole partition, every record packed
before it started holds only values packed again since, and is deleted with a tombstone. The
changelog then holds two to four times the partition's statistics (a pass packs every key once
more, and as many changed ones; the previous pass's records stay until the current one is
through), and any prefix of it, read
in order, gives the same store as faust's per-key records would. A packed table never deletes a
key (``ValueError``): the baseline's statistics only grow.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable, Iterator
from itertools import takewhile
from typing import Any

from aiokafka.structs import TopicPartition
from rocksdict import WriteBatch

from streams.delivery import Deliveries
from streams.producer import known_without_narrowing
from streams.writeback import Scope

_ENTRY = struct.Struct(">HI")  # key length, value length
_VERSION = b"\x01"
MARKER = b"1"  # the store's value under a packed record's key: the record is in the changelog


def packed_key(partition: int, seq: int) -> bytes:
    """The key of a packed record: no ``/``, so it is never a ``b"<partition>/<item>"`` key,
    and the partition's digits first, so ``partition_of_key`` and RocksDB's order work on it."""
    return b"%d\x00%016x" % (partition, seq)


def is_packed_key(key: bytes) -> bool:
    return b"/" not in key


def _seq_of(key: bytes) -> int:
    return int(key[key.index(b"\x00") + 1 :], 16)


def pack(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Keys and values as one record value: a version byte, then per entry its lengths and bytes."""
    return next(pack_chunks(entries, 0), _VERSION)


def pack_chunks(entries: Iterable[tuple[bytes, bytes]], limit: int) -> Iterator[bytes]:
    """``entries`` as ``pack``ed values of about ``limit`` bytes each (0: one value)."""
    parts, size, entry = [_VERSION], 0, _ENTRY.pack
    for key, value in entries:
        parts += (entry(len(key), len(value)), key, value)
        size += len(key) + len(value)
        if limit and size >= limit:
            yield b"".join(parts)
            parts, size = [_VERSION], 0
    if len(parts) > 1:
        yield b"".join(parts)


def unpack(blob: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The entries of a ``pack``ed value, in order."""
    if blob[:1] != _VERSION:
        raise ValueError(f"a packed changelog record of unknown version {blob[:1]!r}")
    at, end, size = 1, len(blob), _ENTRY.size
    while at < end:
        klen, vlen = _ENTRY.unpack_from(blob, at)
        at += size
        yield blob[at : at + klen], blob[at + klen : at + klen + vlen]
        at += klen + vlen


class _Entry:
    """One unpacked key as a changelog event and its message (all a faust store reads of them)."""

    __slots__ = ("key", "offset", "partition", "tp", "value")

    def __init__(self, message: Any, key: bytes, value: bytes | None) -> None:
        self.key, self.value = key, value
        self.tp, self.offset, self.partition = message.tp, message.offset, message.partition

    @property
    def message(self) -> _Entry:
        return self


def unpacked(batch: Iterable[Any]) -> Iterator[Any]:
    """Changelog events with every packed record replaced by its entries (the record's own key
    first, stored as ``MARKER``; a tombstone of it deletes that), for a store's
    ``apply_changelog_batch``; other events pass as they are."""
    for event in batch:
        msg = event.message
        key = msg.key
        if key is None or not is_packed_key(key):
            yield event
        elif msg.value is None:
            yield _Entry(msg, key, None)
        else:
            yield _Entry(msg, key, MARKER)
            for k, v in unpack(msg.value):
                yield _Entry(msg, k, v)


class _Cycle:
    """One partition's packed records: the live ones (``seqs``), the next number, and the cursor
    of the pass that packs unchanged keys again; records numbered below ``start`` are deleted
    when the pass is through."""

    __slots__ = ("cursor", "next_seq", "seqs", "snapshot", "start")

    def __init__(self, seqs: set[int]) -> None:
        self.seqs = seqs
        self.next_seq = max(seqs, default=-1) + 1
        self.start = self.next_seq
        self.cursor: bytes | int | None = None  # RocksDB: the last key visited; else an index
        self.snapshot: list[bytes] | None = None  # the in-memory store's keys as the pass began


class DirectChangelog:
    """Writes checkpoints of ``table`` (a raw-bytes faust table) to its store and changelog."""

    def __init__(
        self,
        table: Any,
        producer: Callable[[], Any],
        deliveries: Deliveries,
        *,
        packed: bool = False,
        packed_bytes: int = 256 * 1024,
    ) -> None:
        """``producer()``: the started aiokafka producer (faust's ``app.producer._ensure_producer``);
        ``packed``: pack the changelog records, each up to about ``packed_bytes``."""
        self.table = table
        self.producer = producer
        self.deliveries = deliveries
        self.packed = packed
        self.packed_bytes = packed_bytes
        self.cycles: dict[int, _Cycle] = {}

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop what is known of the packed records of ``partitions`` (revoked: another worker
        may write them before they come back; then their markers in the store say which exist)."""
        for p in partitions:
            self.cycles.pop(p, None)

    async def write(
        self, changes: dict[bytes, bytes | None], scope: Scope, deliveries: Deliveries | None = None
    ) -> int:
        """Store ``changes`` and send them to the changelog, a partition at a time, letting other
        tasks run between partitions; returns how many keys were written (a delete of a key the
        store does not hold writes nothing). The record batches' futures join ``deliveries``
        (default: the one given at construction)."""
        store = self.table.data
        changed: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for key, value in changes.items():
            changed.setdefault(self.table.partition_for_key(key), []).append((key, value))
        if not changed:
            return 0
        collect = self.deliveries if deliveries is None else deliveries
        topic = self.table.changelog_topic.get_topic_name()
        producer = self.producer()
        await known_without_narrowing(producer.client, topic)
        written = 0
        for partition, records in changed.items():
            if self.packed:
                sent, markers = self._packed(store, partition, records)
                self._store(store, partition, records + markers, scope)
                written += len(records)  # every one a put: a packed changelog deletes no key
            else:
                sent = self._store(store, partition, records, scope)
                written += len(sent)
            if sent:
                await self._send_all(producer, sent, topic, partition, collect)
            await asyncio.sleep(0)  # batches go on between partitions (a checkpoint writes unlocked)
        return written

    async def _send_all(
        self,
        producer: Any,
        records: list[tuple[bytes, bytes | None]],
        topic: str,
        partition: int,
        deliveries: Deliveries,
    ) -> None:
        batch, n = producer.create_batch(), 0
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
                await self._send(producer, batch, topic, partition, n, deliveries)
                batch, n = producer.create_batch(), 0
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a {topic} record of {len(value or b'')} bytes fits in no batch")
            n += 1
        await self._send(producer, batch, topic, partition, n, deliveries)

    @staticmethod
    def _store(
        store: Any, partition: int, records: list[tuple[bytes, bytes | None]], scope: Scope
    ) -> list[tuple[bytes, bytes | None]]:
        if getattr(store, "use_rocksdict", False):
            return _write_rocksdb(store, partition, records)
        return _write_each(store, partition, records, scope)

    def _packed(
        self, store: Any, partition: int, changed: list[tuple[bytes, bytes | None]]
    ) -> tuple[list[tuple[bytes, bytes | None]], list[tuple[bytes, bytes | None]]]:
        """The changelog records of ``changed`` (about to be written to ``partition``'s store)
        packed, with as many unchanged keys of the partition packed again, and the tombstones of
        the records that a finished pass over the partition made redundant; and the markers to
        store with them."""
        entries: list[tuple[bytes, bytes]] = []
        for key, value in changed:
            if value is None:
                raise ValueError(f"{key!r}: a packed changelog does not delete keys")
            entries.append((key, value))
        cycle = self.cycles.get(partition)
        if cycle is None:
            cycle = self.cycles[partition] = _Cycle(_markers(store, partition))
        again, through = _revisit(store, partition, cycle, len(entries), {key for key, _ in entries})
        records: list[tuple[bytes, bytes | None]] = []
        for value in pack_chunks(entries + again, self.packed_bytes):
            records.append((packed_key(partition, cycle.next_seq), value))
            cycle.next_seq += 1
        markers: list[tuple[bytes, bytes | None]] = [(key, MARKER) for key, _ in records]
        cycle.seqs.update(_seq_of(key) for key, _ in records)
        if through:  # every record numbered below ``start`` holds only values packed again since
            old = sorted(s for s in cycle.seqs if s < cycle.start)
            cycle.seqs.difference_update(old)
            tombstones: list[tuple[bytes, bytes | None]] = [(packed_key(partition, s), None) for s in old]
            records += tombstones
            markers += tombstones
            cycle.start, cycle.cursor, cycle.snapshot = cycle.next_seq, None, None
        return records, markers

    async def _send(
        self, producer: Any, batch: Any, topic: str, partition: int, n: int, deliveries: Deliveries
    ) -> None:
        fut = await producer.send_batch(batch, topic, partition=partition)
        store = self.table.data
        tp = TopicPartition(topic, partition)

        def persisted(done: Any) -> None:
            if not done.cancelled() and done.exception() is None:
                store.set_persisted_offset(tp, done.result().offset + n - 1)

        fut.add_done_callback(persisted)
        deliveries.add(fut, topic, n)


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


def _markers(store: Any, partition: int) -> set[int]:
    """The numbers of the packed records of ``partition`` in the changelog, from their markers
    in the store (written with them, and by recovery)."""
    prefix = b"%d\x00" % partition
    if getattr(store, "use_rocksdict", False):
        keys = store._db_for_partition(partition).keys(from_key=prefix)
        return {_seq_of(key) for key in takewhile(lambda key: key.startswith(prefix), keys)}
    return {_seq_of(key) for key in list(store.keys()) if key.startswith(prefix)}


def _revisit(
    store: Any, partition: int, cycle: _Cycle, n: int, skip: set[bytes]
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Up to ``n`` keys of ``partition`` (those in ``skip`` count, unreturned) and their values
    from where ``cycle``'s pass stopped; and whether the pass is through."""
    prefix = b"%d/" % partition
    out: list[tuple[bytes, bytes]] = []
    if getattr(store, "use_rocksdict", False):
        cursor = cycle.cursor if isinstance(cycle.cursor, bytes) else None
        seen = 0
        for key, value in store._db_for_partition(partition).items(from_key=cursor or prefix):
            if key == cursor:
                continue
            if seen == n:
                return out, not key.startswith(prefix)
            if not key.startswith(prefix):
                return out, True
            if key not in skip:
                out.append((key, value))
            cycle.cursor = key
            seen += 1
        return out, True
    if cycle.snapshot is None:
        cycle.snapshot = [key for key in list(store.keys()) if key.startswith(prefix)]
        cycle.cursor = 0
    at = int(cycle.cursor or 0)
    end = min(at + n, len(cycle.snapshot))
    for key in cycle.snapshot[at:end]:
        value = store.get(key) if key not in skip else None
        if value is not None:
            out.append((key, value))
    cycle.cursor = end
    return out, end >= len(cycle.snapshot)
