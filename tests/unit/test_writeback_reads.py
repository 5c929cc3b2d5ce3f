"""``streams.writeback.WriteBack`` reads a faust RocksDB table straight from the database of the
key's partition, and reads what faust's own mapping reads: for keys written as checkpoints write
them (``_write_rocksdb``), through faust's store mapping in the partition's scope (recovery and
``flush`` write that way), deleted, and never written. A real faust RocksDB store in a temporary
folder, no Kafka."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import faust
import pytest

from streams.app import PartitionScope
from streams.changelog import _write_each, _write_rocksdb
from streams.state import user_partition
from streams.writeback import WriteBack

PARTITIONS = 8


def part(key: bytes) -> int:
    return user_partition(key, PARTITIONS)


@pytest.fixture
def rocksdb_table(tmp_path: Path) -> Any:
    """A faust table on RocksDB, made inside an event loop that is closed afterwards (faust's
    services take the running loop; made outside one, they leave loops open)."""

    async def make() -> Any:
        app = faust.App("writeback-reads-test", broker="kafka://127.0.0.1:9", store="rocksdb://")
        app.conf.datadir = str(tmp_path)
        table = app.Table("users", partitions=PARTITIONS, key_type=bytes, value_type=bytes)
        assert table.data.use_rocksdict
        return table

    return asyncio.run(make())


def test_a_rocksdb_table_is_read_from_the_partition_database_with_faust_s_answers(rocksdb_table: Any) -> None:
    table = rocksdb_table
    store = table.data
    assert store.use_rocksdict
    keys = [b"user-%d" % i for i in range(240)]
    checkpointed: defaultdict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    through_store: defaultdict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)
    for key in keys[:120]:  # as checkpoints write: one write batch per partition
        checkpointed[part(key)].append((key, b"checkpointed " + key))
    for key in keys[120:180]:  # through faust's store mapping in the partition's scope
        through_store[part(key)].append((key, b"stored " + key))
    scope = PartitionScope("by-user")
    for p, records in checkpointed.items():
        _write_rocksdb(store, p, records)
    for key in keys[:10]:  # deleted by a later checkpoint
        _write_rocksdb(store, part(key), [(key, None)])
    for p, records in through_store.items():
        _write_each(store, p, records, scope)
    wb = WriteBack(table, part)

    def faust_reads(key: bytes) -> bytes | None:
        with scope(part(key)):
            value: bytes | None = table.get(key)
            assert (key in table) == (value is not None)
            return value

    want = {key: faust_reads(key) for key in keys}
    assert sum(v is not None for v in want.values()) == 170  # 110 checkpointed, 60 through the store
    assert {key: wb.get(key) for key in keys} == want
    assert {key: key in wb for key in keys} == {key: v is not None for key, v in want.items()}
    for key in keys:
        if want[key] is None:
            with pytest.raises(KeyError):
                wb[key]
        else:
            assert wb[key] == want[key]

    # only the key's own partition is read (where every write of the key goes): a value planted
    # in another partition's database is not the key's
    stray = keys[-1]
    store._db_for_partition((part(stray) + 1) % PARTITIONS).put(stray, b"elsewhere")
    assert wb.get(stray) is None and stray not in wb


def test_pending_and_taken_changes_come_before_the_rocksdb_store(rocksdb_table: Any) -> None:
    table = rocksdb_table
    wb = WriteBack(table, part)
    a, b = b"user-a", b"user-b"
    _write_rocksdb(table.data, part(a), [(a, b"stored a")])
    _write_rocksdb(table.data, part(b), [(b, b"stored b")])
    wb[a] = b"pending a"
    del wb[b]
    assert wb[a] == b"pending a" and b not in wb and wb.get(b, b"default") == b"default"
    taken = wb.take()  # being written: still what reads see
    assert wb[a] == b"pending a" and b not in wb
    wb.written(taken, stored=False)  # the write failed: pending again, the store unchanged
    assert wb[a] == b"pending a" and b not in wb
    wb.pending.clear()
    assert wb[a] == b"stored a" and wb[b] == b"stored b"


def test_a_store_without_rocksdb_is_read_through_its_mapping() -> None:
    reads: list[bytes] = []

    class Table(dict[bytes, bytes]):
        def get(self, key: bytes, default: Any = None) -> Any:
            reads.append(key)
            return super().get(key, default)

    table = Table({b"user-a": b"a"})
    wb = WriteBack(table, part)
    assert wb[b"user-a"] == b"a" and wb.get(b"user-b") is None and b"user-b" not in wb
    assert reads == [b"user-a", b"user-b", b"user-b"]
