"""``shopstream archive compact``: remove erased users' rows from the archive's files.

In: an archive root (``streams.archive``) and its erasure list (``{root}/_erasures/*.jsonl``).
Out: every Parquet file that holds a row of an erased user with ``event_time <= erased_at`` is
rewritten without those rows, under the same name, durably (``ArchiveWriter.put``: a temporary
name, fsync, rename over the old file; a PUT on object storage), or deleted when nothing is left.
Readers already drop those rows (``read_events`` applies the list); compaction makes the removal
physical. The list itself is kept: it holds the erased ids and nothing else, and it keeps a row of
an erased user that is archived again later (a partition read twice after a crash) out of every
read. Run it beside a live archiver: it only rewrites files already written, and a file written
while it runs is caught by the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streams.archive import ArchiveWriter
from streams.archive_read import STREAMS, archive_files, open_root, read_erasures


@dataclass
class Compacted:
    files_read: int = 0
    files_rewritten: int = 0
    files_removed: int = 0
    rows_removed: int = 0


def compact(root: str) -> Compacted:
    erased = read_erasures(root)
    out = Compacted()
    if not erased:
        return out
    fs, _ = open_root(root)
    writer = ArchiveWriter(root, 1, float("inf"))  # only its durable put is used
    users = pa.array(list(erased), pa.string())
    limits = pa.array(list(erased.values()), pa.int64())
    for stream in STREAMS:
        for path in archive_files(root, stream, None, None):
            out.files_read += 1
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            hit = pc.is_in(table.column("user_id"), value_set=users)
            if not pc.any(hit).as_py():
                continue
            # each row's erasure time (null where its user is not erased), then the rows to drop
            at = pc.take(limits, pc.index_in(table.column("user_id"), value_set=users))
            drop = pc.fill_null(pc.less_equal(table.column("event_time").cast(pa.int64()), at), False)
            n = int(pc.sum(drop).as_py() or 0)
            if n == 0:
                continue
            kept = table.filter(pc.invert(drop))
            out.rows_removed += n
            if kept.num_rows == 0:
                fs.rm(path)
                out.files_removed += 1
                continue
            folder, name = path.rsplit("/", 1)

            def rewrite(f: Any, table: pa.Table = kept) -> None:
                pq.write_table(table, f, compression="zstd")

            writer.put(folder, name, rewrite)
            out.files_rewritten += 1
    return out
