"""Archive throughput on a real stream through the broker: events/s, CPU per event, bytes per event.

Publishes the shipped REES46 sample (``--dataset``, default ``rees46-demo``) repeated ``--repeat``
times with fresh event ids and shifted times to fresh input topics, then drains that backlog with
the archiver's own code (``streams.archive.Archiver`` on a real aiokafka consumer in its own group:
decode, buffer, Parquet files, fsync, rename, commit) in this process, into a fresh local folder.
Timed from the first message taken to the final commit once everything published was read, so the
group join and the idle wait for a time roll are left out; CPU is this process's (all threads,
the file writes included) over the same span. Bytes per event are the Parquet files' over the
events archived, beside the JSON messages' own size. The worker side by side on the same stream is
``bench/worker_throughput.py`` (not yet run from here).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/archive_throughput.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.admin import ensure_topics  # noqa: E402
from streams.archive import ArchiveMetrics, Archiver, ArchiveWriter  # noqa: E402
from streams.archive_read import archive_files, read_events  # noqa: E402
from streams.replay import replay  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from tests.integration.harness import isolated_env, settings_of  # noqa: E402


def long_stream(events: list[dict[str, Any]], repeat: int) -> list[dict[str, Any]]:
    """``repeat`` copies of ``events`` back to back in event time, each with fresh event ids."""
    t = [datetime.fromisoformat(e["event_time"]) for e in events]
    span = max(t) - min(t) + timedelta(seconds=1)
    return [
        dict(e, event_id=f"r{k}-{e['event_id']}", event_time=(when + k * span).isoformat())
        for k in range(repeat)
        for e, when in zip(events, t, strict=True)
    ]


class Timed(Archiver):
    """The archiver, noting when it took its first message and stopping once it has taken every
    message published (``end``: the end offset of each partition that has any)."""

    first: float | None = None
    cpu0 = 0.0
    end: dict[Any, int]
    stop: asyncio.Event

    def take(self, record: Any) -> bool:
        if self.first is None:
            self.first, self.cpu0 = time.perf_counter(), time.process_time()
        taken = super().take(record)
        tp = TopicPartition(record.topic, record.partition)
        if self.end.get(tp) == record.offset + 1:
            del self.end[tp]
            if not self.end:
                self.stop.set()
        return taken


def report(n: int, json_bytes: int, root: str, wall: float, cpu: float, roll_mib: float) -> None:
    files = archive_files(root)
    size = sum(os.path.getsize(p) for p in files)
    archived = len(read_events(root))
    print(f"archived {archived} of {n} events in {len(files)} files")
    print(
        f"archive: {archived / wall:9.0f} events/s over {wall:.2f}s, CPU {cpu * 1e6 / archived:.0f} us/event "
        "(process CPU, all threads)"
    )
    print(
        f"bytes: {size / archived:.1f} Parquet bytes/event (zstd) against {json_bytes / n:.0f} bytes/event "
        f"of JSON; roll at {roll_mib:g} MiB"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="rees46-demo")
    ap.add_argument("--repeat", type=int, default=10, help="copies of the data set, fresh ids")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--roll-mib", type=float, default=64.0, help="SHOPSTREAM_ARCHIVE_ROLL_BYTES in MiB")
    args = ap.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shopstream-archive-bench-{uuid.uuid4().hex[:6]}"
    env = isolated_env(
        bootstrap,
        work,
        SHOPSTREAM_PARTITIONS=str(args.partitions),
        SHOPSTREAM_ARCHIVE_DIR=str(work / "archive"),
        SHOPSTREAM_ARCHIVE_ROLL_BYTES=str(int(args.roll_mib * 2**20)),
    )
    settings = settings_of(env)
    topics = [*settings.input_topics, settings.topic_promotions]
    await ensure_topics(settings, topics)
    events = long_stream(list(load(args.dataset, settings.datasets_dir)), args.repeat)
    n, secs = await replay(settings, events, progress=False)
    json_bytes = sum(len(orjson.dumps(e)) for e in events)
    print(
        f"input: {n} events ({args.repeat} x {args.dataset}) published in {secs:.1f}s, "
        f"{args.partitions} partitions"
    )
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, broker {bootstrap}")

    consumer = AIOKafkaConsumer(
        **settings.kafka_client_options(),
        group_id=f"{settings.app_id}-archive",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    writer = ArchiveWriter(settings.archive_dir, settings.archive_roll_bytes, settings.archive_roll_s)
    archiver = Timed(settings, writer, ArchiveMetrics(CollectorRegistry()), consumer)
    archiver.stop = asyncio.Event()
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(args.partitions)]
        archiver.end = {tp: off for tp, off in (await consumer.end_offsets(tps)).items() if off}
        consumer.subscribe(topics, listener=archiver)
        t0 = time.perf_counter()
        await archiver.run(archiver.stop)  # returns after the final roll and commit
        done, cpu = time.perf_counter(), time.process_time()
    finally:
        await consumer.stop()
    assert archiver.first is not None
    print(f"first message taken {archiver.first - t0:.1f}s after the consumer started (group join)")
    report(n, json_bytes, settings.archive_dir, done - archiver.first, cpu - archiver.cpu0, args.roll_mib)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
