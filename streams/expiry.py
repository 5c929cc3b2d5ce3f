"""Idle-user expiry: an in-memory index of when each user of the ``users`` table goes idle.

In: ``touch(partition, key, seen_ms)`` after each write of a user's state (O(1)), ``seed`` with a
partition's stored ``(key, raw state)`` pairs when it is assigned, ``drop`` when it is revoked,
``forget`` when a user's state was deleted otherwise (an erasure).
Out: ``sweep`` deletes from the table the users whose worker-clock last-seen time is older than
the TTL (or replaces a state with what must outlive it, ``keep``) and returns how many it deleted;
``pending`` counts indexed users (a gauge).

Why this shape rather than a full table scan per tick:
- Bounded work per tick: users sit in coarse buckets of their expiry time (``bucket_ms``), so a
  sweep looks only at buckets wholly in the past and at most ``limit`` users, however large the
  table. A user goes between 0 and ``bucket_ms`` after the TTL runs out.
- Re-check before delete: the index may be stale (a write not touched, a partition restored from
  its changelog), so each due user's stored state is re-read and deleted only if still idle; one
  who came back is re-indexed at the stored time, one already gone is forgotten. ``sweep`` never
  awaits, so no event is folded and no rebalance happens between the check and the delete.
- Owned partitions only: ``due`` and ``sweep`` take the partitions the worker owns now and leave
  every other key alone, even one still indexed.

Memory (tracemalloc, CPython 3.11, 16-byte keys; ``test_memory_per_user_and_per_bucket``): about
150 bytes per indexed user (110-210 as the dict and set tables double: an entry in each plus the
key's bytes), and about 270 per non-empty bucket, of which a partition has at most
ttl / bucket_ms (43,200 for 30 days by the minute).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, MutableMapping
from contextlib import AbstractContextManager
from itertools import groupby
from operator import itemgetter
from typing import Any

from streams.state import seen_ms_of


class _Bucket:
    """The users whose expiry time falls in one ``bucket_ms`` slot (``where`` refers to it, so a
    user costs no int object of its own)."""

    __slots__ = ("id", "keys")

    def __init__(self, id_: int) -> None:
        self.id = id_
        self.keys: set[bytes] = set()


class _Partition:
    __slots__ = ("buckets", "heap", "where")

    def __init__(self) -> None:
        self.buckets: dict[int, _Bucket] = {}
        self.heap: list[int] = []  # bucket ids, oldest on top; may hold ids of emptied buckets
        self.where: dict[bytes, _Bucket] = {}  # key -> its bucket

    def put(self, key: bytes, bucket_id: int) -> None:
        old = self.where.get(key)
        if old is not None:
            if old.id == bucket_id:
                return
            self.forget(key)
        bucket = self.buckets.get(bucket_id)
        if bucket is None:
            bucket = self.buckets[bucket_id] = _Bucket(bucket_id)
            heapq.heappush(self.heap, bucket_id)
            if len(self.heap) > 2 * len(self.buckets) + 64:  # ids of emptied buckets piled up
                self.heap = sorted(self.buckets)
        bucket.keys.add(key)
        self.where[key] = bucket

    def forget(self, key: bytes) -> None:
        bucket = self.where.pop(key, None)
        if bucket is not None:
            bucket.keys.discard(key)
            if not bucket.keys:
                del self.buckets[bucket.id]  # its id stays in the heap until it reaches the top

    def oldest(self) -> int | None:
        """The oldest non-empty bucket's id."""
        while self.heap and self.heap[0] not in self.buckets:
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else None


class ExpiryIndex:
    """Per partition, the users of the ``users`` table by the time they go idle.

    A user is idle at ``now_ms`` when ``seen_ms < now_ms - ttl_ms`` (worker clock, ms)."""

    def __init__(self, ttl_ms: int, bucket_ms: int = 60_000) -> None:
        if ttl_ms < 0 or bucket_ms <= 0:
            raise ValueError(f"need ttl_ms >= 0 and bucket_ms > 0, got {ttl_ms} and {bucket_ms}")
        self.ttl_ms = ttl_ms
        self.bucket_ms = bucket_ms
        self._parts: dict[int, _Partition] = {}

    def touch(self, partition: int, key: bytes, seen_ms: int) -> None:
        """Index (or move) ``key`` at its latest last-seen time."""
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition()
        part.put(key, (seen_ms + self.ttl_ms) // self.bucket_ms)

    def seed(self, partition: int, entries: Iterable[tuple[bytes, bytes]]) -> int:
        """Rebuild a partition's index from its stored states; returns the users indexed."""
        part = self._parts[partition] = _Partition()
        for key, raw in entries:
            part.put(key, (seen_ms_of(raw) + self.ttl_ms) // self.bucket_ms)
        return len(part.where)

    def drop(self, partition: int) -> None:
        """Forget a revoked partition (its new owner seeds its own index from the table)."""
        self._parts.pop(partition, None)

    def forget(self, partition: int, key: bytes) -> None:
        """Take one user out of the index (their state was deleted)."""
        part = self._parts.get(partition)
        if part is not None:
            part.forget(key)

    @property
    def partitions(self) -> set[int]:
        """The partitions with an index (seeded or touched, not dropped)."""
        return set(self._parts)

    def due(self, partitions: Collection[int], now_ms: int, limit: int) -> list[tuple[int, bytes]]:
        """Take out of the index up to ``limit`` ``(partition, key)`` of the given partitions whose
        bucket lies wholly before ``now_ms`` (oldest first); the caller re-checks each."""
        cut = now_ms // self.bucket_ms  # buckets below this ended at or before now_ms
        parts = [(p, self._parts[p]) for p in partitions if p in self._parts]
        out: list[tuple[int, bytes]] = []
        while len(out) < limit:
            best: tuple[int, int, _Partition] | None = None
            for p, part in parts:
                top = part.oldest()
                if top is not None and top < cut and (best is None or top < best[0]):
                    best = (top, p, part)
            if best is None:
                break
            bucket_id, p, part = best
            keys = part.buckets[bucket_id].keys
            while keys and len(out) < limit:
                key = keys.pop()
                del part.where[key]
                out.append((p, key))
            if not keys:
                del part.buckets[bucket_id]
                heapq.heappop(part.heap)
        return out

    def has_due(self, partitions: Collection[int], now_ms: int) -> bool:
        """Whether ``due`` would return anything: a caller sweeping in slices stops when False."""
        cut = now_ms // self.bucket_ms
        tops = (self._parts[p].oldest() for p in partitions if p in self._parts)
        return any(top is not None and top < cut for top in tops)

    def sweep(
        self,
        partitions: Collection[int],
        now_ms: int,
        table: MutableMapping[bytes, bytes],
        scope: Callable[[int], AbstractContextManager[Any]],
        limit: int,
        keep: Callable[[bytes, int], bytes | None] | None = None,
    ) -> int:
        """Delete up to ``limit`` due users that the table still shows idle (as of the last bucket
        boundary, so the same rule as ``due``'s, and idle now); returns how many.

        ``keep(raw, now_ms)``: what of an idle state must outlive the expiry (a marketing
        opt-out), stored instead of deleting it and indexed at its own last-seen time (stamp it
        ``now_ms``); None: delete.

        Synchronous on purpose: nothing may change the table between the re-read and the delete.
        ``scope(p)`` wraps the table accesses of partition ``p`` (see ``app.PartitionScope``)."""
        cutoff = now_ms // self.bucket_ms * self.bucket_ms - self.ttl_ms  # as ``due``: idle by then
        deleted = 0
        for p, group in groupby(self.due(partitions, now_ms, limit), key=itemgetter(0)):
            with scope(p):
                for _, key in group:
                    raw = table.get(key)
                    if raw is None:
                        continue  # deleted meanwhile: already out of the index
                    seen = seen_ms_of(raw)
                    if seen < cutoff:
                        rest = keep(raw, now_ms) if keep is not None else None
                        if rest is None:
                            del table[key]
                            deleted += 1
                        else:
                            table[key] = rest
                            self.touch(p, key, seen_ms_of(rest))
                    else:  # came back after it was indexed
                        self.touch(p, key, seen)
        return deleted

    def pending(self, partition: int | None = None) -> int:
        """Users indexed in ``partition``, or in all partitions."""
        if partition is not None:
            part = self._parts.get(partition)
            return len(part.where) if part else 0
        return sum(len(part.where) for part in self._parts.values())

    def __len__(self) -> int:
        return self.pending()
