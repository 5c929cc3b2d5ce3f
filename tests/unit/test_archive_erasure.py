"""Erasure requests in the archive: the archiver writes them to the erasure list with the rows,
readers drop the user at once, and ``shopstream archive compact`` removes the rows from the files."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from streams.archive_compact import compact
from streams.archive_read import archive_files, read_erasures, read_events
from streams.cli import main
from tests.commands import streams_cli
from tests.unit.test_archive import SETTINGS, T0, FakeConsumer, archiver_at, event, record, write


def rows_on_disk(root: str) -> dict[str, list[str]]:
    """user id -> event ids in every Parquet file, erasure list ignored."""
    out: dict[str, list[str]] = {}
    for stream in ("events", "promotions"):
        for path in archive_files(root, stream, None, None):
            table = pq.read_table(path)
            for user, eid in zip(
                table.column("user_id").to_pylist(), table.column("event_id").to_pylist(), strict=True
            ):
                out.setdefault(user, []).append(eid)
    return out


def erasure(user: str, at: Any) -> bytes:
    request = {**event(f"x-{user}", user, at=at), "type": "erasure"}
    keys = ("schema_version", "type", "event_id", "user_id", "event_time")
    return orjson.dumps({k: request[k] for k in keys})


def test_the_archiver_writes_erasures_to_the_list_and_readers_drop_the_user(tmp_path: Path) -> None:
    root, views = str(tmp_path), SETTINGS.topic_views
    batches = [
        [record(views, 0, orjson.dumps(event("a1", "alice")))],
        [record(views, 1, orjson.dumps(event("b1", "bob")))],
        [record(SETTINGS.topic_erasures, 0, erasure("alice", T0 + timedelta(minutes=5)))],
        [record(SETTINGS.topic_erasures, 1, b'{"type": "erasure"}')],  # invalid: counted, not listed
    ]
    consumer = FakeConsumer(batches, lambda offsets: None)
    arch, registry = archiver_at(root, consumer)
    asyncio.run(arch.run(consumer.stop, lag_interval_s=0.01))
    assert read_erasures(root) == {"alice": int((T0 + timedelta(minutes=5)).timestamp() * 1000)}
    assert [e["event_id"] for e in read_events(root)] == ["b1"]
    assert rows_on_disk(root) == {"alice": ["a1"], "bob": ["b1"]}  # until compaction
    assert registry.get_sample_value("shopstream_archive_rejected_total", {"reason": "schema"}) == 1


def test_compaction_removes_erased_rows_up_to_the_erasure_and_keeps_the_rest(tmp_path: Path) -> None:
    root = str(tmp_path)
    later = T0 + timedelta(hours=2)
    write(
        root,
        [event("a1", "alice"), event("b1", "bob"), event("a2", "alice", at=later)],
        [event("c1", "carol")],
        [event("a0", "alice")],  # a file holding only alice: deleted
    )
    erasures = tmp_path / "_erasures"
    erasures.mkdir()
    # alice erased after her first events, before the later one (she came back as a new user)
    (erasures / "e.jsonl").write_text(
        orjson.dumps({"user_id": "alice", "erased_at": (T0 + timedelta(hours=1)).isoformat()}).decode() + "\n"
    )
    before = {e["event_id"] for e in read_events(root)}
    done = compact(root)
    assert (done.rows_removed, done.files_rewritten, done.files_removed) == (2, 1, 1)
    assert rows_on_disk(root) == {"bob": ["b1"], "alice": ["a2"], "carol": ["c1"]}
    assert {e["event_id"] for e in read_events(root)} == before == {"b1", "a2", "c1"}
    assert compact(root).rows_removed == 0  # nothing left to remove


def test_the_compact_command_reports_what_it_did(tmp_path: Path, capsys: Any) -> None:
    write(str(tmp_path), [event("a1", "alice"), event("b1", "bob")])
    (tmp_path / "_erasures").mkdir()
    (tmp_path / "_erasures" / "e.jsonl").write_text(
        orjson.dumps({"user_id": "alice", "erased_at": T0.isoformat()}).decode() + "\n"
    )
    assert main(["archive", "compact", "--root", str(tmp_path)]) == 0
    assert "1 rows of erased users removed; 1 files rewritten, 0 deleted" in capsys.readouterr().out


def test_the_compact_command_in_its_own_process_exits_zero_after_its_work(tmp_path: Path) -> None:
    """``python -m streams archive compact`` reads and writes Parquet through pyarrow, whose
    thread pools could abort the interpreter's teardown after the work was done (exit -6,
    apache/arrow#34314); the command leaves without it (``streams.cli.run``)."""
    write(str(tmp_path), [event("a1", "alice"), event("b1", "bob")])
    (tmp_path / "_erasures").mkdir()
    (tmp_path / "_erasures" / "e.jsonl").write_text(
        orjson.dumps({"user_id": "alice", "erased_at": T0.isoformat()}).decode() + "\n"
    )
    done = streams_cli("archive", "compact", "--root", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "1 rows of erased users removed; 1 files rewritten, 0 deleted" in done.stdout
    assert rows_on_disk(str(tmp_path)) == {"bob": ["b1"]}
