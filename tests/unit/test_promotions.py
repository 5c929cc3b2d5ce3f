"""The promotion policy, without Kafka: triggers, caps, quiet hours, holdout, budget, ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from streams.promotions import Budget, CartTimers, Decision, Policy, in_holdout, promotion_id
from streams.records import event_adapter
from streams.settings import Settings
from streams.state import UserState

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # noon UTC: outside the default quiet hours


def ev(etype: str, eid: str, at: datetime = T0, user: str = "u1", **fields: Any) -> Any:
    raw = {"schema_version": 1, "type": etype, "event_id": eid, "user_id": user, "event_time": at.isoformat()}
    return event_adapter.validate_json(orjson.dumps({**raw, **fields}))


def policy(**overrides: Any) -> tuple[Policy, dict[bytes, bytes]]:
    budget: dict[bytes, bytes] = {}
    s = Settings(**{"holdout_percent": 0.0, **overrides})
    return Policy(s, Budget(budget, s.discount_budget_per_day / s.partitions)), budget


def fold(state: UserState, *events: Any) -> None:
    for e in events:
        state.apply(e, 0, 50)


def records(decisions: list[Decision]) -> list[dict[str, Any]]:
    return [d.record for d in decisions if d.record is not None]


def test_idle_cart_triggers_once_with_a_deterministic_id() -> None:
    pol, _ = policy()
    state = UserState()
    add = ev("cart", "c1", action="add", item_id="sku", quantity=2, unit_price=20.0)
    fold(state, add)
    due = T0.timestamp() + pol.s.cart_abandon_after_s
    assert pol.on_cart_due(state, "u1", due - 1, 0, "m") is None  # not idle long enough
    first = pol.on_cart_due(state, "u1", due, 0, "m")
    assert first is not None and first.record is not None
    rec = first.record
    assert rec["kind"] == "cart_abandonment" and rec["trigger_event_id"] == "c1"
    assert rec["promotion_id"] == promotion_id("u1", "cart_abandonment", "c1")
    assert rec["offer"]["kind"] == "percent_off"  # no model: the rule-only policy offers a discount
    assert rec["scores"]["cart_value"] == 40.0 and rec["items"] == ["sku"]
    assert pol.on_cart_due(state, "u1", due + 10, 0, "m") is None  # the same cart never again


def test_no_cart_abandonment_after_an_order_or_a_cart_change() -> None:
    pol, _ = policy()
    state = UserState()
    fold(state, ev("cart", "c1", action="add", item_id="a", quantity=1))
    fold(
        state,
        ev(
            "order", "o1", at=T0 + timedelta(minutes=5), order_id="o", lines=[{"item_id": "a", "quantity": 1}]
        ),
    )
    assert pol.on_cart_due(state, "u1", T0.timestamp() + 10 * 3600, 0, "m") is None  # cart emptied
    partial = UserState()
    fold(partial, ev("cart", "c1", action="add", item_id="a", quantity=1))
    fold(partial, ev("cart", "c2", action="add", item_id="b", quantity=1, at=T0 + timedelta(minutes=1)))
    order = {"item_id": "a", "quantity": 1}
    fold(partial, ev("order", "o1", at=T0 + timedelta(minutes=2), order_id="o", lines=[order]))
    decision = pol.on_cart_due(partial, "u1", T0.timestamp() + 3 * 3600, 0, "m")
    assert decision is None  # b is still in the cart, but the user just ordered
    moved = UserState()
    fold(moved, ev("cart", "c1", action="add", item_id="a", quantity=1))
    fold(moved, ev("cart", "c2", action="add", item_id="b", quantity=1, at=T0 + timedelta(minutes=50)))
    assert pol.on_cart_due(moved, "u1", T0.timestamp() + 3600, 0, "m") is None  # changed 10 min ago


def test_frequency_cap_holdout_and_suppression_after_order() -> None:
    pol, _ = policy(frequency_cap=2)
    state = UserState()
    bad = [ev("review", f"r{i}", item_id=f"i{i}", rating=1, at=T0 + timedelta(minutes=i)) for i in range(3)]
    out = []
    for e in bad:
        fold(state, e)
        out += pol.on_event(state, e, 0, None, [], "m")
    assert [d.record is not None for d in out] == [True, True, False]
    assert out[2].suppressed == "frequency_cap"
    # holdout: the same decision, logged with holdout=true
    hold, _ = policy(holdout_percent=100.0)
    s2 = UserState()
    fold(s2, bad[0])
    (rec,) = records(hold.on_event(s2, bad[0], 0, None, [], "m"))
    assert rec["holdout"] is True
    assert in_holdout("anyone", 100.0) and not in_holdout("anyone", 0.0)
    # marketing promotions are suppressed after an order; review recovery is not
    s3 = UserState()
    fold(s3, ev("order", "o1", order_id="o", lines=[{"item_id": "x", "quantity": 1}]))
    views = [ev("view", f"v{i}", item_id="y", at=T0 + timedelta(minutes=i + 1)) for i in range(3)]
    fold(s3, *views)
    decisions = pol.on_event(s3, views[-1], 0, None, [], "m")
    assert [d.suppressed for d in decisions] == ["order"]


def test_browse_abandonment_on_the_nth_view_without_cart_add() -> None:
    pol, _ = policy(browse_views=3)
    state = UserState()
    fired = []
    for i in range(5):
        e = ev("view", f"v{i}", item_id="shoe", at=T0 + timedelta(minutes=i))
        fold(state, e)
        fired += records(pol.on_event(state, e, 0, None, ["shoe", "sock"], "m"))
    assert [r["trigger_event_id"] for r in fired] == ["v2"]  # exactly at the third view
    assert fired[0]["items"] == ["shoe", "sock"]
    carted = UserState()
    fold(carted, ev("cart", "c", action="add", item_id="shoe", quantity=1))
    for i in range(3):
        e = ev("view", f"w{i}", item_id="shoe", at=T0 + timedelta(minutes=i + 1))
        fold(carted, e)
        assert records(pol.on_event(carted, e, 0, None, [], "m")) == []


def test_review_recovery_on_low_rating_or_negative_text() -> None:
    pol, _ = policy()
    for rating, text, expected in (
        (1, "", True),
        (3, "arrived broken, want a refund", True),
        (3, "ok", False),
    ):
        state = UserState()
        e = ev("review", "r", item_id="i", rating=rating, text=text)
        fold(state, e)
        recs = records(pol.on_event(state, e, 0, None, [], "m"))
        assert bool(recs) is expected, (rating, text)
        if recs:
            assert recs[0]["offer"]["kind"] == "service_recovery"


def test_high_intent_fires_when_propensity_crosses_the_threshold() -> None:
    pol, _ = policy(high_intent_propensity=0.7)
    state = UserState()
    kinds = []
    for i, p in enumerate((0.2, 0.8, 0.9, 0.3, 0.75)):
        e = ev("view", f"v{i}", item_id=f"i{i}", at=T0 + timedelta(hours=i))
        fold(state, e)
        kinds += [r["trigger_event_id"] for r in records(pol.on_event(state, e, 0, p, ["a"], "m"))]
    assert kinds == ["v1", "v4"]


def test_likely_buyers_get_a_reminder_and_the_budget_caps_discounts() -> None:
    pol, budget = policy(discount_budget_per_day=8 * 10.0, max_discount_percent=10.0)  # 10 per partition
    likely = UserState(promo={"p": 0.9})
    fold(likely, ev("cart", "c1", action="add", item_id="a", quantity=1, unit_price=100.0))
    due = T0.timestamp() + 7200
    d = pol.on_cart_due(likely, "u1", due, 0, "m")
    assert d is not None and d.record is not None and d.record["offer"]["kind"] == "reminder"
    offers = []
    for user in ("u2", "u3"):
        s = UserState(promo={"p": 0.1})
        fold(s, ev("cart", "c", user=user, action="add", item_id="a", quantity=1, unit_price=60.0))
        d = pol.on_cart_due(s, user, due, 0, "m")
        assert d is not None and d.record is not None
        offers.append(d.record["offer"])
    assert offers[0]["kind"] == "percent_off" and offers[0]["value"] == 5.0  # 3.00 of the 10.00 budget
    assert offers[1]["kind"] == "percent_off"  # 6.00 spent
    s = UserState(promo={"p": 0.1})
    fold(s, ev("cart", "c", user="u4", action="add", item_id="a", quantity=1, unit_price=200.0))
    d = pol.on_cart_due(s, "u4", due, 0, "m")
    assert (
        d is not None and d.record is not None and d.record["offer"]["kind"] == "reminder"
    )  # 10.00 > 4 left
    assert list(budget.values()) == [b"6.0"]


@pytest.mark.parametrize(
    ("local_time", "offset_h", "quiet"),
    [("23:30", 0, True), ("07:59", 0, True), ("08:00", 0, False), ("12:00", 2, False), ("23:00", 2, True)],
)
def test_quiet_hours_follow_the_users_offset(local_time: str, offset_h: int, quiet: bool) -> None:
    pol, _ = policy(quiet_hours="22-8")
    h, m = map(int, local_time.split(":"))
    from datetime import timezone

    at = datetime(2026, 3, 2, h, m, tzinfo=timezone(timedelta(hours=offset_h)))
    state = UserState()
    e = ev("review", "r", at=at, item_id="i", rating=1)
    fold(state, e)
    (d,) = pol.on_event(state, e, 0, None, [], "m")
    assert (d.suppressed == "quiet_hours") is quiet


def test_cart_due_in_quiet_hours_waits_for_the_morning() -> None:
    pol, _ = policy(quiet_hours="22-8")
    state = UserState()
    fold(state, ev("cart", "c1", action="add", item_id="a", quantity=1, at=T0.replace(hour=21, minute=30)))
    night = T0.replace(hour=23).timestamp()
    d = pol.on_cart_due(state, "u1", night, 0, "m")
    assert d is not None and d.record is None and d.retry_at == T0.replace(day=3, hour=8).timestamp()
    assert d.retry_at is not None
    later = pol.on_cart_due(state, "u1", d.retry_at, 0, "m")
    assert later is not None and later.record is not None


def test_cart_timers_follow_event_time_then_wall_time() -> None:
    timers = CartTimers(after_s=3600)
    state = UserState()
    fold(state, ev("cart", "c1", action="add", item_id="a", quantity=1))
    timers.observe(3, T0.timestamp(), wall=1000.0)
    timers.track(3, b"u1", state)
    assert timers.due(3, timers.now(3, 1000.0) or 0) == []
    timers.observe(3, T0.timestamp() + 1800, wall=1001.0)  # a replay: event time runs ahead
    assert timers.due(3, timers.now(3, 1001.0) or 0) == []
    now = timers.now(3, 1001.0 + 1800)  # then half an hour of silence on the wall clock
    assert now == T0.timestamp() + 3600 and timers.due(3, now) == [b"u1"]
    assert timers.pending() == 0
