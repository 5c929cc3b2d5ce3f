"""Table writes held in memory until the next checkpoint: one changelog record per changed key
per commit interval, not one per micro-batch.

In: a faust table (any ``MutableMapping[bytes, bytes]``) and how to find a key's partition. Out:
a mapping that reads through to the table and keeps every write and delete in ``pending`` until
``flush()`` writes each changed key once (a delete as the table's delete: a changelog
tombstone).

Why it keeps every guarantee: the worker takes the pending changes inside the consumer's
commit, under the lock that batches and timers hold (``streams.consumer.ShopstreamConsumer.commit``),
at the moment faust computes the offsets to commit; it writes them after releasing the lock and
awaits their changelog acknowledgements before it commits those offsets. An offset is therefore
committed only once the state of every event before it is in the changelog. Changes taken and
not yet written stay readable here (``writing``) until ``written()``, so batches that run
meanwhile read them and never the older value in the store. A crash before a
checkpoint loses the pending writes and the uncommitted offsets together: the events are
redelivered and folded again from the last checkpointed state. Flushing early (a full buffer, a
timer, a rebalance) is always safe: state ahead of the committed offsets is the ordinary
at-least-once case (redelivered events are recognised by id and their promotions re-sent from
the user's outbox).

Measured on REES46 (two copies, 34,868 events, 8 partitions, ``bench/ceilings.py``): per-batch
writes cost about 0.95 user and 2.1 baseline changelog records per event; once per checkpoint,
0.32-0.37 and 0.63-0.75; with the baseline's records packed as well (``streams.changelog``),
0.32-0.37 and under 0.01.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

Scope = Callable[[int], AbstractContextManager[Any]]


class WriteBack(MutableMapping[bytes, bytes]):
    """A write-back view of ``table``; ``pending`` maps changed keys to their value (None:
    deleted), ``writing`` the changes taken and not yet ``written()``. Reads look in ``pending``,
    then ``writing``, then the table."""

    def __init__(self, table: MutableMapping[bytes, bytes], partition_of: Callable[[bytes], int]) -> None:
        self.table = table
        self.partition_of = partition_of
        self.pending: dict[bytes, bytes | None] = {}
        self.writing: dict[bytes, bytes | None] = {}
        self._stored: Callable[[bytes], bytes | None] | None = None  # chosen at the first read

    def stored(self, key: bytes) -> bytes | None:
        """The table's own value of ``key`` (None: absent), below the pending and written changes.

        faust's RocksDB store is read straight from the database of the key's partition
        (``partition_of``, the partition every write of the key goes to: ``_write_rocksdb``,
        ``flush`` through the table, recovery from that changelog partition): one RocksDB read.
        Through the table's mapping a read costs two (``__contains__``, then ``__getitem__``)
        with the current-event lookup, the key-index cache and the table's sensors on the way:
        about 10 us a read against 3.4 (``bench/state_reads.py``). Any other store (the
        in-memory one, a plain dict in tests) is read through its mapping."""
        read = self._stored
        if read is None:
            read = self._stored = self._reader()
        return read(key)

    def _reader(self) -> Callable[[bytes], bytes | None]:
        store = getattr(self.table, "data", None)
        if not getattr(store, "use_rocksdict", False):
            return self.table.get
        db_for, partition_of = store._db_for_partition, self.partition_of  # type: ignore[union-attr]

        def read(key: bytes) -> bytes | None:
            value: bytes | None = db_for(partition_of(key)).get(key)
            return value

        return read

    def __getitem__(self, key: bytes) -> bytes:
        if key in self.pending:
            value = self.pending[key]
        elif self.writing and key in self.writing:
            value = self.writing[key]
        else:
            value = self.stored(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: bytes, default: Any = None) -> Any:
        if key in self.pending:
            value = self.pending[key]
        elif self.writing and key in self.writing:
            value = self.writing[key]
        else:
            value = self.stored(key)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        if key in self.pending:
            return self.pending[key] is not None
        if self.writing and key in self.writing:
            return self.writing[key] is not None
        return isinstance(key, bytes) and self.stored(key) is not None

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.pending[key] = value

    def __delitem__(self, key: bytes) -> None:
        if key not in self:
            raise KeyError(key)
        self.pending[key] = None

    def __iter__(self) -> Iterator[bytes]:
        pending, writing = self.pending, self.writing
        for key in self.table:
            if key not in pending and key not in writing:
                yield key
        yield from (k for k, v in writing.items() if v is not None and k not in pending)
        yield from (k for k, v in pending.items() if v is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def take(
        self, partitions: set[int] | None = None, keys: set[bytes] | None = None
    ) -> dict[bytes, bytes | None]:
        """Remove and return the pending changes (only those of ``partitions`` and of ``keys``,
        where given): what a checkpoint writes (``streams.changelog.DirectChangelog``). They stay
        readable until the caller reports them ``written()``."""
        if partitions is None and keys is None:
            batch, self.pending = self.pending, {}
        else:
            chosen = self.pending if keys is None else {k: None for k in keys if k in self.pending}
            picked = [k for k in chosen if partitions is None or self.partition_of(k) in partitions]
            batch = {k: self.pending.pop(k) for k in picked}
        self.writing.update(batch)
        return batch

    def written(self, batch: dict[bytes, bytes | None], stored: bool = True) -> None:
        """``batch`` (from ``take``) is in the table (``stored``), or failed to be written, in
        which case its changes become pending again where nothing newer is; either way they leave
        ``writing`` unless a later ``take`` holds a newer value of the key."""
        writing, pending = self.writing, self.pending
        for key, value in batch.items():
            if key in writing and writing[key] is value:
                del writing[key]
                if not stored:
                    pending.setdefault(key, value)

    def flush(
        self,
        scope: Scope = lambda _p: nullcontext(),
        partitions: set[int] | None = None,
        keys: set[bytes] | None = None,
    ) -> int:
        """Write the pending changes (as ``take``) through the table's own ``__setitem__`` and
        ``__delitem__``, each inside ``scope(partition)``; returns how many keys were written or
        deleted."""
        batch = self.take(partitions, keys)
        stored = False
        try:
            for key, value in batch.items():
                with scope(self.partition_of(key)):
                    if value is not None:
                        self.table[key] = value
                    elif key in self.table:
                        del self.table[key]
            stored = True
        finally:
            self.written(batch, stored)
        return len(batch)

    def discard(self, partitions: set[int]) -> int:
        """Drop the pending changes of ``partitions`` unwritten (partitions this worker no longer
        owns and could not flush); returns how many."""
        gone = [k for k in self.pending if self.partition_of(k) in partitions]
        for k in gone:
            del self.pending[k]
        return len(gone)
