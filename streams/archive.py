"""The event archive: validated input events, promotions and their outcomes, kept as Parquet files
for training and for reports past the topics' retention.

In: messages of the five input topics, the promotions topic and the promotion-outcomes topic, read
by an aiokafka consumer of its own group (``<app id>-archive``, auto-commit off); or, for
``shopstream archive convert``, the contract events of a public data set. Inputs pass the worker's
decoder (``streams.decode``, built from the same settings), promotions and outcomes their output
contracts (``records.Promotion``, ``records.PromotionOutcome``); what fails is counted by reason
and skipped (the worker dead-letters it; the archive has nothing to add).
Out: ``{root}/{events|promotions|outcomes}/date=YYYY-MM-DD/hour=HH/part-<unique>.parquet``, by the
UTC date and hour of the event time (a promotion's ``created_at``, an outcome's ``promoted_at``:
the outcomes of the promotions decided in a period are read together), columns ``SCHEMA``. The
buffer rolls into files when it holds ``archive_roll_bytes`` or its oldest row is
``archive_roll_s`` old.

Durability: offsets are committed only after every file holding the consumed rows is in place. A
local file is written under a hidden temporary name in its folder, flushed and fsynced, renamed,
and the folder fsynced (and the parents of new folders); any other fsspec protocol (object
storage) gets the final name directly, a PUT being atomic. A crash before the commit makes the
restarted archiver read those messages again: duplicates at most, never a loss. Readers
(``streams.archive_read``) dedupe by ``event_id``. On a revocation and on SIGTERM/SIGINT the
archiver rolls what it holds and commits before it lets go.

Erasures: requests on ``topic_erasures`` (``shopstream forget``) are appended to the erasure list,
``{root}/_erasures/erasures-<unique>.jsonl`` (``{"user_id", "erased_at"}`` per line), written and
committed like the rows. Every reader drops an erased user's rows up to ``erased_at`` at once;
``shopstream archive compact`` (``streams.archive_compact``) then rewrites the files that still
hold them. Consent events are not archived (they carry no behaviour to learn from).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from fsspec.implementations.local import LocalFileSystem
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from pydantic import ValidationError

from streams.archive_read import ERASURES, SCHEMA, Row, epoch_ms, open_root
from streams.decode import AnyEvent, EventDecoder, rejection
from streams.errors import RejectedInput, RejectReason
from streams.records import Promotion, PromotionOutcome
from streams.settings import Settings

log = logging.getLogger(__name__)

ROW_OVERHEAD = 48  # bytes a row costs in the buffer besides its strings, roughly
LOG_PER_MINUTE = 20  # rejected messages logged one by one per minute


def event_row(ev: AnyEvent, payload: str, topic: str, partition: int, offset: int) -> Row:
    return Row(ev.event_id, ev.user_id, ev.type, epoch_ms(ev.event_time), payload, topic, partition, offset)


def promotion_row(p: Promotion, payload: str, topic: str, partition: int, offset: int) -> Row:
    return Row(p.promotion_id, p.user_id, p.kind, epoch_ms(p.created_at), payload, topic, partition, offset)


def outcome_row(o: PromotionOutcome, payload: str, topic: str, partition: int, offset: int) -> Row:
    """Keyed by promotion id (one outcome per promotion: readers keep the first copy), at the
    promotion's decision time."""
    return Row(o.promotion_id, o.user_id, o.kind, epoch_ms(o.promoted_at), payload, topic, partition, offset)


@dataclass(frozen=True)
class WrittenFile:
    stream: str
    path: str
    rows: int
    bytes: int


class ArchiveWriter:
    """Buffers rows and writes them as one Parquet file per stream, date and hour when it rolls."""

    def __init__(
        self, root: str, roll_bytes: int, roll_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.fs, self.base = open_root(root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.roll_bytes, self.roll_s, self.clock = roll_bytes, roll_s, clock
        self.groups: dict[tuple[str, int], list[Row]] = {}  # (stream, hours since the epoch) -> rows
        self.bytes = 0
        self.rows = 0
        self.oldest: float | None = None  # clock() when the oldest buffered row came
        self._known_dirs: set[str] = set()
        self._last_ns = 0
        self.erasures: list[dict[str, str]] = []  # erasure requests, written to ``_erasures`` on a roll

    def add_erasure(self, user_id: str, erased_at: datetime) -> None:
        """An erasure request: its user's rows up to ``erased_at`` are dropped by every reader and
        removed from the files by ``shopstream archive compact`` (``streams.archive_compact``)."""
        iso = erased_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
        self.erasures.append({"user_id": user_id, "erased_at": iso})
        self.bytes += len(user_id) + ROW_OVERHEAD
        self.rows += 1
        if self.oldest is None:
            self.oldest = self.clock()

    def add(self, stream: str, row: Row) -> None:
        self.groups.setdefault((stream, row.event_ms // 3_600_000), []).append(row)  # by UTC hour
        self.bytes += len(row.payload) + len(row.event_id) + len(row.user_id) + ROW_OVERHEAD
        self.rows += 1
        if self.oldest is None:
            self.oldest = self.clock()

    def due(self) -> bool:
        """True when the buffer is full or its oldest row has waited ``roll_s``."""
        return self.rows > 0 and (
            self.bytes >= self.roll_bytes
            or (self.oldest is not None and self.clock() - self.oldest >= self.roll_s)
        )

    def roll(self) -> list[WrittenFile]:
        """Write every buffered row, one file per (stream, date, hour); the buffer is emptied only
        when all of them are in place (a failure raises and keeps it: rewriting duplicates)."""
        written = []
        for (stream, hour), rows in self.groups.items():
            stamp = datetime.fromtimestamp(hour * 3600, UTC)
            written.append(
                self._write(f"{self.base}/{stream}/date={stamp:%Y-%m-%d}/hour={stamp:%H}", stream, rows)
            )
        if self.erasures:
            lines = b"".join(orjson.dumps(e) + b"\n" for e in self.erasures)
            name = self._name().replace(".parquet", ".jsonl").replace("part-", "erasures-")
            size = self.put(f"{self.base}/{ERASURES}", name, lambda f: f.write(lines))
            path = f"{self.base}/{ERASURES}/{name}"
            written.append(WrittenFile("erasures", path, len(self.erasures), size))
            self.erasures.clear()
        self.groups.clear()
        self.bytes = self.rows = 0
        self.oldest = None
        return written

    def _name(self) -> str:
        """Unique, and in write order when sorted (readers keep the first copy of an event)."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return f"part-{self._last_ns:019d}-{uuid.uuid4().hex[:12]}.parquet"

    def _write(self, folder: str, stream: str, rows: list[Row]) -> WrittenFile:
        columns = zip(*rows, strict=True)
        table = pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
        )
        name = self._name()
        size = self.put(folder, name, lambda f: pq.write_table(table, f, compression="zstd"))
        return WrittenFile(stream, f"{folder}/{name}", len(rows), size)

    def put(self, folder: str, name: str, write: Callable[[Any], object]) -> int:
        """``write(file)`` to ``folder/name`` durably (module docstring); returns the bytes written.
        An existing file of that name is replaced whole: readers see the old one or the new one."""
        final = f"{folder}/{name}"
        new_dirs = self._makedirs(folder)
        if not self.local:  # object storage: a PUT is atomic, there is no rename
            with self.fs.open(final, "wb") as f:
                write(f)
                return int(f.tell())
        tmp = f"{folder}/.{name}.tmp"  # hidden: readers (and Spark, DuckDB, pyarrow) skip it
        try:
            with self.fs.open(tmp, "wb") as f:
                write(f)
                size = int(f.tell())
                f.flush()
                os.fsync(f.fileno())
            self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm(tmp)
            raise
        # the rename and any folder made for it are durable once their parent folders are synced
        for d in dict.fromkeys([folder, *(os.path.dirname(n) for n in new_dirs)]):
            fsync_dir(d)
        return size

    def _makedirs(self, folder: str) -> list[str]:
        """Create ``folder``; returns the local folders that did not exist (their parents need a sync)."""
        new, d = [], folder
        while self.local and folder not in self._known_dirs and not os.path.isdir(d):
            new.append(d)
            d = os.path.dirname(d)
        if folder not in self._known_dirs:
            self.fs.makedirs(folder, exist_ok=True)
            self._known_dirs.add(folder)
        return new


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Output = TypeVar("Output", Promotion, PromotionOutcome)


def decode_output(raw: bytes | None, record: type[Output]) -> Output:
    """An output record (a promotion or an outcome) checked against its contract."""
    if not raw:
        raise RejectedInput(RejectReason.EMPTY, "message has no value")
    try:
        return record.model_validate_json(raw)
    except ValidationError as exc:
        raise rejection(exc) from None


def text_of(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RejectedInput(RejectReason.INVALID_JSON, "not UTF-8") from None


@dataclass
class Converted:
    events: int = 0
    rejected: Tally[str] = field(default_factory=Tally)
    files: list[WrittenFile] = field(default_factory=list)


def convert(events: Iterable[dict[str, Any]], root: str, settings: Settings) -> Converted:
    """Contract events (as ``shopstream replay`` publishes them, times kept) -> an archive, through
    the worker's decoder and the archiver's writer, without a broker. ``topic`` is the input topic
    of the event's type, ``partition`` -1 and ``offset`` the event's position in ``events``."""
    decoder = EventDecoder.from_settings(settings)
    type_of = settings.input_topics
    topic_of = {etype: topic for topic, etype in type_of.items()}
    writer = ArchiveWriter(root, settings.archive_roll_bytes, float("inf"))
    out = Converted()
    for i, ev in enumerate(events):
        raw = orjson.dumps(ev)
        topic = topic_of.get(str(ev.get("type")), "")
        try:
            decoded = decoder.decode(raw, type_of.get(topic))
            writer.add("events", event_row(decoded, text_of(raw), topic, -1, i))
        except RejectedInput as exc:
            out.rejected[str(exc.reason)] += 1
            continue
        out.events += 1
        if writer.due():
            out.files += writer.roll()
    out.files += writer.roll()
    return out


class ArchiveMetrics:
    """The archiver's metrics, built against an injected registry (names ``shopstream_archive_*``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "shopstream_archive_events_total",
            "Rows written to archive files (durably), by stream (events, promotions).",
            ["stream"],
            registry=registry,
        )
        self.rejected = Counter(
            "shopstream_archive_rejected_total",
            "Messages not archived (they break the contract), by reason: the worker's dead-letter reasons.",
            ["reason"],
            registry=registry,
        )
        self.files = Counter(
            "shopstream_archive_files_total",
            "Parquet files written, by stream.",
            ["stream"],
            registry=registry,
        )
        self.bytes = Counter(
            "shopstream_archive_bytes_total",
            "Bytes of Parquet written, by stream.",
            ["stream"],
            registry=registry,
        )
        self.lag = Gauge(
            "shopstream_archive_consumer_lag_messages",
            "Messages not yet durably archived (end offset minus committed offset), per topic, summed "
            "over this archiver's partitions.",
            ["topic"],
            registry=registry,
        )
        self.commit_age = Gauge(
            "shopstream_archive_commit_age_seconds",
            "Seconds the oldest message read and not yet committed has waited (about the time since the "
            "last commit while messages flow); 0 when everything read is committed.",
            registry=registry,
        )
        self.commit_failures = Counter(
            "shopstream_archive_commit_failures_total",
            "Offset commits the broker refused (the files are written: their messages are archived again).",
            registry=registry,
        )
        self.buffered = Gauge(
            "shopstream_archive_buffered_rows",
            "Rows waiting in the buffer for the next file.",
            registry=registry,
        )


class Archiver(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Validate, buffer, roll, commit. The consumer is injected: aiokafka's in ``archive_forever``, a
    fake in unit tests (``getmany``, ``commit``, ``assignment``, ``end_offsets``, ``committed``,
    ``beginning_offsets``)."""

    def __init__(
        self, settings: Settings, writer: ArchiveWriter, metrics: ArchiveMetrics, consumer: Any
    ) -> None:
        self.decoder = EventDecoder.from_settings(settings)
        self.types = settings.input_topics
        self.promotions = settings.topic_promotions
        self.outcomes = settings.topic_promotion_outcomes
        self.erasures = settings.topic_erasures
        self.topics = archived_topics(settings)
        self.writer, self.metrics, self.consumer = writer, metrics, consumer
        self.positions: dict[Any, int] = {}  # TopicPartition -> offset after the last message taken
        self.committed: dict[Any, int] = {}
        self.lock = asyncio.Lock()  # a roll and a revocation never interleave
        # when the oldest message not yet committed was read (None: all committed): after an idle
        # hour the first new message does not look an hour late
        self.pending_since: float | None = None
        metrics.commit_age.set_function(
            lambda: 0.0 if self.pending_since is None else time.monotonic() - self.pending_since
        )
        metrics.buffered.set_function(lambda: self.writer.rows)
        self._window, self._logged, self._quiet = time.monotonic(), 0, 0

    def take(self, record: Any) -> bool:
        """Validate one message and buffer it (True), or count it by reason and skip it (False)."""
        self.positions[TopicPartition(record.topic, record.partition)] = record.offset + 1
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        where = (record.topic, record.partition, record.offset)
        try:
            if record.topic == self.promotions:
                promotion = decode_output(record.value, Promotion)
                self.writer.add("promotions", promotion_row(promotion, text_of(record.value), *where))
            elif record.topic == self.outcomes:
                outcome = decode_output(record.value, PromotionOutcome)
                self.writer.add("outcomes", outcome_row(outcome, text_of(record.value), *where))
            elif record.topic == self.erasures:
                request = self.decoder.decode_input(record.value, "erasure")
                self.writer.add_erasure(request.user_id, request.event_time)
            else:
                ev = self.decoder.decode(record.value, self.types.get(record.topic))
                self.writer.add("events", event_row(ev, text_of(record.value), *where))
        except RejectedInput as exc:
            self.metrics.rejected.labels(str(exc.reason)).inc()
            self._log_rejected(record, exc)
            return False
        return True

    def uncommitted(self) -> bool:
        # list(): the metrics server's thread asks too, while the loop may add a partition
        return any(self.committed.get(tp) != off for tp, off in list(self.positions.items()))

    async def roll_and_commit(self) -> None:
        """Write the buffer (off the event loop), then commit every position taken before it."""
        async with self.lock:
            assigned = self.consumer.assignment()
            offsets = {tp: off for tp, off in self.positions.items() if self.committed.get(tp) != off}
            rows = self.writer.rows
            files = await asyncio.to_thread(self.writer.roll) if rows else []
            for f in files:
                self.metrics.events.labels(f.stream).inc(f.rows)
                self.metrics.files.labels(f.stream).inc()
                self.metrics.bytes.labels(f.stream).inc(f.bytes)
            offsets = {tp: off for tp, off in offsets.items() if tp in assigned}
            for tp in [tp for tp in self.positions if tp not in assigned]:  # taken after a revocation:
                del self.positions[tp]  # written, and read again by the new owner (a duplicate)
            if offsets:
                try:
                    await self.consumer.commit(offsets)
                except KafkaError as exc:  # e.g. the group moved on: the new owner archives them again
                    self.metrics.commit_failures.inc()
                    log.warning("commit of %d partitions refused: %s", len(offsets), exc)
                    return
                self.committed.update(offsets)
            self.pending_since = None  # everything read is written and committed
            if files:
                log.info(
                    "archived %d rows in %d files (%d bytes); committed %d partitions",
                    rows,
                    len(files),
                    sum(f.bytes for f in files),
                    len(offsets),
                )

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        """Roll what is held and commit before another archiver takes the partitions."""
        await self.roll_and_commit()
        for tp in revoked:
            self.positions.pop(tp, None)
            self.committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        log.info("archiving %d partitions", len(list(assigned)))

    async def refresh_lag(self) -> None:
        tps = list(self.consumer.assignment())
        ends = await self.consumer.end_offsets(tps) if tps else {}
        for tp in tps:
            if tp not in self.committed:
                done = await self.consumer.committed(tp)
                if done is None:
                    done = (await self.consumer.beginning_offsets([tp]))[tp]
                self.committed.setdefault(tp, done)
        per_topic = dict.fromkeys(self.topics, 0)
        for tp in tps:
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + max(0, ends[tp] - self.committed.get(tp, 0))
        for topic, lag in per_topic.items():
            self.metrics.lag.labels(topic).set(lag)

    async def run(self, stop: asyncio.Event, lag_interval_s: float = 5.0) -> None:
        """Consume until ``stop`` is set, then roll, commit and return. An error (a file that cannot
        be written) propagates without a commit: the restarted archiver reads those messages again."""

        async def lag_forever() -> None:
            while True:
                try:
                    await self.refresh_lag()
                except Exception as exc:  # a metric must never stop the archive
                    log.warning("consumer lag not refreshed: %s", exc)
                await asyncio.sleep(lag_interval_s)

        lag = asyncio.create_task(lag_forever())
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=500, max_records=10_000)
                for records in batch.values():
                    for record in records:
                        self.take(record)
                        if self.writer.bytes >= self.writer.roll_bytes:  # full: a batch may hold 10k
                            await self.roll_and_commit()
                if self.writer.due() or (not self.writer.rows and self.uncommitted()):
                    await self.roll_and_commit()
            await self.roll_and_commit()
        finally:
            lag.cancel()

    def _log_rejected(self, record: Any, exc: RejectedInput) -> None:
        """Where and why, never the payload (it may hold personal data), at a bounded rate."""
        now = time.monotonic()
        if now - self._window >= 60.0:
            if self._quiet:
                log.warning("%d more messages rejected in the last minute", self._quiet)
            self._window, self._logged, self._quiet = now, 0, 0
        if self._logged < LOG_PER_MINUTE:
            self._logged += 1
            log.warning(
                "not archived %s[%s]@%s: %s", record.topic, record.partition, record.offset, exc.reason
            )
        else:
            self._quiet += 1


def archived_topics(settings: Settings) -> list[str]:
    """What the archiver reads: the inputs, promotions, their outcomes and erasure requests."""
    return [
        *settings.input_topics,
        settings.topic_promotions,
        settings.topic_promotion_outcomes,
        settings.topic_erasures,
    ]


async def archive_forever(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """``shopstream archive``: its own consumer group, metrics on ``archive_metrics_port``; returns
    after SIGTERM or SIGINT (or ``stop``) once what it held is written and committed."""
    from streams.admin import ensure_topics

    writer = ArchiveWriter(settings.archive_dir, settings.archive_roll_bytes, settings.archive_roll_s)
    metrics = ArchiveMetrics(CollectorRegistry())
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = None
    if settings.archive_metrics_port:
        server, _ = start_http_server(
            settings.archive_metrics_port, settings.web_host, registry=metrics.registry
        )
    topics = archived_topics(settings)
    group = f"{settings.app_id}-archive"
    await ensure_topics(settings, topics)
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_options(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    archiver = Archiver(settings, writer, metrics, consumer)
    await consumer.start()
    try:
        consumer.subscribe(topics, listener=archiver)
        log.info("archive: %d topics as group %s into %s", len(topics), group, settings.archive_dir)
        await archiver.run(stop, settings.metrics_interval_s)
    finally:
        await consumer.stop()
        if server is not None:
            server.shutdown()
    log.info("archive stopped: everything read is written and committed")
