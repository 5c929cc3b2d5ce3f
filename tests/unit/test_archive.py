"""The event archive without a broker: rolling, the write-fsync-rename order, what a crash leaves,
the reader's dedupe, pruning and erasure list, rejected input, commits after files, fsspec roots."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import orjson
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from streams import archive
from streams.archive import ArchiveMetrics, Archiver, ArchiveWriter, convert, event_row
from streams.archive_read import (
    ArchiveSpec,
    Row,
    archive_files,
    calendar_day_bounds,
    epoch_ms,
    read_erasures,
    read_events,
)
from streams.decode import EventDecoder
from streams.errors import ConfigurationError, ShopstreamError
from streams.records import Offer, Promotion, PromotionOutcome
from streams.settings import Settings
from tests.fuzzing import VALID

DECODER = EventDecoder(max_bytes=65536, min_event_time="2000-01-01T00:00:00Z", max_clock_skew_s=86400)
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def event(eid: str, user: str = "u1", at: datetime = T0, **extra: Any) -> dict[str, Any]:
    return {**VALID["view"], "event_id": eid, "user_id": user, "event_time": at.isoformat(), **extra}


def row(ev: dict[str, Any], offset: int = 0) -> Row:
    raw = orjson.dumps(ev)
    return event_row(DECODER.decode(raw, ev["type"]), raw.decode(), "shop.views", 0, offset)


def write(root: str, *batches: list[dict[str, Any]]) -> None:
    """One roll per batch (so later batches land in later files)."""
    writer = ArchiveWriter(root, roll_bytes=1 << 30, roll_s=3600)
    for batch in batches:
        for i, ev in enumerate(batch):
            writer.add("events", row(ev, i))
        writer.roll()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_writer_rolls_by_size_and_by_time(tmp_path: Path) -> None:
    clock = Clock()
    size = len(orjson.dumps(event("e0"))) + len("e0") + len("u1") + archive.ROW_OVERHEAD
    writer = ArchiveWriter(str(tmp_path), roll_bytes=3 * size, roll_s=10.0, clock=clock)
    writer.add("events", row(event("e0")))
    writer.add("events", row(event("e1")))
    assert not writer.due()
    writer.add("events", row(event("e2")))
    assert writer.due()  # three rows fill the buffer
    files = writer.roll()
    assert [f.rows for f in files] == [3] and not writer.due() and writer.rows == writer.bytes == 0
    writer.add("events", row(event("e3")))
    clock.now += 9.9
    assert not writer.due()
    clock.now += 0.1
    assert writer.due()  # the oldest row has waited roll_s
    assert writer.roll()[0].rows == 1
    assert [e["event_id"] for e in read_events(str(tmp_path))] == ["e0", "e1", "e2", "e3"]


def test_rows_go_to_the_utc_date_and_hour_of_their_event_time(tmp_path: Path) -> None:
    late = datetime(2024, 5, 1, 23, 30, tzinfo=timezone(timedelta(hours=2)))  # 21:30 UTC
    write(str(tmp_path), [event("a", at=late), event("b", at=late + timedelta(hours=3))])
    folders = sorted(str(Path(p).parent.relative_to(tmp_path)) for p in archive_files(str(tmp_path)))
    assert folders == ["events/date=2024-05-01/hour=21", "events/date=2024-05-02/hour=00"]


def test_a_local_file_is_fsynced_then_renamed_then_its_folders_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr("os.fsync", fsync)
    writer = ArchiveWriter(str(tmp_path / "root"), roll_bytes=1 << 20, roll_s=60)
    real_mv = writer.fs.mv

    def mv(a: str, b: str) -> None:
        calls.append(("rename", f"{a} -> {b}"))
        real_mv(a, b)

    monkeypatch.setattr(writer.fs, "mv", mv)
    writer.add("events", row(event("e1")))
    [written] = writer.roll()
    hour = str(Path(written.path).parent)
    tmp = f"{hour}/.{Path(written.path).name}.tmp"
    assert calls[:3] == [("fsync", tmp), ("rename", f"{tmp} -> {written.path}"), ("fsync", hour)]
    # the new folders (root, events, date=, hour=) are durable too: each parent is synced
    synced = {path for what, path in calls[3:] if what == "fsync"}
    assert synced >= {str(Path(hour).parent), str(tmp_path / "root" / "events"), str(tmp_path / "root")}
    writer.add("events", row(event("e2")))
    calls.clear()
    writer.roll()  # the folders exist now: only the file and its folder
    assert [w for w, _ in calls] == ["fsync", "rename", "fsync"]


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_crash_before_the_rename_leaves_no_visible_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    root = str(tmp_path)
    write(root, [event("kept")])
    writer = ArchiveWriter(root, roll_bytes=1 << 20, roll_s=60)
    writer.add("events", row(event("lost")))

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("power cut")

    if where == "write":
        monkeypatch.setattr("pyarrow.parquet.write_table", crash)
    else:
        monkeypatch.setattr(writer.fs, "mv", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        writer.roll()
    assert writer.rows == 1  # nothing committed from it; the buffer is still whole
    assert len(list(tmp_path.rglob("part-*.parquet"))) == 1
    assert [e["event_id"] for e in read_events(root)] == ["kept"]
    # a real crash leaves its temporary file behind: hidden, never read
    hour = Path(archive_files(root)[0]).parent
    (hour / ".part-0-dead.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert [e["event_id"] for e in read_events(root)] == ["kept"]


def test_reader_keeps_the_first_copy_and_sorts_by_event_time_then_archive_order(tmp_path: Path) -> None:
    root = str(tmp_path)
    t1 = T0 + timedelta(minutes=1)
    write(
        root,
        [event("b", at=t1), event("a", at=T0), event("tie-1", at=t1)],
        [event("a", at=T0, item_id="copy"), event("tie-2", at=t1), event("c", at=T0)],
    )
    got = read_events(root)
    assert [e["event_id"] for e in got] == ["a", "c", "b", "tie-1", "tie-2"]
    assert got[0]["item_id"] == VALID["view"]["item_id"]  # the first copy, not the later one
    assert got[0] == event("a", at=T0)  # the payload as published


def test_reader_prunes_by_date_and_filters_by_time(tmp_path: Path) -> None:
    root = str(tmp_path)
    days = [T0, T0 + timedelta(days=2), T0 + timedelta(days=2, hours=5)]
    write(root, [event(f"d{i}", at=t) for i, t in enumerate(days)])
    # a broken file in the first day's folder: only a read that opens it fails
    broken = tmp_path / "events" / "date=2024-05-01" / "hour=10" / "part-0000-broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(Exception, match=r"(?i)parquet"):
        read_events(root)
    later = read_events(root, since="2024-05-02T00:00:00Z")
    assert [e["event_id"] for e in later] == ["d1", "d2"]
    assert [e["event_id"] for e in read_events(root, since=days[1], until=days[2])] == ["d1"]
    assert len(archive_files(root)) == 4
    assert all("date=2024-05-03" in p for p in archive_files(root, since_ms=epoch_ms(days[1])))
    broken.unlink()
    assert [e["event_id"] for e in read_events(root, until="2024-05-03T12:00:00Z")] == ["d0", "d1"]


def test_erased_users_are_dropped_up_to_their_erasure(tmp_path: Path) -> None:
    root = str(tmp_path)
    times = [T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2)]
    write(root, [event(f"u1-{i}", "u1", t) for i, t in enumerate(times)] + [event("u2-0", "u2", T0)])
    erasures = tmp_path / "_erasures"
    erasures.mkdir()
    (erasures / "2024-05.jsonl").write_text(
        '{"user_id": "u1", "erased_at": "2024-05-01T10:30:00Z"}\n\n'
        '{"user_id": "u1", "erased_at": "2024-05-01T11:00:00+00:00"}\n'
        '{"user_id": "u3", "erased_at": "2024-05-01T11:00:00Z"}\n'
    )
    assert read_erasures(root)["u1"] == epoch_ms(times[1])  # the latest one counts
    # the erasure's own instant is included; u1 came back after it
    assert [e["event_id"] for e in read_events(root)] == ["u2-0", "u1-2"]
    (erasures / "bad.jsonl").write_text('{"user": "u2"}\n')
    with pytest.raises(ConfigurationError, match=r"bad.jsonl:1"):
        read_events(root)


class FakeConsumer:
    """What the archiver uses of aiokafka's consumer."""

    def __init__(self, batches: list[list[Any]], on_commit: Callable[[dict[Any, int]], None]) -> None:
        self.batches = batches
        self.on_commit = on_commit
        self.commits: list[dict[Any, int]] = []
        self.stop = asyncio.Event()

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(t, 0) for t in TOPICS}

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        if not self.batches:
            self.stop.set()
            return {}
        records = self.batches.pop(0)
        return {TopicPartition(r.topic, r.partition): [r] for r in records} if records else {}

    async def commit(self, offsets: dict[Any, int]) -> None:
        self.on_commit(offsets)
        self.commits.append(dict(offsets))

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: 10 for tp in tps}

    async def committed(self, tp: Any) -> int | None:
        return None

    async def beginning_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return dict.fromkeys(tps, 0)


SETTINGS = Settings()
TOPICS = [*SETTINGS.input_topics, SETTINGS.topic_promotions, SETTINGS.topic_promotion_outcomes]


def record(topic: str, offset: int, value: bytes | None) -> Any:
    return SimpleNamespace(topic=topic, partition=0, offset=offset, value=value)


def promotion(pid: str) -> bytes:
    return (
        Promotion(
            promotion_id=pid,
            user_id="u1",
            kind="cart_abandonment",
            reason="idle cart",
            trigger_event_id="e1",
            items=["i1"],
            offer=Offer(kind="reminder"),
            scores={"propensity": 0.4},
            holdout=False,
            created_at=T0,
            expires_at=T0 + timedelta(days=2),
            model_version="v1",
        )
        .model_dump_json()
        .encode()
    )


def archiver_at(root: str, consumer: Any) -> tuple[Archiver, CollectorRegistry]:
    registry = CollectorRegistry()
    writer = ArchiveWriter(root, SETTINGS.archive_roll_bytes, SETTINGS.archive_roll_s)
    return Archiver(SETTINGS, writer, ArchiveMetrics(registry), consumer), registry


def test_rejected_input_is_counted_by_reason_and_not_written(tmp_path: Path) -> None:
    views, orders = SETTINGS.topic_views, SETTINGS.topic_orders
    old = event("old", at=datetime(1999, 12, 31, tzinfo=UTC))
    records = [
        record(views, 0, orjson.dumps(event("ok"))),
        record(views, 1, b"{not json"),
        record(views, 2, None),
        record(views, 3, orjson.dumps({**event("x"), "item_id": 5})),
        record(orders, 0, orjson.dumps(event("on-the-wrong-topic"))),
        record(views, 4, orjson.dumps(old)),
        record(SETTINGS.topic_promotions, 0, promotion("p1")),
        record(SETTINGS.topic_promotions, 1, b'{"promotion_id": "p2"}'),
    ]
    arch, registry = archiver_at(str(tmp_path), None)
    assert [arch.take(r) for r in records] == [True, False, False, False, False, False, True, False]
    assert arch.writer.rows == 2
    reasons = ("invalid_json", "empty", "schema", "wrong_topic", "impossible_value")
    counts = {
        r: registry.get_sample_value("shopstream_archive_rejected_total", {"reason": r}) for r in reasons
    }
    assert counts == {"invalid_json": 1, "empty": 1, "schema": 2, "wrong_topic": 1, "impossible_value": 1}
    # every message read moves the position, accepted or not
    assert arch.positions[TopicPartition(views, 0)] == 5
    assert arch.positions[TopicPartition(SETTINGS.topic_promotions, 0)] == 2


def test_offsets_are_committed_only_after_the_files_are_in_place(tmp_path: Path) -> None:
    root = str(tmp_path)
    views = SETTINGS.topic_views
    taken: list[str] = []

    def check(offsets: dict[Any, int]) -> None:  # at commit time, every taken event is readable
        assert {e["event_id"] for e in read_events(root)} == set(taken)
        assert {e["promotion_id"] for e in read_events(root, stream="promotions")} == {"p1"}

    batches = [[record(views, i, orjson.dumps(event(f"e{i}")))] for i in range(5)]
    batches.append([record(SETTINGS.topic_promotions, 0, promotion("p1"))])
    batches.append([record(views, 5, b"bad")])
    taken += [f"e{i}" for i in range(5)]
    consumer = FakeConsumer(batches, check)
    arch, registry = archiver_at(root, consumer)
    asyncio.run(arch.run(consumer.stop, lag_interval_s=0.01))  # stops when the batches run out
    assert consumer.commits[-1] == {
        TopicPartition(views, 0): 6,
        TopicPartition(SETTINGS.topic_promotions, 0): 1,
    }
    assert registry.get_sample_value("shopstream_archive_events_total", {"stream": "events"}) == 5
    assert registry.get_sample_value("shopstream_archive_files_total", {"stream": "promotions"}) == 1
    assert registry.get_sample_value("shopstream_archive_commit_age_seconds") == 0.0  # nothing pending


def outcome(pid: str, user: str, at: datetime, converted: bool, holdout: bool = False) -> dict[str, Any]:
    return PromotionOutcome(
        promotion_id=pid,
        user_id=user,
        kind="cart_abandonment",
        offer=Offer(kind="percent_off", value=10.0),
        holdout=holdout,
        promoted_at=at,
        window_end=at + timedelta(days=3),
        converted=converted,
        order_id="o-" + pid if converted else None,
        order_event_id="e-" + pid if converted else None,
        converted_at=at + timedelta(hours=1) if converted else None,
        revenue_items=20.0 if converted else 0.0,
        revenue_order=25.0 if converted else 0.0,
        discount_cost=2.0 if converted and not holdout else 0.0,
        currency=None,
        closed_by="order" if converted else "window",
        model_version="rules-1",
    ).model_dump(mode="json")


def test_outcomes_are_archived_by_decision_time_and_read_back_for_the_uplift_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outcomes go to ``outcomes/`` at their promotion's decision time; a re-sent outcome counts
    once, an invalid one is skipped, an erased user's are dropped; ``uplift-report --archive``
    reports what a file of the same outcomes gives, and ``--since`` selects by decision time."""
    from streams.uplift import report, run

    root = str(tmp_path / "archive")
    topic = SETTINGS.topic_promotion_outcomes
    day2 = T0 + timedelta(days=1)
    kept = [
        outcome("p1", "u1", T0, True),
        outcome("p2", "u2", T0, False, holdout=True),
        outcome("p3", "u3", day2, True),
        outcome("p4", "u4", day2, False),
    ]
    gone = outcome("p5", "u5", T0, True)
    values = [*kept, kept[0], gone]  # p1 re-sent after a redelivery: the same record
    batches = [[record(topic, i, orjson.dumps(v))] for i, v in enumerate(values)]
    batches.append([record(topic, len(values), b'{"promotion_id": "p9"}')])  # fails the contract
    consumer = FakeConsumer(batches, lambda offsets: None)
    arch, registry = archiver_at(root, consumer)
    assert topic in arch.topics
    asyncio.run(arch.run(consumer.stop, lag_interval_s=0.01))
    assert consumer.commits[-1] == {TopicPartition(topic, 0): len(values) + 1}
    assert registry.get_sample_value("shopstream_archive_events_total", {"stream": "outcomes"}) == 6
    assert registry.get_sample_value("shopstream_archive_rejected_total", {"reason": "schema"}) == 1
    assert {p.split("/")[-3] for p in archive_files(root, "outcomes")} == {
        "date=2024-05-01",
        "date=2024-05-02",
    }
    erasures = tmp_path / "archive" / "_erasures"
    erasures.mkdir()
    (erasures / "e.jsonl").write_text('{"user_id": "u5", "erased_at": "2024-05-01T12:00:00Z"}\n')
    assert read_events(root, stream="outcomes") == kept

    rep = run(SETTINGS, None, tmp_path / "out", archive=root)
    no_promotions: dict[str, dict[str, Any]] = {"off_policy": {}, "off_policy_left_out": {}}
    assert orjson.loads((tmp_path / "out" / "uplift.json").read_bytes()) == {**report(kept), **no_promotions}
    rep = run(SETTINGS, None, tmp_path / "out2", archive=root, since=day2.isoformat())
    assert rep["outcomes"] == 2 == report(kept[2:])["outcomes"]
    with pytest.raises(ConfigurationError, match="not both"):
        run(SETTINGS, "some.jsonl", tmp_path / "out3", archive=root)
    with pytest.raises(ConfigurationError, match="--archive"):
        run(SETTINGS, None, tmp_path / "out3", since=day2.isoformat())

    from streams.cli import main

    monkeypatch.setenv("SHOPSTREAM_ARCHIVE_DIR", root)  # --archive without a root: the setting's
    capsys.readouterr()
    until = ["--until", day2.isoformat()]
    assert main(["uplift-report", "--archive", *until, "--out", str(tmp_path / "o")]) == 0
    assert orjson.loads((tmp_path / "o" / "uplift.json").read_bytes()) == {
        **report(kept[:2]),
        **no_promotions,
    }
    assert "cart_abandonment percent_off:10" in capsys.readouterr().out
    assert main(["uplift-report", "--since", day2.isoformat()]) == 1
    assert "add --archive" in capsys.readouterr().err


def test_a_failed_write_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = FakeConsumer([[record(SETTINGS.topic_views, 0, orjson.dumps(event("e0")))]], lambda o: None)
    arch, _ = archiver_at(str(tmp_path), consumer)
    monkeypatch.setattr(arch.writer.fs, "mv", lambda a, b: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(arch.run(consumer.stop))
    assert consumer.commits == [] and read_events(str(tmp_path)) == []


def test_revoked_partitions_are_rolled_and_committed_first(tmp_path: Path) -> None:
    consumer = FakeConsumer([], lambda o: None)
    arch, registry = archiver_at(str(tmp_path), consumer)
    tp = TopicPartition(SETTINGS.topic_carts, 0)
    cart = {**VALID["cart"], "event_id": "c1"}
    assert arch.take(record(SETTINGS.topic_carts, 7, orjson.dumps(cart)))
    assert (registry.get_sample_value("shopstream_archive_commit_age_seconds") or 0) > 0  # waiting
    asyncio.run(arch.on_partitions_revoked({tp}))
    assert registry.get_sample_value("shopstream_archive_commit_age_seconds") == 0
    assert consumer.commits == [{tp: 8}] and [e["event_id"] for e in read_events(str(tmp_path))] == ["c1"]
    assert tp not in arch.positions and arch.writer.rows == 0


def test_consumer_lag_counts_what_is_not_committed(tmp_path: Path) -> None:
    consumer = FakeConsumer([], lambda o: None)
    arch, registry = archiver_at(str(tmp_path), consumer)
    arch.committed[TopicPartition(SETTINGS.topic_views, 0)] = 4
    asyncio.run(arch.refresh_lag())
    lag = {
        t: registry.get_sample_value("shopstream_archive_consumer_lag_messages", {"topic": t}) for t in TOPICS
    }
    assert lag[SETTINGS.topic_views] == 6 and lag[SETTINGS.topic_orders] == 10


def test_a_memory_root_goes_through_the_same_path() -> None:
    root = f"memory://archive-{uuid.uuid4().hex[:8]}"
    write(root, [event("m1"), event("m2", at=T0 + timedelta(days=1))], [event("m1")])
    fs = fsspec.filesystem("memory")
    names = [Path(p).name for p in fs.find(root.removeprefix("memory:/"))]
    assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names)  # no temp
    assert [e["event_id"] for e in read_events(root)] == ["m1", "m2"]
    done = convert([event("m3"), {**event("m4"), "type": "cart"}], root, SETTINGS)
    assert done.events == 1 and dict(done.rejected) == {"schema": 1}
    assert [e["event_id"] for e in read_events(root)] == ["m1", "m3", "m2"]


def test_an_unknown_protocol_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="nosuchfs"):
        ArchiveWriter("nosuchfs://bucket/x", 1, 1.0)


def test_the_archive_spec_keeps_its_range_and_zone() -> None:
    spec = ArchiveSpec.parse("archive:var/a", "Europe/Berlin").with_options("2024-05-01", None, None)
    assert spec.since == datetime(2024, 4, 30, 22, tzinfo=UTC)  # midnight in the split's zone
    assert str(spec) == "archive:var/a?since=2024-04-30T22:00:00Z&tz=Europe/Berlin"
    assert ArchiveSpec.parse(str(spec)) == spec
    assert ArchiveSpec.parse("archive:s3://b/x?tz=Asia/Shanghai").root == "s3://b/x"
    with pytest.raises(ConfigurationError, match="IANA"):
        ArchiveSpec.parse("archive:x?tz=Mars/Olympus")


def test_calendar_days_split_the_last_day_and_the_one_before() -> None:
    shanghai = timezone(timedelta(hours=8))
    times = [
        datetime(2017, 11, 25, 0, 30, tzinfo=shanghai).timestamp(),
        datetime(2017, 12, 3, 23, 59, tzinfo=shanghai).timestamp(),
    ]
    days = calendar_day_bounds(times, "Asia/Shanghai")
    assert days == tuple(datetime(2017, 12, d, tzinfo=shanghai).timestamp() for d in (2, 3, 4))
    # in UTC the same events split at UTC midnights, eight hours later
    assert calendar_day_bounds(times, "UTC") == tuple(
        datetime(2017, 12, d, tzinfo=UTC).timestamp() for d in (2, 3, 4)
    )
    assert calendar_day_bounds([times[0], times[0] + 86400], "UTC") is None  # two days: nothing to train on


def test_train_threads_the_archive_options_into_the_recorded_spec() -> None:
    from streams.cli import parser, train_data

    def spec(*argv: str, tz: str = "UTC") -> str:
        return train_data(Settings(default_timezone=tz), parser().parse_args(["train", *argv]))

    assert spec("--data", "archive:var/a", tz="Europe/Paris") == "archive:var/a?tz=Europe/Paris"
    assert (
        spec("--data", "archive:var/a", "--split-tz", "Asia/Shanghai", "--until", "2017-12-04")
        == "archive:var/a?until=2017-12-03T16:00:00Z&tz=Asia/Shanghai"
    )
    assert spec("--data", "taobao-users") == "taobao-users"
    with pytest.raises(ShopstreamError, match="archive:DIR only"):
        spec("--data", "taobao-users", "--since", "2017-12-01")
