"""Offline promotion evaluation: ground truth and the cart-abandonment report on known cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from streams.policy_eval import evaluate_promotions, ground_truth, report
from streams.settings import Settings

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def ev(etype: str, user: str, eid: str, minutes: float, **fields: Any) -> dict[str, Any]:
    t = (T0 + timedelta(minutes=minutes)).isoformat()
    return {"schema_version": 1, "type": etype, "event_id": eid, "user_id": user, "event_time": t, **fields}


def cart(user: str, eid: str, minutes: float, price: float = 50.0) -> dict[str, Any]:
    return ev("cart", user, eid, minutes, action="add", item_id="sku", quantity=1, unit_price=price)


def order(user: str, eid: str, minutes: float) -> dict[str, Any]:
    return ev("order", user, eid, minutes, order_id=eid, lines=[{"item_id": "sku", "quantity": 1}])


EVENTS = sorted(
    [
        cart("abandoner", "a1", 0),  # idle, never bought: a correct trigger
        cart("quick", "q1", 0),
        order("quick", "q2", 10),  # bought before the cart went idle: no trigger, not abandoned
        cart("late", "l1", 0),
        order("late", "l2", 120),  # idle at 60 min (trigger), bought at 120: a discount to a buyer
        cart("changer", "c1", 0),
        cart("changer", "c2", 30),  # the cart changed: the idle clock restarts from c2
        ev("view", "ticker", "t1", 16 * 60, item_id="x"),  # the log runs on for 16 hours
    ],
    key=lambda e: e["event_time"],
)


def test_ground_truth_folds_cart_instances_like_the_worker() -> None:
    truth = ground_truth(EVENTS)
    by_anchor = {c.anchor: c for c in truth.carts}
    assert set(by_anchor) == {"a1", "q1", "l1", "c1", "c2"}
    assert by_anchor["c1"].ended == by_anchor["c2"].since  # replaced by the change
    assert by_anchor["q1"].ended is not None and by_anchor["a1"].ended is None
    assert truth.orders == {"quick": [T0.timestamp() + 600], "late": [T0.timestamp() + 7200]}


def test_cart_report_counts_precision_recall_and_spend_on_buyers() -> None:
    settings = Settings(quiet_hours="", cart_abandon_after_s=3600.0, suppress_after_order_s=0.0)
    results = evaluate_promotions(EVENTS, settings, None, window=6 * 3600)
    rules = results["policies"]["rule-only"]
    assert rules["per_kind"] == {"cart_abandonment": 3}  # a1, l1, c2
    cart_stats = rules["cart_abandonment"]
    assert cart_stats["triggered"] == 3 and cart_stats["censored"] == 0
    assert cart_stats["precision"] == 2 / 3  # "late" bought within the window anyway
    assert cart_stats["abandoned_carts"] == 2 and cart_stats["recall"] == 1.0  # a1 and c2
    assert cart_stats["discounts"] == 3 and cart_stats["discounts_to_buyers"] == 1
    assert cart_stats["discount_spend_on_buyers"] > 0
    text = report(results, "synthetic")
    assert "| rule-only | 3 | 66.7% | 2 | 100.0% |" in text
