"""``shopstream evaluate-promotions``: the promotion policy replayed offline on real event logs.

In: a data set of contract events (Taobao, REES46, Instacart, ...) in time order and optionally
an exported model. Out: a Markdown report (and JSON) comparing, on the same events, the policy
with the model (propensity decides reminder vs discount) and the rule-only policy (no model).

The events run through the worker's own ``Pipeline`` (state fold, baseline, model, policy, cart
timers) with dict tables and an event-time clock, so the figures describe the service's code.
Holdout is off here (every user is evaluated); the other policy settings apply as configured.

Ground truth comes from the log itself, where no promotion was ever sent:
- a cart instance is the cart from one change (anchor event) to the next change or order; it is
  *abandoned* when it stayed idle for ``cart_abandon_after_s`` and no order followed within
  ``window`` after it became idle;
- a triggered cart is *correct* when the user did not order within ``window`` after the trigger
  (precision), and recall is the share of abandoned carts that were triggered;
- a discount to a user who ordered within the window anyway is *spend on buyers*; the model's
  value is the spend it avoids there while keeping discounts for users who did not buy.
Only cases whose window ends inside the log count (the rest is censored and reported).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from streams.metrics import Metrics
from streams.pipeline import Message, local_pipeline
from streams.records import event_adapter
from streams.settings import Settings
from streams.state import UserState, user_partition

BATCH = 256


@dataclass
class CartInstance:
    user: str
    anchor: str
    since: float
    ended: float | None = None  # next cart change or order (None: still open at the end)


@dataclass
class Truth:
    orders: dict[str, list[float]] = field(default_factory=dict)  # user -> order times
    carts: list[CartInstance] = field(default_factory=list)
    end: float = 0.0
    users: int = 0
    event_time: dict[str, float] = field(default_factory=dict)  # event id -> unix s

    def trigger_time(self, promo: dict[str, Any]) -> float:
        """When a promotion was decided, in event time: cart timers fire at anchor + idle time."""
        t = self.event_time.get(promo["trigger_event_id"], 0.0)
        return t + float(promo["scores"]["idle_s"]) if promo["kind"] == "cart_abandonment" else t

    def ordered_within(self, user: str, start: float, window: float) -> bool:
        times = self.orders.get(user, [])
        i = bisect.bisect_left(times, start)
        return i < len(times) and times[i] <= start + window


def ground_truth(events: Iterable[dict[str, Any]]) -> Truth:
    """Order times and cart instances per user, folded with the worker's own state logic."""
    truth = Truth()
    states: dict[str, UserState] = {}
    open_cart: dict[str, CartInstance] = {}
    for raw in events:
        ev = event_adapter.validate_json(orjson.dumps(raw))
        t = ev.event_time.timestamp()
        truth.end = max(truth.end, t)
        truth.event_time[ev.event_id] = t
        state = states.setdefault(ev.user_id, UserState())
        before = state.promo.get("cart")
        state.apply(ev, 0, 1)
        after = state.promo.get("cart")
        if ev.type == "order":
            truth.orders.setdefault(ev.user_id, []).append(t)
        if before != after:
            prev = open_cart.pop(ev.user_id, None)
            if prev is not None:
                prev.ended = t
            if after:
                inst = CartInstance(ev.user_id, after[1], after[0])
                truth.carts.append(inst)
                open_cart[ev.user_id] = inst
        elif ev.type == "order" and ev.user_id in open_cart:
            open_cart[ev.user_id].ended = t  # an order that left items in the cart still ends it
    truth.users = len(states)
    return truth


def replay_policy(
    events: list[dict[str, Any]], settings: Settings, model_dir: Path | None, partitions: int
) -> tuple[list[dict[str, Any]], Counter[str], int]:
    """Run the pipeline over the events; returns the promotion records, suppressions and the
    number of events the model scored."""
    settings = settings.model_copy(update={"model_dir": model_dir})
    pipeline = local_pipeline(settings, settings.discount_budget_per_day / partitions, clock=lambda: 0.0)
    timers, metrics = pipeline.timers, pipeline.metrics  # the clock: timers follow event time only
    promos: list[dict[str, Any]] = []
    all_parts = set(range(partitions))
    buffer: list[Message] = []

    def flush(clock: float | None) -> None:
        """Process the buffered events, then let every cart timer due by ``clock`` fire."""
        outputs = pipeline.process(buffer).outputs if buffer else []
        buffer.clear()
        if clock is not None:
            for p in all_parts:  # the log is in time order: one clock for every partition
                timers.observe(p, clock, 0.0)
            outputs += pipeline.due_carts(all_parts, 0.0)
        promos.extend(orjson.loads(o.value) for o in outputs if o.topic == settings.topic_promotions)

    def next_due() -> float:
        return min((h[0].at for h in timers.heaps.values() if h), default=float("inf"))

    due = next_due()
    for e in events:
        t = datetime.fromisoformat(e["event_time"]).timestamp()
        if t >= due:  # a cart timer fires before this event is seen, as it would live
            flush(t)
            due = next_due()
        key = e["user_id"].encode()
        buffer.append(Message(user_partition(key, partitions), key, orjson.dumps(e), None))
        if len(buffer) >= BATCH or e["type"] == "cart":  # a cart change sets a timer: know it now
            flush(None)
            due = next_due()
    flush(max((datetime.fromisoformat(e["event_time"]).timestamp() for e in events[-1:]), default=None))
    suppressed = Counter(
        {labels["reason"]: int(v) for labels, v in _samples(metrics, "promotions_suppressed")}
    )
    scored = int(
        sum(v for labels, v in _samples(metrics, "recommendations") if labels.get("source") == "model")
    )
    return promos, suppressed, scored


def _samples(metrics: Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in metrics.registry.collect():
        if family.name == f"shopstream_{name}":
            out += [(s.labels, s.value) for s in family.samples if s.name.endswith("_total")]
    return out


def cart_report(
    promos: list[dict[str, Any]], truth: Truth, window: float, after: float, since: float
) -> dict[str, Any]:
    """Precision, recall and discount spend of the cart-abandonment triggers."""
    carts = [p for p in promos if p["kind"] == "cart_abandonment"]
    fired_at = {(p["user_id"], p["trigger_event_id"]): p for p in carts}
    tp = fp = censored = 0
    spend = spend_buyers = 0.0
    discounts = discounts_buyers = reminders_buyers = 0
    for p in carts:
        t = truth.trigger_time(p)
        if t < since:
            continue
        if t + window > truth.end:
            censored += 1
            continue
        bought = truth.ordered_within(p["user_id"], t, window)
        tp += not bought
        fp += bought
        value = p["scores"].get("cart_value", 0.0) * p["offer"]["value"] / 100
        if p["offer"]["kind"] == "percent_off":
            discounts += 1
            spend += value
            if bought:
                discounts_buyers += 1
                spend_buyers += value
        elif bought:
            reminders_buyers += 1
    abandoned = hit = 0
    for c in truth.carts:
        idle_at = c.since + after
        if idle_at < since or idle_at + window > truth.end:
            continue
        if c.ended is not None and c.ended < idle_at:
            continue  # changed or ordered before it became idle: never abandoned
        if truth.ordered_within(c.user, c.since, after + window):
            continue
        abandoned += 1
        hit += (c.user, c.anchor) in fired_at
    return {
        "triggered": tp + fp,
        "censored": censored,
        "precision": tp / (tp + fp) if tp + fp else None,
        "abandoned_carts": abandoned,
        "recall": hit / abandoned if abandoned else None,
        "discounts": discounts,
        "discount_spend": round(spend, 2),
        "discounts_to_buyers": discounts_buyers,
        "discount_spend_on_buyers": round(spend_buyers, 2),
        "reminders_to_buyers": reminders_buyers,
    }


def evaluate_promotions(
    events: list[dict[str, Any]],
    settings: Settings,
    model_dir: Path | None,
    *,
    window: float,
    since: float = 0.0,
    partitions: int = 8,
) -> dict[str, Any]:
    settings = settings.model_copy(update={"holdout_percent": 0.0})
    truth = ground_truth(events)
    out: dict[str, Any] = {
        "events": len(events),
        "users": truth.users,
        "window_s": window,
        "cart_abandon_after_s": settings.cart_abandon_after_s,
        "since": since,
        "policies": {},
    }
    runs = [("rule-only", None)] + ([("model", model_dir)] if model_dir else [])
    for name, folder in runs:
        started = time.perf_counter()
        promos, suppressed, scored = replay_policy(events, settings, folder, partitions)
        counted = [p for p in promos if truth.trigger_time(p) >= since]
        kinds = Counter(p["kind"] for p in counted)
        out["policies"][name] = {
            "promotions": len(counted),
            "per_kind": dict(kinds),
            "per_1k_users": {k: round(1000 * n / max(truth.users, 1), 2) for k, n in kinds.items()},
            "suppressed": dict(suppressed),
            "model_scored_events": scored,
            "cart_abandonment": cart_report(promos, truth, window, settings.cart_abandon_after_s, since),
            "seconds": round(time.perf_counter() - started, 1),
        }
    return out


def report(results: dict[str, Any], name: str) -> str:
    lines = [
        f"# Promotion policy, offline: {name}",
        "",
        f"{results['events']} events, {results['users']} users; cart idle threshold "
        f"{results['cart_abandon_after_s'] / 60:.0f} min, outcome window {results['window_s'] / 3600:g} h.",
        "",
        "| policy | promotions | per kind (per 1k users) | suppressed |",
        "|---|---|---|---|",
    ]
    for pol, r in results["policies"].items():
        kinds = ", ".join(f"{k} {n} ({r['per_1k_users'][k]:g})" for k, n in sorted(r["per_kind"].items()))
        sup = ", ".join(f"{k} {n}" for k, n in sorted(r["suppressed"].items())) or "-"
        lines.append(f"| {pol} | {r['promotions']} | {kinds or '-'} | {sup} |")
    lines += [
        "",
        "Cart abandonment (triggers whose outcome window ends inside the log):",
        "",
        "| policy | triggered | precision (not bought) | abandoned carts | recall | discounts | spend "
        "| discounts to buyers | spend on buyers | reminders to buyers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    for pol, r in results["policies"].items():
        c = r["cart_abandonment"]
        lines.append(
            f"| {pol} | {c['triggered']} | {pct(c['precision'])} | {c['abandoned_carts']} "
            f"| {pct(c['recall'])} "
            f"| {c['discounts']} | {c['discount_spend']:.2f} | {c['discounts_to_buyers']} "
            f"| {c['discount_spend_on_buyers']:.2f} | {c['reminders_to_buyers']} |"
        )
    pols = results["policies"]
    if "model" in pols:
        saved = (
            pols["rule-only"]["cart_abandonment"]["discount_spend_on_buyers"]
            - pols["model"]["cart_abandonment"]["discount_spend_on_buyers"]
        )
        lines += ["", f"Discount spend on users who bought anyway, avoided by the model: {saved:.2f}."]
    return "\n".join(lines) + "\n"
