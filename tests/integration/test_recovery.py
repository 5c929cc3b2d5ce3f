"""Table state survives a worker restart (recovered from the changelog) and idle users expire."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from streams.admin import ensure_topics
from streams.changelog import is_packed_key, unpacked
from streams.pipeline import Message, local_pipeline
from streams.state import user_partition
from tests.integration.harness import (
    WorkerProcess,
    collect,
    isolated_env,
    produce,
    read_to_end,
    settings_of,
    user_state,
    values,
)

pytestmark = pytest.mark.integration


def event(etype: str, user: str, eid: str, **fields: Any) -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "type": etype,
            "event_id": eid,
            "user_id": user,
            "event_time": "2026-01-02T03:04:05Z",
            **fields,
        }
    )


async def test_restarted_worker_recovers_tables_from_changelog(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = isolated_env(kafka_bootstrap, tmp_path)
    settings = settings_of(env)
    port = settings.web_port
    await ensure_topics(settings)
    first = WorkerProcess(env, tmp_path / "worker1.log").start()
    try:
        await produce(
            settings,
            [
                (settings.topic_views, None, event("view", "erin", "r1", item_id="sku-1")),
                (settings.topic_views, None, event("view", "erin", "r2", item_id="sku-2")),
                (
                    settings.topic_carts,
                    None,
                    event("cart", "erin", "r3", action="add", item_id="sku-2", quantity=2, unit_price=9.5),
                ),
                (settings.topic_reviews, None, event("review", "erin", "r4", item_id="sku-1", rating=1)),
            ],
        )
        await collect(settings, settings.topic_recommendations, lambda r: len(r) >= 4, worker=first)
        before = await user_state(port, "erin", lambda s: s and len(s["seq"]) == 4)
    finally:
        assert first.stop() == 0, first.tail()

    # A fresh data dir: nothing on local disk, so the tables can only come from the changelogs.
    env2 = {**env, "SHOPSTREAM_DATA_DIR": str(tmp_path / "data-after-restart")}
    second = WorkerProcess(env2, tmp_path / "worker2.log").start()
    try:
        after = await user_state(port, "erin", lambda s: s is not None)
        before.pop("seen_ms"), after.pop("seen_ms")
        assert after == before
        assert after["cart"] == {"sku-2": [2, 9.5]}
        assert after["counts"] == {"view": 2, "cart_add": 1, "review": 1}
        assert after["reviews"] == [1, 1.0, 1]
        # a redelivered event is answered but not counted twice; a new one is folded in
        await produce(
            settings,
            [
                (settings.topic_views, b"erin", event("view", "erin", "r2", item_id="sku-2")),
                (settings.topic_views, b"erin", event("view", "erin", "r5", item_id="sku-3")),
            ],
        )  # keyed by user, as shops do: r2 is read before r5 (key None: a random partition each)
        recs = await collect(
            settings,
            settings.topic_recommendations,
            lambda r: "r5" in {v["event_id"] for v in values(r)},
            worker=second,
        )
        assert [v["event_id"] for v in values(recs)].count("r2") == 2
        final = await user_state(port, "erin", lambda s: s["counts"].get("view") == 3)
        items = [tok[0] for tok in final["seq"]]  # order across input topics is not defined
        assert sorted(items) == ["sku-1", "sku-1", "sku-2", "sku-2", "sku-3"] and items[-1] == "sku-3"
    finally:
        assert second.stop() == 0, second.tail()


async def test_idle_users_expire(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = isolated_env(kafka_bootstrap, tmp_path, SHOPSTREAM_USER_TTL_S="2", SHOPSTREAM_EXPIRY_INTERVAL_S="1")
    settings = settings_of(env)
    await ensure_topics(settings)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await produce(settings, [(settings.topic_views, None, event("view", "frank", "x1", item_id="sku-1"))])
        await collect(settings, settings.topic_recommendations, lambda r: len(r) >= 1, worker=worker)
        await user_state(settings.web_port, "frank", lambda s: s is None, timeout=30)
    finally:
        worker.stop()


async def test_baseline_statistics_recover_from_their_packed_changelog(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The baseline's item statistics go to their changelog packed (``streams.changelog``): read
    back and unpacked it holds exactly what a one-by-one run of the pipeline learns from the
    same events, and a worker with an empty data dir recovers them: its first answer equals that
    run's."""
    env = isolated_env(kafka_bootstrap, tmp_path)
    settings = settings_of(env)
    port = settings.web_port
    await ensure_topics(settings)
    # three users on one partition (the statistics are per partition), each keyed by user id on
    # one topic, so each user's events are folded in order
    names = iter(f"user-{i}" for i in range(1000))
    users: list[str] = []
    while len(users) < 3:
        name = next(names)
        if user_partition(name.encode(), settings.partitions) == 1:
            users.append(name)
    seen = {
        users[0]: ["sku-a", "sku-b", "sku-c", "sku-b"],
        users[1]: ["sku-b", "sku-d", "sku-a"],
    }
    sent = [
        (users[i], event("view", user, f"{user}-{j}", item_id=item))
        for i, user in enumerate(users[:2])
        for j, item in enumerate(seen[user])
    ]
    probe = (users[2], event("view", users[2], "probe", item_id="sku-a"))
    reference = local_pipeline(settings, 0.0)

    def answer(user: str, raw: bytes) -> list[Any]:
        result = reference.process([Message(1, user.encode(), raw, None)])
        (rec,) = [orjson.loads(o.value) for o in result.outputs if o.topic == settings.topic_recommendations]
        return [(i["item_id"], pytest.approx(i["score"])) for i in rec["items"]]

    for user, raw in sent:
        answer(user, raw)
    first = WorkerProcess(env, tmp_path / "worker1.log").start()
    try:
        await produce(settings, [(settings.topic_views, u.encode(), raw) for u, raw in sent])
        await collect(settings, settings.topic_recommendations, lambda r: len(r) >= len(sent), worker=first)
    finally:
        assert first.stop() == 0, first.tail()

    changelog = await read_to_end(settings, [f"{settings.app_id}-items-changelog"])
    assert all(is_packed_key(r.key) for r in changelog)  # not one record per item
    stored: dict[bytes, bytes] = {}
    records = (
        SimpleNamespace(key=r.key, value=r.value, tp=None, offset=r.offset, partition=r.partition)
        for r in changelog
    )
    for entry in unpacked(SimpleNamespace(message=r) for r in records):
        if entry.value is None:
            stored.pop(entry.key, None)
        elif not is_packed_key(entry.key):
            stored[entry.key] = entry.value
    expected = reference.recommender.table
    assert stored.keys() == expected.keys() and len(stored) == 4
    for key, raw in stored.items():
        got, want = orjson.loads(raw), orjson.loads(expected[key])
        assert got["n"] == pytest.approx(want["n"]) and got["nb"] == pytest.approx(want["nb"]), key

    env2 = {**env, "SHOPSTREAM_DATA_DIR": str(tmp_path / "data-after-restart")}
    second = WorkerProcess(env2, tmp_path / "worker2.log").start()
    try:
        await user_state(port, users[0], lambda s: s is not None)  # recovered, serving
        await produce(settings, [(settings.topic_views, probe[0].encode(), probe[1])])
        recs = await collect(
            settings,
            settings.topic_recommendations,
            lambda r: "probe" in {v["event_id"] for v in values(r)},
            worker=second,
        )
        (rec,) = [v for v in values(recs) if v["event_id"] == "probe"]
        assert rec["source"] == "baseline"
        got = [(i["item_id"], i["score"]) for i in rec["items"]]
        assert got == answer(*probe) and len(got) == 3  # b, c and d: every other item, ranked
    finally:
        assert second.stop() == 0, second.tail()
