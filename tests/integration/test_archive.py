"""The archiver on a real broker: every valid event, promotion and promotion outcome published is
in the archive, once after dedupe, rejected input is counted and left out, and a kill -9 loses
nothing.

The expected archive is computed one by one from what the test published (the shipped REES46
sample as ``shopstream replay`` publishes it, plus invalid messages, a redelivered event,
promotions and their outcomes), never from counts alone.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.admin import ensure_topics
from streams.archive import ROW_OVERHEAD, archived_topics
from streams.archive_read import archive_files, read_events
from streams.records import Offer, Promotion, PromotionOutcome
from streams.replay import replay
from streams.settings import Settings
from streams.sources.datasets import Event, load
from tests.integration.harness import (
    ArchiverProcess,
    free_port,
    group_clients,
    isolated_env,
    partitions_of,
    produce,
    settings_of,
    uncommitted_before,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def archive_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[Settings, dict[str, str]]]:
    env = isolated_env(
        kafka_bootstrap,
        tmp_path,
        SHOPSTREAM_ARCHIVE_DIR=str(tmp_path / "archive"),
        SHOPSTREAM_ARCHIVE_ROLL_S="2",
        SHOPSTREAM_ARCHIVE_METRICS_PORT=str(free_port()),
        SHOPSTREAM_METRICS_INTERVAL_S="0.5",
    )
    settings = settings_of(env)
    asyncio.run(ensure_topics(settings, topics_of(settings)))
    yield settings, env


def topics_of(settings: Settings) -> list[str]:
    return [t for t in archived_topics(settings) if t != settings.topic_erasures]


async def behind(settings: Settings) -> int:
    """Messages of the archive's topics past its group's committed offsets."""
    async with group_clients(settings) as (admin, consumer):
        end = await consumer.end_offsets(await partitions_of(consumer, topics_of(settings)))
        return await uncommitted_before(admin, f"{settings.app_id}-archive", end)


def wait_until_committed(settings: Settings, *archivers: ArchiverProcess, timeout: float = 300.0) -> None:
    """Poll until the group has committed every published message (a generous deadline: the
    machine is shared; a killed member's partitions wait for its session to time out)."""
    deadline = time.monotonic() + timeout
    left = -1
    while time.monotonic() < deadline:
        for archiver in archivers:
            assert archiver.alive(), f"archiver died:\n{archiver.tail()}"
        left = asyncio.run(behind(settings))
        if left == 0:
            return
        time.sleep(0.5)
    logs = "\n".join(a.tail() for a in archivers)
    raise AssertionError(f"{left} messages not committed after {timeout:.0f}s:\n{logs}")


def metrics(env: dict[str, str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = env["SHOPSTREAM_ARCHIVE_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("shopstream_archive_")
    }


def sample_events(settings: Settings) -> list[Event]:
    """The shipped REES46 sample, published as ``shopstream replay`` does (times rebased in place)."""
    events = list(load("rees46-demo", settings.datasets_dir))
    asyncio.run(replay(settings, events, progress=False))
    return events


def promotions(n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        Promotion(
            promotion_id=f"p-{i}",
            user_id=f"u-{i}",
            kind="browse_abandonment",
            reason="3 views within 1800s",
            trigger_event_id=f"e-{i}",
            items=["i1"],
            offer=Offer(kind="reminder"),
            scores={"propensity": 0.3},
            holdout=False,
            created_at=now + timedelta(seconds=i),
            expires_at=now + timedelta(days=2),
            model_version="v1",
        ).model_dump(mode="json")
        for i in range(n)
    ]


def outcomes(promos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An outcome per promotion, converted for the even ones."""
    out = []
    for i, p in enumerate(promos):
        at = datetime.fromisoformat(p["created_at"])
        won = i % 2 == 0
        out.append(
            PromotionOutcome(
                promotion_id=p["promotion_id"],
                user_id=p["user_id"],
                kind=p["kind"],
                offer=Offer(kind="reminder"),
                holdout=False,
                promoted_at=at,
                window_end=at + timedelta(days=3),
                converted=won,
                order_id=f"o-{i}" if won else None,
                order_event_id=f"oe-{i}" if won else None,
                converted_at=at + timedelta(minutes=5) if won else None,
                revenue_items=10.0 if won else 0.0,
                revenue_order=12.0 if won else 0.0,
                discount_cost=0.0,
                currency=None,
                closed_by="order" if won else "window",
                model_version="v1",
            ).model_dump(mode="json")
        )
    return out


def invalid(settings: Settings, first: Event) -> list[tuple[str, bytes | None, bytes | None]]:
    """One message per reason the archive must count and leave out."""
    view = {**first, "type": "view", "item_id": "x"}
    views, carts, orders = settings.topic_views, settings.topic_carts, settings.topic_orders
    return [
        (views, b"k", b'{"schema_version": 1, "type": "view", '),  # invalid_json
        (views, b"k", None),  # empty
        (carts, b"k", orjson.dumps({**view, "type": "cart", "action": "add", "quantity": "2"})),  # schema
        (orders, b"k", orjson.dumps({**view, "event_id": "wrong-topic"})),  # wrong_topic
        (views, b"k", orjson.dumps({**view, "event_id": "old", "event_time": "1999-01-01T00:00:00Z"})),
        (settings.topic_promotions, b"k", b'{"promotion_id": "p-broken"}'),  # schema
        (settings.topic_promotion_outcomes, b"k", b'{"promotion_id": "p-broken"}'),  # schema
    ]


def test_archive_holds_every_valid_event_and_promotion_once(
    archive_env: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, env = archive_env
    events = sample_events(settings)
    promos = promotions(5)
    again = events[10]  # a producer's retry: the same event twice on its topic
    topic_of = {etype: topic for topic, etype in settings.input_topics.items()}
    more = [(settings.topic_promotions, b"k", orjson.dumps(p)) for p in [*promos, promos[0]]]
    results = outcomes(promos)  # and one re-sent after a redelivery
    more += [(settings.topic_promotion_outcomes, b"k", orjson.dumps(o)) for o in [*results, results[1]]]
    more.append((topic_of[again["type"]], b"k", orjson.dumps(again)))
    asyncio.run(produce(settings, [*invalid(settings, events[0]), *more]))

    archiver = ArchiverProcess(env, tmp_path / "archive.log").start()
    try:
        wait_until_committed(settings, archiver)
        deadline = time.monotonic() + 60
        while any(
            v for (name, _), v in metrics(env).items() if name == "shopstream_archive_consumer_lag_messages"
        ):
            assert time.monotonic() < deadline, metrics(env)
            time.sleep(0.5)
        seen = metrics(env)
    finally:
        code = archiver.stop()
    assert code == 0, archiver.tail()

    root = env["SHOPSTREAM_ARCHIVE_DIR"]
    got = read_events(root)
    expected = {e["event_id"]: e for e in events}
    assert len(got) == len(expected) == 3000
    assert {e["event_id"]: e for e in got} == expected  # each event as published, once
    times = [datetime.fromisoformat(e["event_time"]) for e in got]
    assert times == sorted(times)
    got_promos = read_events(root, stream="promotions")
    assert sorted(p["promotion_id"] for p in got_promos) == [p["promotion_id"] for p in promos]
    assert {p["promotion_id"]: p for p in got_promos} == {p["promotion_id"]: p for p in promos}
    assert read_events(root, stream="outcomes") == results  # each once, by decision time

    rejected = {
        dict(labels)["reason"]: v for (name, labels), v in seen.items() if name.endswith("rejected_total")
    }
    assert rejected == {"invalid_json": 1, "empty": 1, "schema": 3, "wrong_topic": 1, "impossible_value": 1}
    assert seen[("shopstream_archive_events_total", (("stream", "events"),))] == 3001  # the retry too
    assert seen[("shopstream_archive_events_total", (("stream", "promotions"),))] == 6
    assert seen[("shopstream_archive_events_total", (("stream", "outcomes"),))] == 6
    assert seen[("shopstream_archive_files_total", (("stream", "events"),))] == len(archive_files(root))
    assert seen[("shopstream_archive_bytes_total", (("stream", "events"),))] == sum(
        os.path.getsize(p) for p in archive_files(root)
    )
    assert not list(Path(root).rglob(".*.tmp"))


def test_kill_9_mid_stream_then_restart_loses_nothing(
    archive_env: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, env = archive_env
    events = list(load("rees46-demo", settings.datasets_dir))
    chunks = [events[:1000], events[1000:2000], events[2000:]]
    # the buffer rolls once at 60 % of the first chunk (as the writer counts bytes); the other
    # 40 % wait, uncommitted, for the 8 s time roll: the kill loses them from memory
    held = sum(
        len(orjson.dumps(e)) + len(e["event_id"]) + len(e["user_id"]) + ROW_OVERHEAD for e in chunks[0]
    )
    roll = {"SHOPSTREAM_ARCHIVE_ROLL_BYTES": str(int(0.6 * held)), "SHOPSTREAM_ARCHIVE_ROLL_S": "8"}
    env = {**env, **roll}
    root = Path(env["SHOPSTREAM_ARCHIVE_DIR"])
    log = tmp_path / "archive.log"

    asyncio.run(replay(settings, chunks[0], progress=False, keep_time=True))
    first = ArchiverProcess(env, log).start()
    deadline = time.monotonic() + 180
    while not list(root.rglob("part-*.parquet")):  # at least one file is in place
        assert first.alive() and time.monotonic() < deadline, first.tail()
        time.sleep(0.05)
    first.stop(signal.SIGKILL)  # mid-stream: whatever it buffered or had not committed is gone
    files_at_kill = len(list(root.rglob("part-*.parquet")))
    lost_in_memory = asyncio.run(behind(settings))
    assert lost_in_memory > 0, "the kill came after everything was committed: nothing to re-read"
    asyncio.run(replay(settings, chunks[1], progress=False, keep_time=True))  # published while it is down

    second = ArchiverProcess(env, log).start()
    try:
        asyncio.run(replay(settings, chunks[2], progress=False, keep_time=True))
        wait_until_committed(settings, second)
    finally:
        code = second.stop()
    assert code == 0, second.tail()

    got = read_events(str(root))
    assert {e["event_id"]: e for e in got} == {e["event_id"]: e for e in events}  # none lost
    assert len(got) == len(events)  # and none twice after dedupe
    assert len(list(root.rglob("part-*.parquet"))) > files_at_kill


def test_a_second_archiver_takes_half_the_partitions_and_nothing_is_lost(
    archive_env: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    """A rebalance mid-stream: the first archiver writes and commits what it holds before it gives
    partitions away (``on_partitions_revoked``); together they archive every event."""
    settings, env = archive_env
    env = {**env, "SHOPSTREAM_ARCHIVE_ROLL_BYTES": "32768", "SHOPSTREAM_ARCHIVE_ROLL_S": "3"}
    events = list(load("rees46-demo", settings.datasets_dir))
    root = Path(env["SHOPSTREAM_ARCHIVE_DIR"])
    asyncio.run(replay(settings, events[:1500], progress=False, keep_time=True))
    first = ArchiverProcess(env, tmp_path / "first.log").start()
    second = ArchiverProcess(
        {**env, "SHOPSTREAM_ARCHIVE_METRICS_PORT": str(free_port())}, tmp_path / "second.log"
    )
    try:
        deadline = time.monotonic() + 180
        while not list(root.rglob("part-*.parquet")):
            assert first.alive() and time.monotonic() < deadline, first.tail()
            time.sleep(0.05)
        second.start()
        while not re.search(r"archiving [1-9]\d* partitions", second.log.read_text()):  # joined
            assert second.alive() and time.monotonic() < deadline + 120, second.tail()
            time.sleep(0.2)
        asyncio.run(replay(settings, events[1500:], progress=False, keep_time=True))
        wait_until_committed(settings, first, second)
    finally:
        codes = first.stop(), second.stop()
    assert codes == (0, 0), first.tail() + second.tail()
    got = read_events(str(root))
    assert {e["event_id"]: e for e in got} == {e["event_id"]: e for e in events}
    assert len(got) == len(events)
    assert "archived" in second.log.read_text()  # it wrote files for partitions of its own
    assert first.log.read_text().count("archiving") >= 2  # assigned, revoked, assigned again
