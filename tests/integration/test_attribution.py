"""Promotion outcomes through a real broker and worker processes, with a crash in between.

Three users leave carts that come due: T (treated), H (in the holdout group) and W. Once their
promotions are out, the worker is killed (SIGKILL) and a fresh worker with an empty data folder
takes over (its state recovered from the changelog). Then T and H order the promoted item within
the attribution window and W comes back after the window's end without ordering. Every input
committed, ``shop.promotion-outcomes`` holds exactly one outcome per promotion: T converted with
the discount's cost, H converted as holdout without cost, W unconverted, closed by the window.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.admin import ensure_topics
from streams.promotions import in_holdout
from streams.records import PromotionOutcome
from streams.settings import Settings
from streams.uplift import read_topic
from streams.uplift import run as uplift_run
from tests.integration.harness import (
    WorkerProcess,
    collect,
    group_clients,
    isolated_env,
    partitions_of,
    produce,
    read_to_end,
    settings_of,
    uncommitted_before,
    values,
)

pytestmark = pytest.mark.integration
T0 = (datetime.now(UTC) - timedelta(hours=3)).replace(microsecond=0)
Record = tuple[str, bytes, bytes]
HOLDOUT_PERCENT = 50.0
WINDOW_S = 1800.0
DUE_S = 600.0


def event(settings: Settings, etype: str, user: str, eid: str, t: float, **fields: Any) -> Record:
    topic = {kind: name for name, kind in settings.input_topics.items()}[etype]
    at = (T0 + timedelta(seconds=t)).isoformat().replace("+00:00", "Z")
    body = {"schema_version": 1, "type": etype, "event_id": eid, "user_id": user, "event_time": at}
    return (topic, user.encode(), orjson.dumps({**body, **fields}))


async def all_committed(settings: Settings, timeout: float = 180.0) -> None:
    """Wait until the worker's group has committed every input message produced so far (its
    outputs are confirmed by then: a commit waits for the batch's deliveries)."""
    topics = [*settings.input_topics, settings.topic_events_by_user]
    deadline = time.monotonic() + timeout
    async with group_clients(settings) as (admin, consumer):
        tps = await partitions_of(consumer, topics)
        end = await consumer.end_offsets(tps)
        while (left := await uncommitted_before(admin, settings.app_id, end)) > 0:
            assert time.monotonic() < deadline, f"{left} input messages never committed"
            await asyncio.sleep(0.5)


async def test_outcomes_are_joined_once_per_promotion_across_a_crash(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = isolated_env(
        kafka_bootstrap,
        tmp_path,
        SHOPSTREAM_CART_ABANDON_AFTER_S=str(DUE_S),
        SHOPSTREAM_PROMOTION_TICK_S="0.5",
        SHOPSTREAM_QUIET_HOURS="",
        SHOPSTREAM_HOLDOUT_PERCENT=str(HOLDOUT_PERCENT),
        SHOPSTREAM_ATTRIBUTION_WINDOW_S=str(WINDOW_S),
    )
    settings = settings_of(env)
    await ensure_topics(settings)
    tag = uuid.uuid4().hex[:6]
    pool = [f"buyer-{tag}-{i}" for i in range(100)]
    treated, spare = [u for u in pool if not in_holdout(u, HOLDOUT_PERCENT)][:2]
    holdout = next(u for u in pool if in_holdout(u, HOLDOUT_PERCENT))
    users = (treated, holdout, spare)

    def cart(user: str) -> Record:
        return event(
            settings, "cart", user, f"{user}-c", 0, action="add", item_id="sku-1", quantity=2, unit_price=30.0
        )

    async def publish(records: list[Record], worker: WorkerProcess) -> None:
        """Produce, and wait until every event is answered: the next records are read after
        these (the partition's event-time clock, which any user's event moves, closes windows
        and fires carts, so an event of another input topic must not overtake these)."""
        ids = {orjson.loads(raw)["event_id"] for _, _, raw in records}
        await produce(settings, records)

        def answered(rs: list[Any]) -> bool:
            return ids <= {v["event_id"] for v in values(rs)}

        await collect(settings, settings.topic_recommendations, answered, timeout=180, worker=worker)

    first = WorkerProcess(env, tmp_path / "worker-1.log").start()
    try:
        # carts, then a view after they came due: the promotions are decided at DUE_S
        await publish([cart(u) for u in users], first)
        await produce(
            settings, [event(settings, "view", u, f"{u}-v", DUE_S + 100, item_id="sku-9") for u in users]
        )
        got = await collect(
            settings,
            settings.topic_promotions,
            lambda rs: {r["user_id"] for r in values(rs)} >= set(users),
            timeout=180,
            worker=first,
        )
        promos = {r["user_id"]: r for r in values(got)}
        assert set(promos) >= set(users), first.tail()
        assert promos[holdout]["holdout"] is True and promos[treated]["holdout"] is False
    finally:
        first.stop(signal.SIGKILL)

    # a fresh worker with an empty data folder: the open windows come back from the changelog
    env2 = {**env, "SHOPSTREAM_DATA_DIR": str(tmp_path / "data-2")}
    second = WorkerProcess(env2, tmp_path / "worker-2.log").start()
    try:
        line = {"item_id": "sku-1", "quantity": 2, "unit_price": 30.0}
        other = {"item_id": "sku-7", "quantity": 1, "unit_price": 10.0}
        orders = [
            event(
                settings,
                "order",
                u,
                f"{u}-o",
                DUE_S + 300,
                order_id=f"{u}-order",
                lines=[line, other],
                total=70.0,
            )
            for u in (treated, holdout)
        ]
        late = event(settings, "view", spare, f"{spare}-late", DUE_S + WINDOW_S + 60, item_id="sku-9")
        await publish(orders, second)  # in the window: before the late view moves the clock past it
        await produce(settings, [late])
        await collect(
            settings,
            settings.topic_promotion_outcomes,
            lambda rs: {r["user_id"] for r in values(rs)} >= set(users),
            timeout=180,
            worker=second,
        )
        await all_committed(settings)
        outcomes = values(await read_to_end(settings, [settings.topic_promotion_outcomes]))
        assert await read_topic(settings, settings.topic_promotion_outcomes) == outcomes  # uplift-report's
        # uplift-report reads the promotions topic beside for the bandit's off-policy estimates:
        # these were chosen by the rules, so there are none, and the report says what it left out
        rep = await asyncio.to_thread(uplift_run, settings, None, tmp_path / "uplift")
        assert rep["off_policy"] == {} and rep["off_policy_left_out"]["holdout"] >= 1
        assert rep["off_policy_left_out"]["not chosen by the bandit"] >= 2
    finally:
        second.stop()
    by_id: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        PromotionOutcome.model_validate(o)
        assert by_id.setdefault(o["promotion_id"], o) == o  # a re-sent outcome is the same record
    mine = {o["user_id"]: o for o in by_id.values() if o["user_id"] in users}
    assert len(mine) == 3 and len([o for o in by_id.values() if o["user_id"] in users]) == 3
    assert {u: mine[u]["promotion_id"] for u in users} == {u: promos[u]["promotion_id"] for u in users}
    t, h, w = mine[treated], mine[holdout], mine[spare]
    pct = promos[treated]["offer"]["value"]
    assert promos[treated]["offer"]["kind"] == "percent_off"
    assert (t["converted"], t["closed_by"], t["holdout"], t["order_id"]) == (
        True,
        "order",
        False,
        f"{treated}-order",
    )
    assert (t["revenue_items"], t["revenue_order"], t["discount_cost"]) == (
        60.0,
        70.0,
        round(60.0 * pct / 100, 2),
    )
    assert (h["converted"], h["holdout"], h["discount_cost"], h["revenue_items"]) == (True, True, 0.0, 60.0)
    assert (w["converted"], w["closed_by"], w["order_id"]) == (False, "window", None)
