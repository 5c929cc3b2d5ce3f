"""The exported model on the hot path and the promotion policy, through a real broker and worker.

Uses the demo artifact shipped in ``deploy/demo/model`` (onnxruntime only, no torch), copied into
a folder the worker polls for new versions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.admin import ensure_topics
from streams.promotions import in_holdout
from streams.settings import Settings
from streams.state import user_partition
from tests.integration.harness import (
    ROOT,
    WorkerProcess,
    collect,
    isolated_env,
    produce,
    quiet_promotions,
    settings_of,
    values,
)

pytestmark = pytest.mark.integration
DEMO_MODEL = ROOT / "deploy" / "demo" / "model"
T0 = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def event(etype: str, user: str, eid: str, t: float = 0.0, **fields: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "type": etype,
        "event_id": eid,
        "user_id": user,
        "event_time": at(t),
        **fields,
    }


def publish_version(folder: Path, version: str, graph_bytes: bytes | None = None) -> None:
    """Write a new artifact version the way a deployment should: graph and vocab first, the
    manifest last with an atomic rename."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if graph_bytes is not None:
        import hashlib

        name = f"model-{version}.onnx"
        (folder / name).write_bytes(graph_bytes)
        manifest["graph"] = name
        manifest["graph_sha256"] = hashlib.sha256(graph_bytes).hexdigest()
    manifest["model_version"] = version
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(folder / "manifest.json")


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess, Path]]:
    work = tmp_path_factory.mktemp("serving")
    model_dir = work / "model"
    shutil.copytree(DEMO_MODEL, model_dir)
    env = isolated_env(
        kafka_bootstrap,
        work,
        SHOPSTREAM_MODEL_DIR=str(model_dir),
        SHOPSTREAM_MODEL_POLL_S="0.5",
        SHOPSTREAM_PROMOTION_TICK_S="0.5",
        SHOPSTREAM_CART_ABANDON_AFTER_S="600",
        SHOPSTREAM_QUIET_HOURS="",
        SHOPSTREAM_HOLDOUT_PERCENT="50",
        SHOPSTREAM_FREQUENCY_CAP="2",
        SHOPSTREAM_BROWSE_VIEWS="100",
        SHOPSTREAM_HIGH_INTENT_PROPENSITY="1.0",
        SHOPSTREAM_PRICE_SENSITIVE="1.0",
        SHOPSTREAM_INFERENCE_PROVIDER="cpu",
    )
    settings = settings_of(env)
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(env, work / "worker.log").start()
    try:
        yield settings, worker, model_dir
    finally:
        worker.stop()


def known_items(model_dir: Path) -> list[str]:
    items: list[str] = json.loads((model_dir / "vocab.json").read_text())["items"]
    return items


async def test_model_recommendations_survive_hot_reload_and_a_corrupt_version(
    served: tuple[Settings, WorkerProcess, Path],
) -> None:
    settings, worker, model_dir = served
    v1 = json.loads((model_dir / "manifest.json").read_text())["model_version"]
    items = known_items(model_dir)

    def views(prefix: str, n: int) -> list[tuple[str, bytes | None, bytes]]:
        return [
            (
                settings.topic_views,
                None,
                orjson.dumps(event("view", f"{prefix}-{i % 7}", f"{prefix}-{i}", i, item_id=items[i % 50])),
            )
            for i in range(n)
        ]

    await produce(settings, views("a", 30))
    recs = values(
        await collect(settings, settings.topic_recommendations, lambda r: len(r) >= 30, worker=worker)
    )
    assert len(recs) == 30
    assert {r["source"] for r in recs} == {"model"} and {r["model_version"] for r in recs} == {v1}
    assert all(len(r["items"]) == settings.recommendations for r in recs)

    # hot reload in the middle of a stream: every event is answered, first by v1, then by v2
    stream = views("b", 300)
    await produce(settings, stream[:150])
    publish_version(model_dir, "v2-test")
    await asyncio.sleep(0.3)
    await produce(settings, stream[150:])

    def answered(prefix: str, n: int) -> Any:
        return lambda rs: len({v["event_id"] for v in values(rs) if v["event_id"].startswith(prefix)}) >= n

    recs = values(await collect(settings, settings.topic_recommendations, answered("b-", 300), worker=worker))
    got = [r for r in recs if r["event_id"].startswith("b-")]
    assert {r["event_id"] for r in got} == {f"b-{i}" for i in range(300)}
    deadline = asyncio.get_running_loop().time() + 180  # a busy machine: poll, load, warm-up, probe
    while "v2-test" not in {r["model_version"] for r in got}:  # the poll may land after the stream
        assert asyncio.get_running_loop().time() < deadline, "the new version never served"
        await produce(settings, views("c", 5))
        await asyncio.sleep(1)
        got = [
            r
            for r in values(await collect(settings, settings.topic_recommendations, answered("c-", 5)))
            if r["event_id"].startswith(("b-", "c-"))
        ]
    assert {r["model_version"] for r in got} <= {v1, "v2-test"}

    # a corrupt version is refused; v2 keeps serving
    publish_version(model_dir, "v3-corrupt", graph_bytes=b"this is not an onnx graph")
    deadline = asyncio.get_running_loop().time() + 180
    while "reload refused" not in worker.log.read_text(errors="replace"):
        assert asyncio.get_running_loop().time() < deadline, f"no reload refused in 180s:\n{worker.tail()}"
        await asyncio.sleep(0.25)
    assert "model reload refused, still serving v2-test" in worker.log.read_text(errors="replace")
    await produce(settings, views("d", 20))
    recs = values(await collect(settings, settings.topic_recommendations, answered("d-", 20), worker=worker))
    assert {r["model_version"] for r in recs if r["event_id"].startswith("d-")} == {"v2-test"}
    assert worker.alive()
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics", timeout=5).read().decode()
    )
    assert 'shopstream_model_reloads_total{outcome="failed"} 1.0' in metrics
    assert 'shopstream_model_info{provider="CPUExecutionProvider",version="v2-test"} 1.0' in metrics


def same_partition(names: list[str], partitions: int) -> list[str]:
    target = user_partition(names[0].encode(), partitions)
    return [n for n in names if user_partition(n.encode(), partitions) == target]


async def test_cart_abandonment_policy_end_to_end(served: tuple[Settings, WorkerProcess, Path]) -> None:
    settings, worker, _ = served
    pool = same_partition([f"shopper-{i}" for i in range(400)], settings.partitions)
    buyer, capped, ticker = pool[0], pool[1], pool[2]
    idle = next(u for u in pool[3:] if not in_holdout(u, 50))
    held = next(u for u in pool[3:] if in_holdout(u, 50))
    line = {"item_id": "sku-1", "quantity": 1, "unit_price": 30.0}
    # The partition's event-time clock runs on with wall time from the module's first test (its
    # events at T0 + 0..350 s): start this story an hour later, so no cart here comes due by
    # that clock before the story's own ticker moves it (the buyer's order must be seen first).
    START = 3600.0

    def cart(user: str, eid: str, t: float) -> tuple[str, None, bytes]:
        add = event("cart", user, eid, START + t, action="add", item_id="sku-1", quantity=1, unit_price=30.0)
        return (settings.topic_carts, None, orjson.dumps(add))

    inputs = [
        cart(idle, "p-1", 0),
        cart(held, "p-2", 0),
        cart(buyer, "p-3", 0),
        (
            settings.topic_orders,
            None,
            orjson.dumps(event("order", buyer, "p-4", START + 60, order_id="o", lines=[line])),
        ),
        *[
            (
                settings.topic_reviews,
                None,
                orjson.dumps(event("review", capped, f"p-r{i}", START + i, item_id="x", rating=1)),
            )
            for i in range(3)
        ],
        cart(capped, "p-5", 10),
        # another user's event, 700 s of event time later, moves the partition's clock past the carts
        (
            settings.topic_views,
            None,
            orjson.dumps(event("view", ticker, "p-6", START + 700, item_id="sku-2")),
        ),
    ]
    # Kafka orders events within one topic partition only: a user's events on different input
    # topics (reviews, carts) can reach the worker in either order. Publish in phases, each
    # answered before the next, so the event-time story below is also the processing order.
    for phase in (inputs[:4], inputs[4:7], inputs[7:8], inputs[8:]):
        phase_ids = {orjson.loads(v)["event_id"] for _, _, v in phase}
        await produce(settings, phase)

        def answered(rs: list[Any], ids: set[str] = phase_ids) -> bool:
            return ids <= {v["event_id"] for v in values(rs)}

        await collect(settings, settings.topic_recommendations, answered, worker=worker)

    def settled(rs: list[Any]) -> bool:
        return sum(1 for v in values(rs) if v["kind"] == "cart_abandonment") >= 2

    await collect(settings, settings.topic_promotions, settled, timeout=60, worker=worker)
    promos = await quiet_promotions(settings)
    by_user = Counter((p["user_id"], p["kind"]) for p in promos)
    assert by_user == {
        (idle, "cart_abandonment"): 1,
        (held, "cart_abandonment"): 1,
        (capped, "review_recovery"): 2,  # the third review and the cart are past the frequency cap
    }
    holdout = {p["user_id"]: p["holdout"] for p in promos if p["kind"] == "cart_abandonment"}
    assert holdout == {idle: False, held: True}
    cart_promo = next(p for p in promos if p["user_id"] == idle)
    assert cart_promo["trigger_event_id"] == "p-1" and cart_promo["items"] == ["sku-1"]
    assert cart_promo["scores"]["cart_value"] == 30.0 and cart_promo["offer"]["kind"] in (
        "percent_off",
        "reminder",
    )

    # the same input replayed: no new promotion id. A replayed event cannot be told from a
    # redelivered one, so its promotions may be sent again (at least once), with the same ids.
    await produce(settings, inputs)
    ids = [orjson.loads(v)["event_id"] for _, _, v in inputs]

    def replayed(rs: list[Any]) -> bool:  # every input answered twice (the topic also holds others)
        seen = Counter(v["event_id"] for v in values(rs))
        return all(seen[i] >= 2 for i in ids)

    recs = await collect(settings, settings.topic_recommendations, replayed, worker=worker)
    assert replayed(recs)  # the replay was processed (and answered again)
    again = await quiet_promotions(settings)
    assert {p["promotion_id"] for p in again} == {p["promotion_id"] for p in promos}
    first = {p["promotion_id"]: (p["kind"], p["user_id"], p["trigger_event_id"]) for p in promos}
    assert all(first[p["promotion_id"]] == (p["kind"], p["user_id"], p["trigger_event_id"]) for p in again)
