"""A state read, three ways, side by side in one run: what each costs a batch per key it reads.

A faust RocksDB table (raw bytes, ``--partitions`` partitions) in a temporary folder holds
``--keys`` users of ``--value-bytes`` each (about a Taobao-slice user state). Each is then read:
  - through faust's table inside the partition's scope (``streams.app.PartitionScope``), as the
    worker read its state before: ``table.get`` (the current-event lookup, ``__contains__`` and
    ``__getitem__``: two RocksDB reads, the key-index cache, the table's sensors);
  - through faust's table outside any scope (faust searches the partition databases);
  - through ``streams.writeback.WriteBack`` (the worker's reads now: one RocksDB read of the
    key's partition database).
``--repeat`` rounds, interleaved, every round printed, then the medians (microseconds per read).

    python bench/state_reads.py [--keys 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.app import PartitionScope
from streams.changelog import _write_rocksdb
from streams.state import user_partition
from streams.writeback import WriteBack


def make_table(folder: str, partitions: int) -> Any:
    async def make() -> Any:  # inside a loop that is closed afterwards (faust's services take it)
        app = faust.App("state-reads-bench", broker="kafka://127.0.0.1:9", store="rocksdb://")
        app.conf.datadir = folder
        return app.Table("users", partitions=partitions, key_type=bytes, value_type=bytes)

    return asyncio.run(make())


def timed(read: Callable[[bytes], Any], keys: list[bytes]) -> float:
    """Microseconds per read of every key in ``keys``; every key must be found."""
    start = time.perf_counter()
    found = sum(read(key) is not None for key in keys)
    took = time.perf_counter() - start
    assert found == len(keys), (found, len(keys))
    return took * 1e6 / len(keys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--value-bytes", type=int, default=800)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.partitions

    def part(key: bytes) -> int:
        return user_partition(key, n)

    with tempfile.TemporaryDirectory() as folder:
        table = make_table(folder, n)
        keys = [b"user-%d" % i for i in range(args.keys)]
        by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for key in keys:
            by_partition.setdefault(part(key), []).append((key, key.ljust(args.value_bytes, b".")))
        for p, records in by_partition.items():
            _write_rocksdb(table.data, p, records)
        scope = PartitionScope("by-user")

        def in_scope(key: bytes) -> Any:
            with scope(part(key)):
                return table.get(key)

        ways: dict[str, Callable[[bytes], Any]] = {
            "faust table, partition scope": in_scope,
            "faust table, no scope": table.get,
            "WriteBack (RocksDB read)": WriteBack(table, part).get,
        }
        for read in ways.values():  # warm the databases' caches once
            timed(read, keys)
        runs: dict[str, list[float]] = {name: [] for name in ways}
        print(f"{args.keys} keys of {args.value_bytes} bytes, {n} partitions; us per read")
        for r in range(args.repeat):
            row = []
            for name, read in ways.items():
                runs[name].append(timed(read, keys))
                row.append(f"{name}: {runs[name][-1]:.2f}")
            print(f"round {r + 1}: " + "; ".join(row))
        print("| read | us per read (median) | rounds |")
        print("|---|---|---|")
        for name, got in runs.items():
            print(f"| {name} | {statistics.median(got):.2f} | {', '.join(f'{x:.2f}' for x in got)} |")


if __name__ == "__main__":
    main()
