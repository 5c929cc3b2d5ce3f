"""The streaming baseline recommender: item-to-item co-visitation plus popularity.

In: each user's new tokens and recent distinct items. Out: ranked ``(item_id, score)`` lists.
It is the recommender until a model is deployed, and afterwards the fallback for cold users,
unknown items and a missing model.

State lives in the ``items`` table as ``{"n": weight, "nb": {neighbour: weight}}`` under the
key ``b"<partition>/<item_id>"``: every partition keeps statistics from its own users (a
uniform sample of all users, since users are hashed to partitions), so the statistics move
with the partition on a rebalance and recover from the same changelog partition. Popularity
is derived from the same table and kept in memory per partition.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import orjson

from streams.changelog import is_packed_key
from streams.state import TokenKind

VERSION = "baseline-covisit-1"

# How much one token of each kind says about the item (a purchase says more than a view).
KIND_WEIGHT = {
    TokenKind.SEARCH: 1.0,
    TokenKind.VIEW: 1.0,
    TokenKind.CART_ADD: 2.0,
    TokenKind.CART_REMOVE: 0.0,
    TokenKind.PURCHASE: 3.0,
    TokenKind.REVIEW: 1.0,
}
POPULAR_SIZE = 200  # popular items kept ready per partition
POPULAR_REFRESH = 500  # recompute the popular list after this many updates


def item_key(partition: int, item_id: str) -> bytes:
    return b"%d/%s" % (partition, item_id.encode())


def partition_of_key(key: bytes) -> int:
    """The partition of an item key, or of a packed changelog record's key (``b"<p>\\x00..."``,
    ``streams.changelog.packed_key``)."""
    end = key.find(b"/")
    return int(key[: end if end >= 0 else key.index(b"\x00")])


class Popularity:
    """Decay-free popularity counts of one partition with a cached top list."""

    __slots__ = ("_dirty", "_top", "counts")

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self._top: list[tuple[str, float]] = []
        self._dirty = 0

    def add(self, item: str, weight: float) -> None:
        self.counts[item] = self.counts.get(item, 0.0) + weight
        self._dirty += 1

    def top(self) -> list[tuple[str, float]]:
        if self._dirty >= POPULAR_REFRESH or (self._dirty and len(self._top) < POPULAR_SIZE):
            self._top = heapq.nlargest(POPULAR_SIZE, self.counts.items(), key=lambda kv: kv[1])
            self._dirty = 0
        return self._top


class CovisitBaseline:
    """Maintains co-visitation statistics in a table and ranks candidates from them."""

    def __init__(self, table: MutableMapping[bytes, bytes], *, neighbors: int, window: int) -> None:
        self.table = table
        self.neighbors = neighbors
        self.window = window
        self.popular: dict[int, Popularity] = {}
        self._batch: dict[bytes, dict[str, Any]] | None = None  # decoded statistics changed in a batch

    # --- learning ----------------------------------------------------------------------------
    def observe(self, partition: int, recent: list[str], item: str, kind: int) -> None:
        """Count ``item`` and link it with the user's recent distinct items (``recent``, newest first)."""
        weight = KIND_WEIGHT.get(TokenKind(kind), 1.0)
        if not item or weight == 0.0:
            return
        key = item_key(partition, item)
        stats = self._get(key)
        stats["n"] = stats.get("n", 0.0) + weight
        nb: dict[str, float] = stats.setdefault("nb", {})
        rank = 0
        for other in recent:
            if other == item:
                continue
            w = weight / (rank + 1)
            nb[other] = nb.get(other, 0.0) + w
            okey = item_key(partition, other)
            ostats = self._get(okey)
            onb: dict[str, float] = ostats.setdefault("nb", {})
            onb[item] = onb.get(item, 0.0) + w
            self._prune(onb)
            self._put(okey, ostats)
            rank += 1
            if rank == self.window:
                break
        self._prune(nb)
        self._put(key, stats)
        self._popularity(partition).add(item, weight)

    def begin(self) -> None:
        """Hold changed statistics in memory until ``commit``: a key changed by several events
        of a batch is decoded once and written once."""
        if self._batch is None:
            self._batch = {}

    def commit(self, scope: Callable[[int], AbstractContextManager[Any]] = lambda _p: nullcontext()) -> None:
        """Write the statistics changed since ``begin``, each inside ``scope(partition)``."""
        batch, self._batch = self._batch, None
        for key, stats in (batch or {}).items():
            with scope(partition_of_key(key)):
                self.table[key] = orjson.dumps(stats)

    def _get(self, key: bytes) -> dict[str, Any]:
        if self._batch is not None:
            held = self._batch.get(key)
            if held is not None:
                return held
        raw = self.table.get(key)
        return orjson.loads(raw) if raw else {}

    def _put(self, key: bytes, stats: dict[str, Any]) -> None:
        if self._batch is not None:
            self._batch[key] = stats
        else:
            self.table[key] = orjson.dumps(stats)

    def _prune(self, nb: dict[str, float]) -> None:
        if len(nb) > 2 * self.neighbors:
            keep = heapq.nlargest(self.neighbors, nb.items(), key=lambda kv: kv[1])
            nb.clear()
            nb.update(keep)

    def _popularity(self, partition: int) -> Popularity:
        pop = self.popular.get(partition)
        if pop is None:
            pop = self.popular[partition] = Popularity()
        return pop

    def seed_popularity(self, entries: Iterable[tuple[bytes, bytes]]) -> int:
        """Rebuild the in-memory popularity from table entries (after recovery); returns items seen."""
        n = 0
        for key, raw in entries:
            if is_packed_key(key):
                continue  # the marker of a packed changelog record
            stats = orjson.loads(raw)
            partition = partition_of_key(key)
            item = key[key.index(b"/") + 1 :].decode()
            self._popularity(partition).add(item, float(stats.get("n", 0.0)))
            n += 1
        return n

    # --- ranking -----------------------------------------------------------------------------
    def recommend(
        self, partition: int, recent: list[str], exclude: set[str], k: int
    ) -> list[tuple[str, float]]:
        """Top ``k`` items for a user whose recent distinct items are ``recent`` (newest first)."""
        scores: dict[str, float] = {}
        for rank, item in enumerate(recent[: self.window]):
            nb: dict[str, float] = self._get(item_key(partition, item)).get("nb", {})
            if not nb:
                continue
            norm = max(nb.values())
            decay = 1.0 / (rank + 1)
            for other, w in nb.items():
                if other not in exclude:
                    scores[other] = scores.get(other, 0.0) + decay * w / norm
        ranked = heapq.nlargest(k, scores.items(), key=lambda kv: kv[1])
        if len(ranked) < k:
            ranked.extend(self._fill(partition, exclude, {i for i, _ in ranked}, k - len(ranked), ranked))
        return [(item, round(score, 6)) for item, score in ranked]

    def _fill(
        self,
        partition: int,
        exclude: set[str],
        taken: set[str],
        n: int,
        ranked: list[tuple[str, float]],
    ) -> Iterator[tuple[str, float]]:
        """Popular items, scored below every co-visitation candidate."""
        top = self._popularity(partition).top()
        if not top:
            return
        ceiling = min((s for _, s in ranked), default=1.0) * 0.5
        best = top[0][1] or 1.0
        for item, count in top:
            if n == 0:
                return
            if item in exclude or item in taken:
                continue
            yield item, ceiling * count / best
            n -= 1
