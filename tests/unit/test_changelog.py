"""``streams.changelog.DirectChangelog``: a checkpoint writes the store once per key and the
changelog as one batch per partition, and moves the persisted offset only once the broker has the
batch; against a fake aiokafka producer, without Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from streams.changelog import DirectChangelog
from streams.delivery import Deliveries
from streams.errors import DeliveryFailed


class Store(dict[bytes, bytes]):
    def __init__(self) -> None:
        super().__init__()
        self.persisted: dict[int, int] = {}
        self.scoped: list[int] = []

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.persisted[tp.partition] = offset


class Batch:
    def __init__(self, room: int) -> None:
        self.room = room
        self.records: list[tuple[bytes, bytes | None]] = []

    def append(self, *, key: bytes, value: bytes | None, timestamp: Any) -> Any:
        if len(self.records) == self.room:
            return None
        self.records.append((key, value))
        return object()


class Producer:
    """What ``DirectChangelog`` uses of an aiokafka producer; the test resolves the futures."""

    def __init__(self, room: int = 100) -> None:
        self.room = room
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes | None]], asyncio.Future[Any]]] = []
        self.client = SimpleNamespace(
            _topics=set(), cluster=SimpleNamespace(partitions_for_topic=lambda t: {0})
        )

    def create_batch(self) -> Batch:
        return Batch(self.room)

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, batch.records, fut))
        return fut


def table(store: Store) -> Any:
    return SimpleNamespace(
        data=store,
        partition_for_key=lambda key: int(key[:1]),
        changelog_topic=SimpleNamespace(get_topic_name=lambda: "app-users-changelog"),
    )


def run(store: Store, producer: Producer, changes: dict[bytes, bytes | None]) -> tuple[int, Deliveries]:
    deliveries = Deliveries(5.0)

    @contextmanager
    def scope(p: int) -> Iterator[None]:
        store.scoped.append(p)
        yield

    async def main() -> int:
        return await DirectChangelog(table(store), lambda: producer, deliveries).write(changes, scope)

    return asyncio.run(main()), deliveries


def test_one_batch_per_partition_and_the_in_memory_store_written_inside_its_scope() -> None:
    store, producer = Store(), Producer()
    store[b"2/old"] = b"x"
    n, deliveries = run(store, producer, {b"1/a": b"A", b"2/old": None, b"1/b": b"B", b"3/never": None})
    assert n == 3
    assert store == {b"1/a": b"A", b"1/b": b"B"}
    assert sorted(store.scoped) == [1, 2, 3]  # one scope per partition
    # the tombstone goes out; the delete of a key never stored sends nothing
    assert [(t, p, r) for t, p, r, _ in producer.sent] == [
        ("app-users-changelog", 1, [(b"1/a", b"A"), (b"1/b", b"B")]),
        ("app-users-changelog", 2, [(b"2/old", None)]),
    ]
    assert len(deliveries) == 2


def test_the_persisted_offset_moves_to_the_last_record_once_acknowledged() -> None:
    store, producer = Store(), Producer(room=2)

    async def main() -> dict[int, int]:
        deliveries = Deliveries(5.0)
        changes: dict[bytes, bytes | None] = {b"4/%d" % i: b"v" for i in range(5)}
        await DirectChangelog(table(store), lambda: producer, deliveries).write(changes, lambda _p: nullctx())
        assert [len(r) for _, _, r, _ in producer.sent] == [2, 2, 1]  # full batches are sent on
        assert store.persisted == {}  # nothing acknowledged yet
        for i, (_, _, _records, fut) in enumerate(producer.sent):
            fut.set_result(SimpleNamespace(offset=100 + 2 * i))
        assert await deliveries.confirm() == 5  # records, not batches
        return store.persisted

    assert asyncio.run(main()) == {4: 104}  # the last batch: base offset 104, one record


def test_a_refused_batch_fails_the_checkpoint_and_moves_no_offset() -> None:
    store, producer = Store(), Producer()

    async def main() -> None:
        deliveries = Deliveries(5.0)
        await DirectChangelog(table(store), lambda: producer, deliveries).write(
            {b"5/a": b"v"}, lambda _p: nullctx()
        )
        producer.sent[0][3].set_exception(RuntimeError("NotEnoughReplicas"))
        await deliveries.confirm()

    with pytest.raises(DeliveryFailed, match="NotEnoughReplicas"):
        asyncio.run(main())
    assert store.persisted == {}


@contextmanager
def nullctx() -> Iterator[None]:
    yield


class RocksStore(dict[bytes, bytes]):
    """What ``DirectChangelog`` uses of faust's RocksDB store, over real rocksdict databases."""

    use_rocksdict = True

    def __init__(self, path: Any) -> None:
        super().__init__()
        self.path = path
        self.dbs: dict[int, Any] = {}
        self.persisted: dict[int, int] = {}

    def _db_for_partition(self, partition: int) -> Any:
        from rocksdict import Options, Rdict

        if partition not in self.dbs:
            self.dbs[partition] = Rdict(str(self.path / str(partition)), options=Options(raw_mode=True))
        return self.dbs[partition]

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.persisted[tp.partition] = offset


def test_a_rocksdb_store_gets_one_write_batch_per_partition(tmp_path: Any) -> None:
    store, producer = RocksStore(tmp_path), Producer()
    store._db_for_partition(2).put(b"2/old", b"x")
    n, _ = run(store, producer, {b"1/a": b"A", b"2/old": None, b"1/b": b"B", b"3/never": None})  # type: ignore[arg-type]
    assert n == 3
    assert [(k, v) for k, v in store.dbs[1].items()] == [(b"1/a", b"A"), (b"1/b", b"B")]
    assert store.dbs[2].get(b"2/old") is None
    assert list(store.dbs[3].keys()) == []
    assert store == {}  # nothing went through the mapping (faust's per-key path)
    assert [(p, r) for _, p, r, _ in producer.sent] == [
        (1, [(b"1/a", b"A"), (b"1/b", b"B")]),
        (2, [(b"2/old", None)]),
    ]
    for db in store.dbs.values():
        db.close()
