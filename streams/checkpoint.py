"""Checkpoints of the worker's tables: what an offset commit writes, and when batches wait for it.

In: the tables' write-back views with their changelogs (``streams.writeback``,
``streams.changelog``), the lock that batches and timers hold while they touch the tables
(``work``), and the ``Deliveries`` that collect the futures of the records they send. Out:
``checkpoint()``, the context every offset commit enters (``streams.consumer``), and
``write_pending()`` for the writes that cannot wait for a commit (a full buffer, cart timers,
the expiry sweep, a rebalance).

A checkpoint, under ``work``, takes every pending change and every record sent so far, and the
consumer computes the offsets to commit (nothing is awaited in between, so every event acked by
then has its state changes and records among those taken). It then releases ``work`` and writes
the changes, a changelog partition at a time, while batches go on: they read the changes being
written from the write-back views (``WriteBack.writing``), never the older value in a store.
Only once those changelog writes and the records taken are acknowledged are the offsets
committed. So an offset is committed only once every output and state change of the events
before it is in Kafka, as when the checkpoint wrote under the lock.

Why: written under the lock, a checkpoint stopped scoring for the whole write: at 1,000
events/s on two cores with the 65k-item slice model, about 30 ms every commit interval (some 2,000
user states and 3,600 item statistics), and the events queued behind it were most of the
end-to-end latency's tail (README, Benchmarks).

Writes happen one at a time (``writing``), in the order their changes were taken: a batch's
early write, a timer's or a rebalance's waits for a checkpoint's write under way, so a key's
older value is never stored after its newer one. A write that fails puts its changes back among
the pending ones (unless newer ones are pending); the checkpoint then commits nothing, but still
confirms the records it took, whose events the next commit covers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from streams.changelog import DirectChangelog
from streams.delivery import Deliveries
from streams.writeback import Scope, WriteBack

Changes = dict[bytes, bytes | None]


class Checkpoints:
    """The checkpoints of ``tables`` (write-back view, changelog), taken under ``work``.

    ``sources``: the ``Deliveries`` of records whose events a commit covers (the scorer's, the
    router's); ``metrics``: ``streams.metrics.Metrics``, or None."""

    def __init__(
        self,
        tables: Sequence[tuple[WriteBack, DirectChangelog]],
        scope: Scope,
        work: asyncio.Lock,
        sources: Sequence[Deliveries],
        timeout_s: float,
        metrics: Any = None,
    ) -> None:
        self.tables = list(tables)
        self.scope = scope
        self.work = work
        self.sources = list(sources)
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.writing = asyncio.Lock()  # one write at a time, in the order taken

    def pending(self) -> int:
        """How many changed keys wait for a write."""
        return sum(len(wb.pending) for wb, _ in self.tables)

    async def _write(self, taken: list[Changes], into: Deliveries | None = None) -> int:
        """Write ``taken`` (one dict per table), holding ``writing``; a table's changes that
        could not be written become pending again."""
        n = 0
        for (wb, changelog), changes in zip(self.tables, taken, strict=True):
            stored = False
            try:
                n += await changelog.write(changes, self.scope, into)
                stored = True
            finally:
                wb.written(changes, stored)
        if self.metrics is not None:
            self.metrics.checkpoint_keys.inc(n)
        return n

    async def write_pending(self, partitions: set[int] | None = None, keys: set[bytes] | None = None) -> int:
        """Write the pending changes (of ``partitions`` and ``keys`` where given, else all) to the
        stores and changelogs, after any write under way; their futures join each changelog's
        own ``Deliveries``, so its owner's next ``confirm()`` waits for them. Returns how many
        keys were written."""
        async with self.writing:
            return await self._write([wb.take(partitions, keys) for wb, _ in self.tables])

    @asynccontextmanager
    async def checkpoint(self) -> AsyncIterator[None]:
        """Entered by every offset commit, which computes its offsets inside (module docstring);
        on exit the changes taken are written with ``work`` released, and the records taken
        and those writes are confirmed (``DeliveryFailed``: one was refused or timed out)."""
        async with self.work:
            started = time.perf_counter()
            await self.writing.acquire()  # after a write still under way: in the order taken
            # nothing awaited from here to the offsets (module docstring)
            changes = [wb.take() for wb, _ in self.tables]
            records = [d.take() for d in self.sources]
            try:
                yield
            except BaseException:  # no offsets: all that was taken waits for the next commit
                for (wb, _), batch in zip(self.tables, changes, strict=True):
                    wb.written(batch, stored=False)
                for source, taken in zip(self.sources, records, strict=True):
                    source.put_back(taken)
                self.writing.release()
                raise
            if self.metrics is not None:
                self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        written = Deliveries(self.timeout_s)
        started = time.perf_counter()
        try:
            try:
                await self._write(changes, written)
            finally:
                self.writing.release()
            if self.metrics is not None:
                self.metrics.checkpoint_write_seconds.observe(time.perf_counter() - started)
        finally:  # even when the write failed: the next commit covers these records' events
            for taken in [*records, written.take()]:
                n = await taken.confirm()
                if self.metrics is not None:
                    self.metrics.delivered.inc(n)
