"""Off-policy estimates (``streams.offpolicy``): a case worked by hand, then simulations with a
known answer (tests only, clearly simulated).

The simulator is that of ``tests/unit/test_bandit.py``: loyal users buy with probability 0.6
whatever the offer, price-sensitive users with 0.1 + 0.025 per discount percent, an order is worth
``PRICE`` less the discount. The expected net revenue of always choosing offer ``a`` is therefore
known per segment (loyal 60 / 57 / 54 / 51, sensitive 10 / 21.4 / 31.5 / 40.4 for a reminder, 5, 10
and 15 %); the estimates from decisions logged by another policy must find it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from streams.bandit import Bandit, arms
from streams.offpolicy import Decision, estimate, evaluate, join, render, rules_arm
from tests.unit.test_bandit import PRICE, SEGMENTS

OFFERS = arms(15.0)


def value(seg: str, a: float) -> float:
    return SEGMENTS[seg](a) * PRICE * (1 - a / 100)


def test_a_case_worked_by_hand() -> None:
    rows = [
        Decision("u1", "cart_abandonment", 0.0, 0.5, 10.0, True, {}),
        Decision("u1", "cart_abandonment", 10.0, 0.25, 0.0, False, {}),
        Decision("u2", "cart_abandonment", 10.0, 0.5, 18.0, True, {}),
        Decision("u3", "cart_abandonment", 0.0, 0.8, 0.0, False, {}),
    ]
    reminder = estimate(rows, np.array([d.arm == 0.0 for d in rows]))
    # weights 2, 0, 0, 1.25: IPS (2 * 10) / 4, SNIPS 20 / 3.25, conversion 2 / 3.25
    assert reminder["matched"] == 2
    assert reminder["ips_net_revenue"]["value"] == pytest.approx(5.0)
    assert reminder["snips_net_revenue"]["value"] == pytest.approx(20 / 3.25)
    assert reminder["snips_conversion"]["value"] == pytest.approx(2 / 3.25)
    ten = estimate(rows, np.array([d.arm == 10.0 for d in rows]))
    # weights 0, 4, 2, 0: IPS (4 * 0 + 2 * 18) / 4, SNIPS 36 / 6, conversion 2 / 6
    assert ten["ips_net_revenue"]["value"] == pytest.approx(9.0)
    assert ten["snips_net_revenue"]["value"] == pytest.approx(6.0)
    assert ten["snips_conversion"]["value"] == pytest.approx(1 / 3)
    # the logging policy: the plain means
    assert ten["net_revenue"]["value"] == pytest.approx(7.0) and ten["conversion"]["value"] == 0.5
    lo, hi = ten["ips_net_revenue"]["ci95"]
    assert lo <= 9.0 <= hi


def logged_by(policy: str, seed: int, decisions: int) -> list[Decision]:
    """``decisions`` per segment, logged by a uniform policy or by the bandit learning as it goes."""
    rng = np.random.default_rng(seed)
    bandit = Bandit({}, OFFERS, exploration=0.1)
    rows = []
    for i in range(decisions):
        for seg, buys in SEGMENTS.items():
            if policy == "uniform":
                a, p = float(rng.choice(OFFERS)), 1 / len(OFFERS)
            else:
                choice = bandit.choose(0, seg, f"{seed}-{seg}-{i}")
                a, p = choice.percent, choice.probability
            converted = bool(rng.random() < buys(a))
            r = PRICE * (1 - a / 100) if converted else 0.0
            if policy == "bandit":
                bandit.learn(0, seg, a, r)
            rows.append(Decision(f"{seg}-{i}", seg, a, p, r, converted, {}))
    return rows


def test_the_interval_of_a_fixed_offer_covers_its_known_value_about_95_times_in_100() -> None:
    covered = total = 0
    for seed in range(40):
        rows = [d for d in logged_by("uniform", 200 + seed, 300) if d.kind == "sensitive"]
        for a in (0.0, 15.0):
            lo, hi = estimate(rows, np.array([d.arm == a for d in rows]), seed)["snips_net_revenue"]["ci95"]
            covered += lo <= value("sensitive", a) <= hi
            total += 1
    assert 0.85 * total <= covered <= total, (covered, total)


def test_from_the_bandits_own_log_every_fixed_offer_is_found_and_the_best_ranks_first() -> None:
    """The bandit's log is adaptive (it mostly plays the best offer), yet every offer keeps its
    exploration share: each fixed offer's interval holds its known value in all but a few cases,
    and the estimated best offer of each segment is the true best."""
    covered = total = 0
    for seed in range(3):
        rep = evaluate(logged_by("bandit", seed, 3000), max_discount_percent=15.0, seed=seed)
        for seg, r in rep.items():
            est = {name: t["snips_net_revenue"] for name, t in r["targets"].items() if name != "rules"}
            for name, e in est.items():
                a = 0.0 if name == "reminder" else float(name.split(":")[1])
                covered += e["ci95"][0] <= value(seg, a) <= e["ci95"][1]
                total += 1
            best = max(est, key=lambda n: est[n]["value"])
            assert best == ("reminder" if seg == "loyal" else "percent_off:15"), (seed, seg, est)
    assert covered >= total - 3, (covered, total)


def promo(pid: str, **kw: Any) -> dict[str, Any]:
    base = {
        "promotion_id": pid,
        "user_id": "u",
        "kind": "cart_abandonment",
        "offer": {"kind": "percent_off", "value": 10.0},
        "holdout": False,
        "reason": "cart idle",
        "scores": {"offer_probability": 0.4, "offer_arm": 10.0},
    }
    return {**base, **kw}


def outcome(pid: str, converted: bool, closed_by: str = "window") -> dict[str, Any]:
    return {
        "promotion_id": pid,
        "converted": converted,
        "closed_by": "order" if converted else closed_by,
        "revenue_order": 50.0 if converted else 0.0,
        "discount_cost": 3.0 if converted else 0.0,
    }


def test_join_keeps_treated_bandit_decisions_with_an_outcome_once() -> None:
    promos = [
        promo("a"),
        promo("a"),  # re-sent: once
        promo("b", holdout=True),
        promo("c", scores={"price_sensitivity": 0.3}),  # rules chose it: no probability
        promo(
            "d",
            offer={"kind": "reminder"},
            reason="cart idle; discount budget spent",
            scores={"offer_probability": 0.3},
        ),  # chosen discount unknown
        promo(
            "e",
            offer={"kind": "reminder"},
            reason="cart idle; discount budget spent",
            scores={"offer_probability": 0.3, "offer_arm": 15.0},
        ),  # chosen 15, delivered a reminder
        promo("f"),  # no outcome yet
        promo("g"),  # closed for capacity
        promo("h", offer={"kind": "reminder"}, scores={"offer_probability": 0.5}),  # before offer_arm
    ]
    outs = [
        outcome("a", True),
        outcome("a", False),
        outcome("b", True),
        outcome("d", False),
        outcome("e", True),
        outcome("g", False, "capacity"),
        outcome("h", False),
    ]
    rows, skipped = join(promos, outs)
    assert [(d.arm, d.probability, d.reward, d.converted) for d in rows] == [
        (10.0, 0.4, 47.0, True),
        (15.0, 0.3, 47.0, True),
        (0.0, 0.5, 0.0, False),
    ]
    assert skipped == {
        "holdout": 1,
        "not chosen by the bandit": 1,
        "offer chosen unknown (budget spent)": 1,
        "no outcome yet": 2,
    }
    text = render(evaluate(rows, 15.0), skipped)
    assert "cart_abandonment: 3 decisions of 1 users" in text and "no outcome yet 2" in text


def test_the_rules_target_is_the_rule_based_offer_rounded_to_an_arm() -> None:
    likely = {"propensity": 0.8, "reminder_threshold": 0.5, "price_sensitivity": 0.9}
    assert rules_arm("cart_abandonment", likely, arms(20.0), 20.0) == 0.0
    # unlikely buyer, sensitivity 0.3: 5 + 15 * 0.3 = 9.5 -> round 10 (the rule), an arm
    assert (
        rules_arm(
            "cart_abandonment", {**likely, "propensity": 0.1, "price_sensitivity": 0.3}, arms(20.0), 20.0
        )
        == 10.0
    )
    # a rule discount between arms goes to the nearest: 5 + 15 * 0.2 = 8 -> 10
    assert rules_arm("price_sensitivity", {"price_sensitivity": 0.2}, arms(20.0), 20.0) == 10.0
    assert rules_arm("price_sensitivity", {"price_sensitivity": 0.0}, arms(20.0), 20.0) == 5.0
    assert rules_arm("price_sensitivity", {}, arms(0.0), 0.0) == 0.0
