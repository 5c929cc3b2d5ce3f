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

from streams.baseline import partition_of_key
from streams.changelog import DirectChangelog, is_packed_key, pack, packed_key, unpack, unpacked
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
        partition_for_key=partition_of_key,
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


# --- packed records (the baseline's ``items`` table) --------------------------------------------


def test_pack_round_trip_and_keys_that_no_item_key_can_be() -> None:
    entries = [(b"3/a", b'{"n":1.0}'), (b"3/\x00odd", b""), (b"3/" + b"x" * 300, b"v" * 70_000)]
    assert list(unpack(pack(entries))) == entries
    assert list(unpack(pack([]))) == []
    key = packed_key(12, 255)
    assert key == b"12\x00" + b"%016x" % 255 and is_packed_key(key) and not is_packed_key(b"12/\x00ff")
    assert partition_of_key(key) == 12 and partition_of_key(b"12/a\x00b") == 12
    assert packed_key(1, 9) < packed_key(1, 10) < b"1/"  # numbered in order, before the item keys
    with pytest.raises(ValueError, match="unknown version"):
        list(unpack(b"\x02"))


def replay(records: list[tuple[bytes, bytes | None]]) -> dict[bytes, bytes]:
    """A store rebuilt from changelog records in order, as recovery applies them (``unpacked``)."""
    events = [
        SimpleNamespace(message=SimpleNamespace(key=k, value=v, tp=None, offset=i, partition=0))
        for i, (k, v) in enumerate(records)
    ]
    out: dict[bytes, bytes] = {}
    for e in unpacked(events):
        if e.message.value is None:
            out.pop(e.message.key, None)
        else:
            out[e.message.key] = e.message.value
    return out


Records = list[tuple[bytes, bytes | None]]


def compacted(records: Records, *, tombstones: bool) -> Records:
    """What log compaction leaves: each key's last record, in order; with ``tombstones`` false,
    also without the tombstones (after ``delete.retention.ms``)."""
    last = {k: i for i, (k, _) in enumerate(records)}
    return [(k, v) for i, (k, v) in enumerate(records) if last[k] == i and (tombstones or v is not None)]


def sent_records(producer: Producer) -> list[tuple[bytes, bytes | None]]:
    return [r for _, _, records, _ in producer.sent for r in records]


@pytest.mark.parametrize("rocks", [False, True])
def test_packed_checkpoints_recover_the_store_from_any_compaction_and_stay_bounded(
    rocks: bool, tmp_path: Any
) -> None:
    """Item statistics changed over 100 checkpoints (a few hot keys, a tail written once each):
    a few records per checkpoint, and the changelog read in order (whole, compacted, or compacted
    without tombstones) rebuilds exactly the store, with at most about four times its keys live."""
    store: Any = RocksStore(tmp_path) if rocks else Store()
    producer = Producer(room=1000)
    changelog = DirectChangelog(
        table(store), lambda: producer, Deliveries(5.0), packed=True, packed_bytes=600
    )

    def contents() -> dict[bytes, bytes]:
        if rocks:
            return {k: v for k, v in store.dbs[4].items()} if 4 in store.dbs else {}
        return dict(store)

    async def main() -> None:
        for step in range(100):
            changes: dict[bytes, bytes | None] = {b"4/hot%d" % i: b"%d" % step for i in range(6)}
            changes[b"4/tail%03d" % step] = b"t" * 40
            assert await changelog.write(changes, lambda _p: nullctx()) == 7
            live = compacted(sent_records(producer), tombstones=False)
            held = sum(sum(1 for _ in unpack(v)) for _, v in live if v is not None)
            items = sum(1 for k in contents() if not is_packed_key(k))
            assert held <= 4 * items + 16  # two passes at most (and the last write's records)
            for variant in (
                sent_records(producer),
                compacted(sent_records(producer), tombstones=True),
                compacted(sent_records(producer), tombstones=False),
            ):
                assert replay(variant) == contents()
        # 700 keys written: packed (600 bytes a record, 10 or so keys) with as many packed again
        # and the tombstones, a fraction of the 700 records of one key each
        assert len(sent_records(producer)) < 700 / 2, len(sent_records(producer))
        assert sum(1 for k in contents() if not is_packed_key(k)) == 6 + 100

    asyncio.run(main())
    if rocks:
        for db in store.dbs.values():
            db.close()


def test_a_partition_taken_back_learns_its_packed_records_from_the_store_markers() -> None:
    """After ``forget`` (revoked, then assigned again) the records another worker left are known
    by their markers: numbering goes on after them and the next finished pass deletes them."""
    store, producer = Store(), Producer(room=1000)
    first = DirectChangelog(table(store), lambda: producer, Deliveries(5.0), packed=True)

    async def main() -> None:
        await first.write({b"6/a": b"1", b"6/b": b"1"}, lambda _p: nullctx())
        first.forget({6})
        await first.write({b"6/a": b"2"}, lambda _p: nullctx())  # numbered after the marker
        await first.write({b"6/a": b"3"}, lambda _p: nullctx())

    asyncio.run(main())
    keys = [k for k, _ in sent_records(producer)]
    assert keys[:2] == [packed_key(6, 0), packed_key(6, 1)]
    assert (packed_key(6, 0), None) in sent_records(producer)  # deleted once a pass was through
    assert replay(sent_records(producer)) == dict(store)
    assert replay(compacted(sent_records(producer), tombstones=False)) == dict(store)


def test_a_packed_changelog_refuses_a_delete() -> None:
    store, producer = Store(), Producer()
    store[b"7/a"] = b"x"
    with pytest.raises(ValueError, match="does not delete"):
        run_packed(store, producer, {b"7/a": None})


def run_packed(store: Store, producer: Producer, changes: dict[bytes, bytes | None]) -> int:
    async def main() -> int:
        changelog = DirectChangelog(table(store), lambda: producer, Deliveries(5.0), packed=True)
        return await changelog.write(changes, lambda _p: nullctx())

    return asyncio.run(main())
