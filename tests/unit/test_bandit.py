"""Offers chosen by the bandit (``streams.bandit``): a simulation with a known answer (tests only,
clearly simulated), then the bandit inside the policy and pipeline.

The simulator: two segments of users answer a promotion with an order worth ``price`` less the
discount. Loyal users buy with probability 0.6 whatever the offer (the best offer is a reminder:
every discount only costs); price-sensitive users buy with probability 0.1 + 0.025 per discount
percent (the best offer is the largest discount, 15 %). Expected net revenue per offer:
loyal 60 / 57 / 54 / 51, sensitive 10 / 21.4 / 31.5 / 40.4 (reminder, 5, 10, 15 %).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from streams.bandit import Bandit, arms, context
from streams.pipeline import Message, local_pipeline
from streams.settings import Settings
from tests.unit.test_delivery_semantics import msg

PRICE = 100.0


def loyal(d: float) -> float:
    return 0.6


def sensitive(d: float) -> float:
    return 0.1 + 0.025 * d


SEGMENTS = {"loyal": loyal, "sensitive": sensitive}
BEST = {"loyal": 0.0, "sensitive": 15.0}
DECISIONS = 3000  # per segment: the stated budget within which the best offer dominates


def simulate(seed: int) -> dict[str, list[float]]:
    """``DECISIONS`` decisions per segment, interleaved; the offers chosen, per segment."""
    bandit = Bandit({}, arms(15.0), exploration=0.1)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    for i in range(DECISIONS):
        for seg, buys in SEGMENTS.items():
            choice = bandit.choose(0, seg, f"{seed}-{seg}-{i}")
            converted = rng.random() < buys(choice.percent)
            bandit.learn(0, seg, choice.percent, PRICE * (1 - choice.percent / 100) if converted else 0.0)
            chosen[seg].append(choice.percent)
    return chosen


def test_the_chosen_offer_converges_to_the_best_offer_of_each_segment() -> None:
    """Within ``DECISIONS`` per segment, over the last 500: the best offer is the one chosen most,
    and the offers chosen earn at least 95 % of the best offer's expected net revenue (exploration
    0.1 over four offers caps it at 98.8 % for loyal users, 96.4 % for price-sensitive ones)."""
    for seed in range(3):
        chosen = simulate(seed)
        for seg, offers in chosen.items():
            last = offers[-500:]
            counts = {a: last.count(a) for a in arms(15.0)}
            value = {a: SEGMENTS[seg](a) * PRICE * (1 - a / 100) for a in arms(15.0)}
            earned = sum(value[a] for a in last) / len(last)
            assert max(counts, key=lambda a: counts[a]) == BEST[seg], (seed, seg, counts)
            assert earned >= 0.95 * value[BEST[seg]], (seed, seg, earned, counts)


def test_every_offer_keeps_its_exploration_share_and_probabilities_sum_to_one() -> None:
    bandit = Bandit({}, arms(15.0), exploration=0.2)
    for _ in range(200):  # one offer is clearly best
        for percent in arms(15.0):
            bandit.learn(3, "ctx", percent, 80.0 if percent == 15.0 else 0.0)
    p = bandit.probabilities(3, "ctx", "seed")
    assert abs(p.sum() - 1.0) < 1e-9 and p.min() >= 0.2 / 4 - 1e-12
    assert p[arms(15.0).index(15.0)] > 0.8
    # the same seed gives the same choice; another partition has learned nothing
    assert bandit.choose(3, "ctx", "pid-1") == bandit.choose(3, "ctx", "pid-1")
    assert bandit.stats(4, "ctx").sum() == 0


def test_contexts_bucket_propensity_and_price_sensitivity() -> None:
    assert context("cart_abandonment", None, 0.5, 0.1) == "cart_abandonment|p=none|s=low"
    assert context("cart_abandonment", 0.7, 0.5, 0.3) == "cart_abandonment|p=high|s=mid"
    assert context("price_sensitivity", 0.2, 0.5, 0.9) == "price_sensitivity|p=low|s=high"


T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC).timestamp()


def cart_then_order(user: str, price: float = 20.0) -> tuple[list[Message], Message]:
    add = msg("cart", f"{user}-c", T0, user, action="add", item_id="a", quantity=1, unit_price=price)
    view = msg("view", f"{user}-v", T0 + 4000, user, item_id="x")
    line = {"item_id": "a", "quantity": 1, "unit_price": price}
    order = msg("order", f"{user}-o", T0 + 5000, user, order_id=f"{user}-o", lines=[line], total=price)
    return [add, view], order


def test_the_pipeline_logs_the_offer_probability_and_teaches_the_bandit_from_treated_outcomes() -> None:
    def pipe(holdout: float) -> Any:
        s = Settings(offer_policy="bandit", holdout_percent=holdout, quiet_hours="", frequency_cap=1000)
        return local_pipeline(s, budget_per_partition=1e9, clock=lambda: T0)

    p = pipe(0.0)
    first, order = cart_then_order("u1")
    outs = p.process(first).outputs
    (promo,) = [orjson.loads(o.value) for o in outs if o.topic == p.s.topic_promotions]
    assert promo["kind"] == "cart_abandonment" and 0 < promo["scores"]["offer_probability"] <= 1
    percent = promo["offer"]["value"] if promo["offer"]["kind"] == "percent_off" else 0.0
    assert promo["scores"]["offer_arm"] == percent  # the offer chosen, for off-policy evaluation
    p.process([order])
    ctx = context("cart_abandonment", None, 0.5, 0.0)
    stats = p.policy.bandit.stats(order.partition, ctx)
    arm = arms(p.s.max_discount_percent).index(percent)
    reward = 20.0 - 20.0 * percent / 100
    assert stats[arm].tolist() == [1.0, reward, reward * reward] and stats.sum(axis=0)[0] == 1.0
    # the same input decides the same offer on a fresh worker
    again = pipe(0.0)
    outs = again.process(first).outputs
    (same,) = [orjson.loads(o.value) for o in outs if o.topic == again.s.topic_promotions]
    assert same["offer"] == promo["offer"] and same["scores"] == promo["scores"]
    # a holdout user's outcome teaches nothing
    held = pipe(100.0)
    first, order = cart_then_order("u2")
    held.process(first)
    held.process([order])
    assert held.policy.bandit.stats(order.partition, ctx).sum() == 0
