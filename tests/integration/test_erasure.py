"""Forget a user and the marketing opt-out, through a real broker and worker processes.

Several users shop (one of them, U, leaves a cart that would be promoted as abandoned later);
``shopstream forget U`` and ``shopstream consent O --marketing off`` go out; then no output mentions
U, U's state is gone from the worker and its changelog ends in a tombstone, no other table holds
U's id, the opted-out user gets recommendations but no promotion until ``--marketing on``; a
fresh worker with an empty data folder recovers every other user exactly, and U stays gone.
"""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.admin import ensure_topics
from streams.baseline import VERSION as BASELINE
from streams.settings import Settings
from streams.state import user_partition
from tests.integration.harness import (
    ROOT,
    WorkerProcess,
    collect,
    isolated_env,
    produce,
    quiet_promotions,
    read_to_end,
    settings_of,
    user_state,
    values,
)

pytestmark = pytest.mark.integration
T0 = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
Record = tuple[str, bytes, bytes]


def event(settings: Settings, etype: str, user: str, eid: str, t: float, **fields: Any) -> Record:
    topic = {kind: name for name, kind in settings.input_topics.items()}[etype]
    at = (T0 + timedelta(seconds=t)).isoformat().replace("+00:00", "Z")
    body = {"schema_version": 1, "type": etype, "event_id": eid, "user_id": user, "event_time": at}
    return (topic, user.encode(), orjson.dumps({**body, **fields}))  # keyed by user, as shops do


async def shopstream(env: dict[str, str], *args: str) -> str:
    """Run the ``shopstream`` command with the test's settings; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streams",
        *args,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=180)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode()


def metric(port: int, line: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line + " ")]
    return found[0] if found else 0.0


async def test_forget_and_opt_out_hold_through_outputs_changelogs_and_recovery(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = isolated_env(
        kafka_bootstrap,
        tmp_path,
        SHOPSTREAM_CART_ABANDON_AFTER_S="600",
        SHOPSTREAM_PROMOTION_TICK_S="0.5",
        SHOPSTREAM_QUIET_HOURS="",
        SHOPSTREAM_HOLDOUT_PERCENT="0",
    )
    settings = settings_of(env)
    port = settings.web_port
    await ensure_topics(settings)
    tag = uuid.uuid4().hex[:6]
    pool = [f"shopper-{tag}-{i}" for i in range(200)]
    home = user_partition(pool[0].encode(), settings.partitions)
    gone, kept, optout, ticker = [u for u in pool if user_partition(u.encode(), settings.partitions) == home][
        :4
    ]
    others = [f"other-{tag}-{i}" for i in range(2)]  # wherever they land
    users = [gone, kept, optout, ticker, *others]

    def cart(user: str, eid: str, t: float, item: str = "sku-1") -> Record:
        return event(settings, "cart", user, eid, t, action="add", item_id=item, quantity=1, unit_price=30.0)

    def views(user: str, prefix: str, t: float, item: str) -> list[Record]:
        return [event(settings, "view", user, f"{prefix}{i}", t + 10 * i, item_id=item) for i in range(3)]

    shop = [
        event(settings, "view", gone, "g-view", 0, item_id="sku-1", category="shoes", price=30.0),
        event(settings, "search", gone, "g-search", 1, query="red shoes", clicked_item="sku-1"),
        cart(gone, "g-cart", 2),
        event(settings, "view", kept, "k-view", 0, item_id="sku-1"),
        cart(kept, "k-cart", 2),
        event(settings, "view", optout, "o-view", 0, item_id="sku-4"),
        event(settings, "view", others[0], "a-view", 0, item_id="sku-2"),
        event(settings, "view", others[0], "a-view2", 1, item_id="sku-3"),
        event(
            settings,
            "order",
            others[0],
            "a-order",
            2,
            order_id="o-1",
            lines=[{"item_id": "sku-3", "quantity": 1}],
        ),
        event(settings, "view", others[1], "b-view", 0, item_id="sku-1"),
        event(settings, "review", others[1], "b-review", 1, item_id="sku-1", rating=5, text="great shoes"),
    ]
    # while opted out: three views of one item (browse abandonment), then a cart that comes due;
    # published one after the other, since events of two input topics may arrive in either order
    # (a cart processed before the third view would leave no browse trigger to suppress)
    browsed_out = views(optout, "o-a", 100, "sku-5")
    carted_out = [cart(optout, "o-cart", 130, "sku-5")]
    tick = [event(settings, "view", ticker, "t-view", 800, item_id="sku-9")]  # clocks past every cart
    opted_in = views(optout, "o-b", 900, "sku-6")
    after_restart = [event(settings, "view", gone, "g-again", 1000, item_id="sku-7")]
    sent: dict[str, tuple[str, str]] = {}  # event id -> (user, type) of every behaviour event

    def answered(ids: set[str]) -> Any:
        return lambda rs: ids <= {v["event_id"] for v in values(rs)}

    async def publish(records: list[Record], worker: WorkerProcess) -> None:
        for _, _, raw in records:
            body = orjson.loads(raw)
            sent[body["event_id"]] = (body["user_id"], body["type"])
        await produce(settings, records)
        ids = {orjson.loads(raw)["event_id"] for _, _, raw in records}
        await collect(settings, settings.topic_recommendations, answered(ids), timeout=120, worker=worker)

    first = WorkerProcess(env, tmp_path / "worker1.log").start()
    try:
        await publish(shop, first)
        before = {u: await user_state(port, u, lambda s: s is not None) for u in users if u != ticker}
        assert before[gone]["cart"] == {"sku-1": [1, 30.0]} and len(before[gone]["seq"]) == 3

        out = await shopstream(env, "consent", optout, "--marketing", "off")
        assert "acknowledged" in out and optout not in out
        out = await shopstream(env, "forget", gone)
        assert "acknowledged" in out and gone not in out and settings.topic_erasures in out
        await user_state(port, gone, lambda s: s is None)
        await user_state(port, optout, lambda s: s and s["promo"].get("consent", [True])[0] is False)

        await publish(browsed_out, first)
        await publish(carted_out, first)
        await publish(tick, first)

        def kept_promoted(rs: list[Any]) -> bool:
            return any(v["user_id"] == kept for v in values(rs))

        await collect(settings, settings.topic_promotions, kept_promoted, timeout=120, worker=first)
        promos = await quiet_promotions(settings)
        assert [(p["user_id"], p["kind"], p["trigger_event_id"]) for p in promos] == [
            (kept, "cart_abandonment", "k-cart")
        ]
        assert promos[0]["items"] == ["sku-1"] and promos[0]["scores"]["cart_value"] == 30.0
        assert promos[0]["offer"]["kind"] in ("percent_off", "reminder") and promos[0]["holdout"] is False
        assert metric(port, 'shopstream_promotions_suppressed_total{reason="opt_out"}') >= 2  # browse, cart

        out = await shopstream(env, "consent", optout, "--marketing", "on")
        assert "acknowledged" in out
        await user_state(port, optout, lambda s: s["promo"]["consent"][0] is True)
        await publish(opted_in, first)

        def browse(rs: list[Any]) -> bool:
            return any(v["user_id"] == optout for v in values(rs))

        await collect(settings, settings.topic_promotions, browse, timeout=120, worker=first)
        promos = await quiet_promotions(settings)
        assert sorted((p["user_id"], p["kind"], p["trigger_event_id"]) for p in promos) == sorted(
            [(kept, "cart_abandonment", "k-cart"), (optout, "browse_abandonment", "o-b2")]
        )
        browsed = next(p for p in promos if p["user_id"] == optout)
        assert browsed["items"][0] == "sku-6" and browsed["reason"].startswith("3 views of sku-6")
        assert metric(port, "shopstream_erasures_total") == 1.0
        assert metric(port, 'shopstream_consents_total{marketing="false"}') == 1.0
        assert metric(port, 'shopstream_consents_total{marketing="true"}') == 1.0
        settled = {u: await user_state(port, u, lambda s: s is not None) for u in users if u != gone}
    finally:
        assert first.stop() == 0, first.tail()

    # every output is the expected one: one recommendation per behaviour event, for its user; none
    # for the requests; U appears only in the answers to U's events before the erasure
    recs = values(await read_to_end(settings, [settings.topic_recommendations]))
    assert Counter(r["event_id"] for r in recs) == Counter(set(sent))
    for r in recs:
        assert (r["user_id"], r["event_type"]) == sent[r["event_id"]], r
        assert r["source"] == "baseline" and r["model_version"] == BASELINE and len(r["items"]) <= 10
    for topic in (settings.topic_recommendations, settings.topic_promotions, settings.topic_deadletter):
        for rec in await read_to_end(settings, [topic]):
            if gone.encode() in (rec.value or b"") + (rec.key or b""):
                assert topic == settings.topic_recommendations, rec
                assert orjson.loads(rec.value or b"")["event_id"] in {"g-view", "g-search", "g-cart"}
    assert await read_to_end(settings, [settings.topic_deadletter]) == []

    # the users changelog ends in a tombstone for U, or never held U at all (U's events and the
    # erasure came between two checkpoints: nothing of U was written); the other tables never
    # held U's id
    changelog = f"{settings.app_id}-users-changelog"
    last = {r.key: r.value for r in await read_to_end(settings, [changelog])}
    assert last.get(gone.encode()) is None
    assert all(last[u.encode()] is not None for u in users if u != gone)
    for table in ("items", "budget"):
        for rec in await read_to_end(settings, [f"{settings.app_id}-{table}-changelog"]):
            assert gone.encode() not in (rec.key or b"") + (rec.value or b""), table
    # logs carry no user ids
    for u in users:
        assert u not in first.log.read_text(errors="replace")

    # a fresh worker with an empty data folder recovers from the changelogs: U stays gone, the
    # others come back exactly, nothing is promoted again
    env2 = {**env, "SHOPSTREAM_DATA_DIR": str(tmp_path / "data-after-restart")}
    second = WorkerProcess(env2, tmp_path / "worker2.log").start()
    try:
        for u, state in settled.items():
            got = await user_state(port, u, lambda s: s is not None)
            got.pop("seen_ms"), state.pop("seen_ms")
            assert got == state, u
        assert await user_state(port, gone, lambda s: True) is None
        # U comes back: a new user with only the new event
        await publish(after_restart, second)
        fresh = await user_state(port, gone, lambda s: s is not None)
        assert fresh["counts"] == {"view": 1} and [t[0] for t in fresh["seq"]] == ["sku-7"]
        assert fresh["cart"] == {} and fresh["ids"] == ["g-again"]
        promos = await quiet_promotions(settings)
        assert sorted((p["user_id"], p["kind"]) for p in promos) == sorted(
            [(kept, "cart_abandonment"), (optout, "browse_abandonment")]
        )
        for u in users:
            assert u not in second.log.read_text(errors="replace")
    finally:
        assert second.stop() == 0, second.tail()
