"""Offline promotion evaluation: ground truth, the cart-abandonment report, the scored period and the
propensity ranking on known cases."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from streams.cli import main
from streams.policy_eval import (
    evaluate_promotions,
    ground_truth,
    lift,
    period_start,
    propensity_ranking,
    report,
)
from streams.settings import Settings
from streams.splits import split_bounds

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


def test_lift_of_the_top_decile_on_a_known_ranking() -> None:
    # 20 events, propensity 0.05 .. 1.0; the top two and two at the bottom bought
    rows = [(i / 20, i in (20, 19, 1, 2)) for i in range(1, 21)]
    r = lift(rows)
    assert (r["events"], r["purchases"], r["top_events"], r["top_purchases"]) == (20, 4, 2, 2)
    assert r["rate"] == 0.2 and r["top_rate"] == 1.0 and r["lift"] == pytest.approx(5.0)
    assert r["cutoff"] == 0.95
    # ties at the cut count at their expected share: 1 of 2 tied events bought, 1 place in the top
    tied = lift([(0.9, True), (0.9, False), *[(0.1, False)] * 8])
    assert tied["top_events"] == 1 and tied["top_purchases"] == 0.5 and tied["lift"] == pytest.approx(5.0)
    flat = lift([(0.5, i % 4 == 0) for i in range(40)])  # a constant score ranks nothing: lift 1
    assert flat["lift"] == pytest.approx(1.0)
    assert lift([])["lift"] is None and lift([(0.3, False)] * 5)["lift"] is None  # no purchase: none


def test_the_ranking_labels_scored_events_by_later_orders_and_leaves_out_censored_ones() -> None:
    events = sorted(
        [
            ev("view", "u1", "e0", 0, item_id="x"),  # before the period
            ev("view", "u1", "e1", 120, item_id="x"),  # u1 orders 2 h later: bought
            order("u1", "e2", 240),  # its own order is not "after": not bought
            ev("view", "u2", "e3", 130, item_id="x"),  # u2 orders 7 h later: not within 6 h
            order("u2", "e4", 130 + 7 * 60),
            ev("view", "u3", "e5", 900, item_id="x"),  # 6 h after 15:00 is past the log's end
            ev("view", "u4", "e6", 16 * 60, item_id="x"),
        ],
        key=lambda e: e["event_time"],
    )
    pos = {e["event_id"]: i for i, e in enumerate(events)}
    truth = ground_truth(events)
    scored = [(pos["e0"], 0.9), (pos["e1"], 0.8), (pos["e2"], 0.7), (pos["e3"], 0.1), (pos["e5"], 0.5)]
    r = propensity_ranking(events, scored, truth, 6 * 3600, since=T0.timestamp() + 60 * 60)
    assert (r["events"], r["purchases"], r["censored"]) == (3, 1, 1)
    assert r["top_events"] == 1 and r["top_rate"] == 1.0 and r["lift"] == pytest.approx(3.0)


def test_the_test_period_comes_from_the_manifest_else_the_data_set(tmp_path: Path) -> None:
    truth = ground_truth(EVENTS)
    assert len(truth.token_times) == 8  # the test period starts at the 7th token (int(0.85 * 8) = 6)
    start = sorted(truth.token_times)[6]
    two_lines = ev("order", "u", "o", 0, order_id="o", lines=[{"item_id": i, "quantity": 1} for i in "ab"])
    assert ground_truth([two_lines]).token_times == [T0.timestamp()] * 2  # a token per line, as training
    assert period_start(truth, "synthetic", None) == (start, "the test period of synthetic (streams.splits)")
    model = tmp_path / "model"
    model.mkdir()
    manifest = {"model_version": "m1", "config": {"data": "synthetic"}, "split": {"test_start": 123.0}}
    (model / "manifest.json").write_text(json.dumps(manifest))
    since, source = period_start(truth, "synthetic", model)
    assert since == 123.0 and "model m1" in source and "manifest" in source
    since, source = period_start(truth, "other-log", model)  # trained on another log: not its split
    assert since == split_bounds("other-log", truth.token_times)[1] and "trained on synthetic" in source
    (model / "manifest.json").write_text(json.dumps({"model_version": "old"}))  # no split: the data set's
    assert period_start(truth, "synthetic", model)[0] == start


def test_only_the_period_is_counted_and_the_report_says_which(tmp_path: Path) -> None:
    events = sorted(
        [
            order("buyer", "o1", 0),
            cart("buyer", "b1", 1),  # idle at 61 min, an order a minute before: suppressed
            ev("view", "other", "v1", 120, item_id="x"),  # the timer fires when the clock passes it
            cart("abandoner", "a1", 600),  # idle at 11 h: a trigger inside the period
            ev("view", "ticker", "t1", 16 * 60, item_id="x"),
        ],
        key=lambda e: e["event_time"],
    )
    settings = Settings(quiet_hours="", cart_abandon_after_s=3600.0)
    whole = evaluate_promotions(events, settings, None, window=3600)["policies"]["rule-only"]
    assert whole["suppressed"] == {"order": 1} and whole["per_kind"] == {"cart_abandonment": 1}
    since = T0.timestamp() + 5 * 3600
    results = evaluate_promotions(events, settings, None, window=3600, since=since)
    late = results["policies"]["rule-only"]
    assert late["suppressed"] == {} and late["per_kind"] == {"cart_abandonment": 1}
    assert results["period"]["warm_up_events"] == 3
    text = report(results, "synthetic")
    assert "Scored period: from 2026-03-02T14:00:00+00:00 (given (--since))" in text
    assert "the 3 before the period only warm up the state" in text


def test_the_command_scores_the_test_period_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    demo_model = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "model"
    assert main(["evaluate-promotions", "rees46-demo", "--limit", "400", "--model", str(demo_model)]) == 0
    text = capsys.readouterr().out
    assert "(the test period of rees46-demo (streams.splits))" in text  # the demo manifest has no split
    assert "Propensity ranking" in text
    assert main(["evaluate-promotions", "rees46-demo", "--limit", "400", "--since", "all"]) == 0
    text = capsys.readouterr().out
    assert "(the whole log)" in text and "the 0 before the period" in text
    assert main(["evaluate-promotions", "rees46-demo", "--since", "last week"]) == 1


def test_attributed_conversions_count_orders_in_the_window_and_censor_open_windows() -> None:
    settings = Settings(quiet_hours="", cart_abandon_after_s=3600.0)
    # triggers at 60 (abandoner, late) and 90 min (changer); late orders at 120 min; the log ends at 16 h
    two_hours = evaluate_promotions(EVENTS, settings, None, window=2 * 3600)["policies"]["rule-only"]
    assert two_hours["attributed"]["cart_abandonment"] == {
        "promotions": 3,
        "converted": 1,
        "unconverted": 2,
        "censored": 0,
        "capacity": 0,
        "revenue_order": 0.0,  # the orders carry no prices
        "discount_cost": 0.0,
        "conversion": 1 / 3,
    }
    day = evaluate_promotions(EVENTS, settings, None, window=24 * 3600)
    a = day["policies"]["rule-only"]["attributed"]["cart_abandonment"]
    # every window runs past the end of the log: censored, the early conversion too (no 100 %)
    assert (a["converted"], a["unconverted"], a["censored"], a["conversion"]) == (0, 0, 3, None)
    assert "| rule-only | cart_abandonment | 3 | 0 | 0 | 3 | - |" in report(day, "synthetic")


def test_with_the_bandit_the_report_estimates_every_offer_from_its_decisions() -> None:
    settings = Settings(quiet_hours="", cart_abandon_after_s=3600.0, offer_policy="bandit")
    two_hours = evaluate_promotions(EVENTS, settings, None, window=2 * 3600)["policies"]["rule-only"]
    promos = [p for p in two_hours["off_policy"]["estimates"].values()]
    (cart_kind,) = promos
    # three cart triggers, all with their window inside the log: three decisions of three users
    assert (cart_kind["decisions"], cart_kind["users"]) == (3, 3)
    assert cart_kind["logged"]["conversion"]["value"] == pytest.approx(1 / 3)
    targets = cart_kind["targets"]
    assert set(targets) == {"reminder", "percent_off:5", "percent_off:10", "percent_off:15", "rules"}
    assert sum(targets[n]["matched"] for n in targets if n != "rules") == 3  # each decision one offer
    day = evaluate_promotions(EVENTS, settings, None, window=24 * 3600)
    off = day["policies"]["rule-only"]["off_policy"]
    assert off["estimates"] == {} and off["left_out"] == {"no outcome yet": 3}  # censored
    text = report(day, "synthetic")
    assert "offers chosen by the bandit" in text and "no outcome yet 3" in text
    rules = evaluate_promotions(
        EVENTS, Settings(quiet_hours="", cart_abandon_after_s=3600.0), None, window=7200
    )
    assert "off_policy" not in rules["policies"]["rule-only"]
