"""Events through a real broker and a real worker process: outputs, dead letters, replay."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from streams.admin import all_topics, connect_admin, ensure_topics
from streams.deadletter import H_OFFSET, H_PARTITION, H_REASON, H_TOPIC
from streams.errors import ConfigurationError
from streams.replay import replay
from streams.schemas import SCHEMA_DIR
from streams.settings import Settings
from streams.sources.datasets import load
from streams.state import user_partition
from tests.integration import harness
from tests.integration.harness import (
    WorkerProcess,
    collect,
    delete_run_topics,
    isolated_env,
    produce,
    settings_of,
    started_worker,
    values,
)

pytestmark = pytest.mark.integration
NOW = "2026-01-02T03:04:05Z"


def event(etype: str, user: str, eid: str, **fields: Any) -> dict[str, Any]:
    return {"schema_version": 1, "type": etype, "event_id": eid, "user_id": user, "event_time": NOW, **fields}


@pytest.fixture(scope="module")
def running(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess]]:
    with started_worker(kafka_bootstrap, tmp_path_factory.mktemp("pipeline")) as running:
        yield running


def same_partition_users(n: int, partitions: int) -> list[str]:
    users = [f"shopper-{i}" for i in range(200)]
    target = user_partition(users[0].encode(), partitions)
    return [u for u in users if user_partition(u.encode(), partitions) == target][:n]


async def test_every_input_topic_yields_a_recommendation_for_its_user(
    running: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = running
    alice, bob = same_partition_users(2, settings.partitions)
    carol = "carol"
    line = {"item_id": "sku-3", "quantity": 1, "unit_price": 5.0}
    sent = [
        (settings.topic_views, None, event("view", alice, "e1", item_id="sku-1", price=10.0)),
        (settings.topic_views, b"not-the-user", event("view", alice, "e2", item_id="sku-2")),
        (settings.topic_carts, b"x", event("cart", alice, "e3", action="add", item_id="sku-3", quantity=2)),
        (settings.topic_orders, None, event("order", alice, "e4", order_id="o1", lines=[line], total=5.0)),
        (
            settings.topic_searches,
            None,
            event("search", carol, "e5", query="red shoes", clicked_item="sku-9"),
        ),
        (settings.topic_reviews, None, event("review", carol, "e6", item_id="sku-9", rating=2, text="meh")),
    ]
    await produce(settings, [(t, k, orjson.dumps(v)) for t, k, v in sent])
    recs = await collect(settings, settings.topic_recommendations, lambda r: len(r) >= 6, worker=worker)
    by_event = {v["event_id"]: (r, v) for r, v in zip(recs, values(recs), strict=True)}
    assert set(by_event) == {"e1", "e2", "e3", "e4", "e5", "e6"}
    schema = json.loads((SCHEMA_DIR / "recommendation.schema.json").read_text())
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for _, _, ev in sent:
        record, rec = by_event[ev["event_id"]]
        assert rec["user_id"] == ev["user_id"]
        assert record.key == ev["user_id"].encode()
        assert record.partition == user_partition(record.key, settings.partitions)
        assert rec["event_type"] == ev["type"]
        assert rec["source"] == "baseline"
        validator.validate(rec)
    # alice bought sku-3: never recommended to her right after; sku-2 co-visits sku-1
    assert "sku-3" not in [i["item_id"] for i in by_event["e4"][1]["items"]]
    # bob (same partition) views sku-1 after alice's session: what alice did next leads his list
    await produce(
        settings, [(settings.topic_views, None, orjson.dumps(event("view", bob, "e7", item_id="sku-1")))]
    )
    recs = await collect(
        settings,
        settings.topic_recommendations,
        lambda r: any(v["event_id"] == "e7" for v in values(r)),
        worker=worker,
    )
    bob_rec = next(v for v in values(recs) if v["event_id"] == "e7")
    assert {i["item_id"] for i in bob_rec["items"][:2]} == {"sku-2", "sku-3"}
    # the user page answers with or without the trailing slash; a user with no state is a 404
    web = f"http://127.0.0.1:{settings.web_port}"
    assert get(f"{web}/users/{alice}") == get(f"{web}/users/{alice}/")
    status, body = get(f"{web}/users/{alice}")
    assert status == 200 and len(body["seq"]) == 4
    status, body = get(f"{web}/users/nobody-{settings.app_id}")
    assert status == 404 and body["user_id"] == f"nobody-{settings.app_id}"
    # the users gauge counts users, not writes (RocksDB's estimate said 72 for 11 users); this test
    # runs first in the module, so alice, bob and carol are the worker's only users
    await until_metric(web, 'shopstream_table_keys{table="users"}', 3.0)


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


async def until_metric(web: str, series: str, want: float, timeout: float = 120.0) -> None:
    """Poll ``/metrics`` until ``series`` reads ``want`` (gauges refresh on a timer)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{web}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(series + " "):
                    last = float(line.rsplit(" ", 1)[1])
        if last == want:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{series} read {last}, not {want}")


async def test_bad_input_is_dead_lettered_and_valid_input_around_it_flows(
    running: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = running
    v, c = settings.topic_views, settings.topic_carts
    good1 = orjson.dumps(event("view", "dave", "g1", item_id="sku-1"))
    good2 = orjson.dumps(event("view", "dave", "g2", item_id="sku-2"))
    bad: list[tuple[str, bytes | None, str]] = [
        (v, b"{not json", "invalid_json"),
        (v, b'{"schema_version": 1}', "schema"),
        (c, orjson.dumps(event("cart", "dave", "b3", action="add", item_id="s", quantity="3")), "schema"),
        (c, orjson.dumps(event("cart", "dave", "b4", action="add", item_id="s", quantity=-1)), "schema"),
        (v, orjson.dumps(event("view", "dave", "b5", item_id="s", pad="x" * 70_000)), "oversized"),
        (
            v,
            orjson.dumps({**event("view", "dave", "b6", item_id="s"), "event_time": "1990-01-01T00:00:00Z"}),
            "impossible_value",
        ),
        (v, orjson.dumps(event("cart", "dave", "b7", action="add", item_id="s", quantity=1)), "wrong_topic"),
        (v, None, "empty"),
        (v, b"\xff\xfe\x00garbage", "invalid_json"),
    ]
    records = [(v, b"dave", good1)] + [(t, b"k", val) for t, val, _ in bad] + [(v, b"dave", good2)]
    await produce(settings, records)
    dead = await collect(settings, settings.topic_deadletter, lambda r: len(r) >= len(bad), worker=worker)
    assert len(dead) == len(bad)
    got = Counter((r.value, dict(r.headers)[H_REASON].decode()) for r in dead)
    assert got == Counter((val, reason) for _, val, reason in bad)
    for r in dead:
        headers = dict(r.headers)
        assert headers[H_TOPIC].decode() in (v, c)
        assert int(headers[H_PARTITION]) >= 0 and int(headers[H_OFFSET]) >= 0
    recs = await collect(
        settings,
        settings.topic_recommendations,
        lambda r: {"g1", "g2"} <= {x["event_id"] for x in values(r)},
        worker=worker,
    )
    assert {"g1", "g2"} <= {x["event_id"] for x in values(recs)}
    assert worker.alive()


async def test_replayed_real_sample_is_answered_event_for_event(
    running: tuple[Settings, WorkerProcess],
) -> None:
    settings, worker = running
    events = list(load("rees46-demo", settings.datasets_dir))[:400]
    sent, _ = await replay(settings, events, progress=False)
    wanted = {e["event_id"] for e in events}
    recs = await collect(
        settings,
        settings.topic_recommendations,
        lambda r: wanted <= {x["event_id"] for x in values(r)},
        worker=worker,
    )
    answered = [x for x in values(recs) if x["event_id"] in wanted]
    assert sent == 400
    assert {x["event_id"] for x in answered} == wanted
    assert sum(1 for x in answered if x["items"]) > 300  # the baseline learns from the stream itself


async def test_by_user_topic_with_wrong_partition_count_is_refused(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = isolated_env(kafka_bootstrap, tmp_path)
    settings = settings_of(env)
    await ensure_topics(settings, [settings.topic_events_by_user])
    other = settings.model_copy(update={"partitions": 3})
    with pytest.raises(ConfigurationError, match="partitions"):
        await ensure_topics(other, [settings.topic_events_by_user])


async def test_a_runs_topics_are_deleted_and_no_other(kafka_bootstrap: str, tmp_path: Path) -> None:
    """What the harness does at exit for every isolated_env (benchmarks too): a run's topics,
    its app's internal ones included, go; a topic of another run stays."""
    env, other = isolated_env(kafka_bootstrap, tmp_path / "a"), isolated_env(kafka_bootstrap, tmp_path / "b")
    settings, kept = settings_of(env), settings_of(other)
    created = {*all_topics(settings), f"{settings.app_id}-users-changelog"}
    await ensure_topics(settings, sorted(created))
    await ensure_topics(kept, [kept.topic_views])
    mine = [run for run in harness._RUNS if run[1] is env]
    assert len(mine) == 1

    async def listed(want: Callable[[set[str]], bool]) -> set[str]:
        """The broker's topics once ``want(them)``: its listing follows creations and deletions
        a moment later (longer on a busy machine); the last listing after a minute."""
        admin = await connect_admin(settings)
        try:
            for _ in range(120):
                topics = set(await admin.list_topics())
                if want(topics):
                    break
                await asyncio.sleep(0.5)
            return topics
        finally:
            await admin.close()

    assert created <= await listed(lambda topics: created <= topics)
    assert await delete_run_topics(mine) == {kafka_bootstrap: len(created)}
    left = await listed(lambda topics: not created & topics)
    assert not created & left and kept.topic_views in left
    assert not [t for t in left if t.startswith(mine[0][0])]
    assert await delete_run_topics(mine) == {kafka_bootstrap: 0}


def metric(port: int, name: str) -> float:
    """The value of a metric (``name{label="value"}`` for a labelled one) on the worker's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_events_on_another_partition_than_their_users_are_rekeyed(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Events keyed by something else than the user id reach the partition that owns the user
    through the by-user topic, and each user's state holds all of its events (direct input on:
    the ones already on their user's partition are scored where they are read)."""
    env = isolated_env(kafka_bootstrap, tmp_path, SHOPSTREAM_DIRECT_INPUT="true")
    settings = settings_of(env)
    await ensure_topics(settings)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await _rekeyed(settings, worker)
    finally:
        worker.stop()


async def _rekeyed(settings: Settings, worker: WorkerProcess) -> None:
    sent = [event("view", f"rekey-{i % 5}", f"rk{i}", item_id=f"sku-{i % 7}") for i in range(40)]
    keys = [f"session-{i}".encode() for i in range(40)]  # producers keyed by session, not user
    await produce(
        settings, [(settings.topic_views, k, orjson.dumps(v)) for k, v in zip(keys, sent, strict=True)]
    )
    wanted = {v["event_id"] for v in sent}
    recs = await collect(
        settings,
        settings.topic_recommendations,
        lambda r: wanted <= {x["event_id"] for x in values(r)},
        worker=worker,
    )
    mine = [(r, v) for r, v in zip(recs, values(recs), strict=True) if v["event_id"] in wanted]
    assert {v["event_id"] for _, v in mine} == wanted
    for r, v in mine:
        assert r.key == v["user_id"].encode()
        assert r.partition == user_partition(r.key, settings.partitions)
    off = sum(
        1
        for k, v in zip(keys, sent, strict=True)
        if user_partition(k, settings.partitions)
        != user_partition(v["user_id"].encode(), settings.partitions)
    )
    assert 0 < off < len(sent)
    # the ones already on their user's partition were scored where they were read (direct input),
    # the others took the by-user hop
    routed = {
        path: metric(settings.web_port, f'shopstream_events_routed_total{{path="{path}"}}')
        for path in ("direct", "hop")
    }
    assert routed == {"direct": len(sent) - off, "hop": off}
    # each user's state holds all of its events, whichever path they took
    for u in {v["user_id"] for v in sent}:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/users/{u}/", timeout=10) as resp:
            state = orjson.loads(resp.read())
        assert len(state["seq"]) == sum(1 for v in sent if v["user_id"] == u)


async def test_inputs_with_another_partition_count_take_the_by_user_hop(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = isolated_env(kafka_bootstrap, tmp_path)
    settings = settings_of(env)
    await ensure_topics(settings.model_copy(update={"partitions": 3}), list(settings.input_topics))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        events = list(load("rees46-demo", settings.datasets_dir))[:150]
        await replay(settings, events, progress=False)
        wanted = {e["event_id"] for e in events}
        recs = await collect(
            settings,
            settings.topic_recommendations,
            lambda r: wanted <= {x["event_id"] for x in values(r)},
            worker=worker,
        )
        assert wanted <= {x["event_id"] for x in values(recs)}
    finally:
        worker.stop()
