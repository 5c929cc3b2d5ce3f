"""Attribution of orders to promotions, without Kafka (``streams.attribution`` in the pipeline):
known outcomes, holdout, capacity, redelivery, a restart, and every outcome of a random stream
checked against a one-by-one recomputation from the promotions and orders, whatever the batching."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.attribution import KEEP_OPEN, OPEN
from streams.pipeline import Message, Pipeline, local_pipeline
from streams.records import PromotionOutcome
from streams.settings import Settings
from streams.state import UserState, user_partition
from tests.unit.test_delivery_semantics import msg

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC).timestamp()
WINDOW = 3 * 86400.0


def add(eid: str, t: float, item: str, price: float, user: str = "u1", qty: int = 1) -> Message:
    return msg("cart", eid, t, user, action="add", item_id=item, quantity=qty, unit_price=price)


def order(eid: str, t: float, lines: list[tuple[str, int, float]], user: str = "u1", **kw: Any) -> Message:
    body = [{"item_id": i, "quantity": q, "unit_price": p} for i, q, p in lines]
    return msg("order", eid, t, user, order_id=f"o-{eid}", lines=body, currency="EUR", **kw)


def pipe(**overrides: Any) -> Pipeline:
    s = Settings(**{"holdout_percent": 0.0, "quiet_hours": "", "frequency_cap": 1000, **overrides})
    return local_pipeline(s, budget_per_partition=1e9, clock=lambda: T0)


def split(p: Pipeline, outputs: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    promos = [orjson.loads(o.value) for o in outputs if o.topic == p.s.topic_promotions]
    for r in promos:  # stamped with the wall clock, not the pipeline's
        del r["created_at"], r["expires_at"]
    outcomes = [orjson.loads(o.value) for o in outputs if o.topic == p.s.topic_promotion_outcomes]
    for o in outcomes:
        PromotionOutcome.model_validate(o)  # every outcome keeps the published contract
    return promos, outcomes


def run(p: Pipeline, *msgs: Message) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return split(p, p.process(list(msgs)).outputs)


def close_all(
    p: Pipeline, partitions: set[int], until: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the partitions' clocks to ``until`` and fire their timers (the worker's timer task)."""
    for part in partitions:
        p.timers.observe(part, until, 0.0)
    outputs, changed = p.due(partitions, wall=0.0)
    p.store_due(changed)
    return split(p, outputs)


def test_an_order_in_the_window_converts_the_cart_promotion_with_its_revenue() -> None:
    p = pipe()
    promos, outcomes = run(p, add("c1", T0, "a", 10.0, qty=2), msg("view", "v1", T0 + 4000, item_id="x"))
    (promo,) = promos
    assert promo["kind"] == "cart_abandonment" and promo["offer"] == {"kind": "percent_off", "value": 5.0}
    assert outcomes == []
    _, outcomes = run(p, order("o1", T0 + 7200, [("a", 2, 10.0), ("b", 1, 5.0)], total=25.0))
    (out,) = outcomes
    assert out["promotion_id"] == promo["promotion_id"] and out["converted"] is True
    assert out["closed_by"] == "order" and out["order_id"] == "o-o1" and out["order_event_id"] == "o1"
    assert (out["revenue_items"], out["revenue_order"], out["discount_cost"]) == (20.0, 25.0, 1.0)
    assert out["promoted_at"] == datetime.fromtimestamp(T0 + 3600, UTC).isoformat()  # the cart's due time
    assert out["currency"] == "EUR" and out["holdout"] is False
    # once converted, nothing more: a later order, the window's end
    _, later = run(p, order("o2", T0 + 9000, [("a", 1, 10.0)]))
    assert later == [] and close_all(p, {promo_partition()}, T0 + 10 * 86400) == ([], [])
    text = p.metrics.registry.get_sample_value
    labels = {"kind": "cart_abandonment", "offer": "percent_off:5", "holdout": "false"}
    assert (
        text("shopstream_promotion_outcomes_total", {**labels, "converted": "true", "closed_by": "order"})
        == 1
    )
    assert text("shopstream_promotion_revenue_total", {**labels, "scope": "items"}) == 20.0
    assert (
        text(
            "shopstream_promotion_discount_cost_total", {"kind": "cart_abandonment", "offer": "percent_off:5"}
        )
        == 1.0
    )


def promo_partition(user: str = "u1") -> int:
    return user_partition(user.encode(), 8)


def test_a_window_without_an_order_closes_unconverted_by_the_next_event_or_the_timer() -> None:
    events = [add("c1", T0, "a", 10.0), msg("view", "v1", T0 + 4000, item_id="x")]
    late = msg("view", "v2", T0 + 3600 + WINDOW + 5, item_id="y")
    by_event = pipe()
    run(by_event, *events)
    _, closed_by_event = run(by_event, late, order("o1", T0 + 3600 + WINDOW + 10, [("a", 1, 10.0)]))
    by_timer = pipe()
    run(by_timer, *events)
    _, closed_by_timer = close_all(by_timer, {promo_partition()}, T0 + 3600 + WINDOW)
    assert closed_by_event == closed_by_timer  # the same record, whoever closes it
    (out,) = closed_by_timer
    assert out["converted"] is False and out["closed_by"] == "window" and out["revenue_order"] == 0.0
    assert out["order_id"] is None and out["discount_cost"] == 0.0
    assert OPEN not in UserState.loads(by_timer.users[b"u1"]).promo


def test_a_holdout_promotion_gets_its_outcome_without_a_discount_cost() -> None:
    p = pipe(holdout_percent=100.0)
    (promo,), _ = run(p, add("c1", T0, "a", 10.0), msg("view", "v1", T0 + 4000, item_id="x"))
    assert promo["holdout"] is True
    _, (out,) = run(p, order("o1", T0 + 5000, [("a", 1, 10.0)]))
    assert out["holdout"] is True and out["converted"] is True
    assert out["revenue_items"] == 10.0 and out["discount_cost"] == 0.0


def test_a_redelivered_order_resends_its_outcome_and_a_restart_loses_no_window() -> None:
    p = pipe()
    run(p, add("c1", T0, "a", 10.0), msg("view", "v1", T0 + 4000, item_id="x"))
    raw = p.users[b"u1"]
    buy = order("o1", T0 + 5000, [("a", 1, 10.0)])
    _, first = run(p, buy)
    _, again = run(p, buy)  # its offset was not committed: redelivered
    assert again == first and len(first) == 1
    sent = p.metrics.registry.get_sample_value
    labels = {"kind": "cart_abandonment", "offer": "percent_off:5", "holdout": "false"}
    assert (
        sent("shopstream_promotion_outcomes_total", {**labels, "converted": "true", "closed_by": "order"})
        == 1
    )
    # a worker restarted before the order: the window is in the stored state, its timer reseeded
    fresh = pipe()
    fresh.users[b"u1"] = raw
    fresh.seed_timers(promo_partition(), [(b"u1", raw)])
    _, (closed,) = close_all(fresh, {promo_partition()}, T0 + 3600 + WINDOW)
    assert closed["promotion_id"] == first[0]["promotion_id"] and closed["converted"] is False


def test_open_windows_are_bounded_per_user() -> None:
    p = pipe()
    reviews = [msg("review", f"r{i}", T0 + i, item_id=f"i{i}", rating=1) for i in range(KEEP_OPEN + 3)]
    promos, outcomes = run(p, *reviews)
    assert len(promos) == KEEP_OPEN + 3
    assert [o["promotion_id"] for o in outcomes] == [r["promotion_id"] for r in promos[:3]]
    assert {o["closed_by"] for o in outcomes} == {"capacity"}
    assert len(UserState.loads(p.users[b"u1"]).promo[OPEN]) == KEEP_OPEN


def random_stream(seed: int, users: int = 6, days: float = 8.0) -> list[Message]:
    rng = random.Random(seed)
    out: list[Message] = []
    for u in range(users):
        user, t = f"u{u}", T0
        for j in range(rng.randint(15, 40)):
            t += rng.expovariate(1 / (days * 86400 / 30))
            item = f"i{rng.randint(0, 9)}"
            roll = rng.random()
            eid = f"{user}-e{j}"
            if roll < 0.35:
                out.append(add(eid, t, item, float(rng.randint(1, 50)), user, rng.randint(1, 3)))
            elif roll < 0.45:
                out.append(msg("cart", eid, t, user, action="remove", item_id=item, quantity=1))
            elif roll < 0.6:
                lines = [
                    (f"i{rng.randint(0, 9)}", rng.randint(1, 2), float(rng.randint(1, 50))) for _ in range(2)
                ]
                out.append(order(eid, t, lines, user))
            elif roll < 0.7:
                out.append(msg("review", eid, t, user, item_id=item, rating=rng.randint(1, 5)))
            else:
                out.append(msg("view", eid, t, user, item_id=item))
    out.sort(key=lambda m: orjson.loads(m.value)["event_time"])
    return out


def expected_outcomes(promos: list[dict[str, Any]], events: list[Message]) -> dict[str, tuple[bool, float]]:
    """One by one, from the records alone: a promotion converts on the user's first order at or
    after its decision and before its window ends (its items' lines are its revenue)."""
    orders: dict[str, list[dict[str, Any]]] = {}
    for m in events:
        raw = orjson.loads(m.value)
        if raw["type"] == "order":
            orders.setdefault(raw["user_id"], []).append(raw)
    out = {}
    for promo in promos:
        start = datetime.fromisoformat(promo["decided_at"]).timestamp()
        first = next(
            (
                o
                for o in orders.get(promo["user_id"], [])
                if start <= datetime.fromisoformat(o["event_time"]).timestamp() < start + WINDOW
            ),
            None,
        )
        items = set(promo["items"])
        revenue = (
            sum(ln["quantity"] * ln["unit_price"] for ln in first["lines"] if ln["item_id"] in items)
            if first
            else 0.0
        )
        out[promo["promotion_id"]] = (first is not None, round(revenue, 2))
    return out


def test_every_outcome_matches_a_one_by_one_recomputation_whatever_the_batching() -> None:
    events = random_stream(7)
    partitions = {m.partition for m in events}
    end = T0 + 40 * 86400
    runs = []
    for sizes in ([1], [len(events)], [3, 7, 1, 16]):
        p = pipe()
        promos: list[dict[str, Any]] = []
        outcomes: list[dict[str, Any]] = []
        i, k = 0, 0
        while i < len(events):
            n = sizes[k % len(sizes)]
            got = run(p, *events[i : i + n])
            promos += got[0]
            outcomes += got[1]
            i, k = i + n, k + 1
        more = close_all(p, partitions, end)  # carts still due are decided at the end: their windows
        last = close_all(p, partitions, end + WINDOW)  # close one window later
        runs.append((promos + more[0] + last[0], outcomes + more[1] + last[1]))
    (promos, outcomes), *others = runs

    def key(record: dict[str, Any]) -> str:
        return str(record["promotion_id"])

    for other_promos, other_outcomes in others:
        assert sorted(other_promos, key=key) == sorted(promos, key=key)
        assert sorted(other_outcomes, key=key) == sorted(outcomes, key=key)
    assert len(promos) > 10 and Counter(o["converted"] for o in outcomes)[True] > 0
    # exactly one outcome per promotion, and each is the one-by-one answer
    assert Counter(map(key, outcomes)) == Counter(map(key, promos))
    decided = {o["promotion_id"]: o["promoted_at"] for o in outcomes}
    want = expected_outcomes([{**r, "decided_at": decided[key(r)]} for r in promos], events)
    answered = {
        key(o): (o["converted"], o["revenue_items"]) for o in outcomes if o["closed_by"] != "capacity"
    }
    assert answered == want  # no window closed early in this stream


def test_a_late_order_from_before_the_promotion_converts_nothing() -> None:
    p = pipe()
    (promo,), _ = run(p, add("c1", T0, "a", 10.0), msg("view", "v1", T0 + 4000, item_id="x"))
    _, outcomes = run(p, order("o0", T0 + 3000, [("a", 1, 10.0)]))  # placed before the cart came due
    assert outcomes == []
    _, (out,) = run(p, order("o1", T0 + 5000, [("a", 1, 10.0)]))
    assert out["promotion_id"] == promo["promotion_id"] and out["order_event_id"] == "o1"
