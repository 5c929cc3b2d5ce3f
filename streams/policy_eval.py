"""``shopstream evaluate-promotions``: the promotion policy replayed offline on real event logs.

In: a data set of contract events (Taobao, REES46, Instacart, ...) in time order and optionally
an exported model. Out: a Markdown report (and JSON) comparing, on the same events, the policy
with the model (propensity decides reminder vs discount) and the rule-only policy (no model).

The events run through the worker's own ``Pipeline`` (state fold, baseline, model, policy, cart
timers) with dict tables and an event-time clock, so the figures describe the service's code.
Holdout is off here (every user is evaluated); the other policy settings apply as configured.

Scored period: the whole log runs through the pipeline (the state warms up on the events before
the period), but only triggers, suppressions and model-scored events from ``since`` on are counted.
The command line defaults to the test period (the model manifest's ``split``, else the data set's,
``streams.splits``): counting from the start of the log would score the model on the events it
learned from.

Propensity ranking (model policy): the events of the period the model scored, ranked by the
propensity it returned; the purchase rate within ``horizon`` (an order by the user later in the
log) of the top decile against all of them. Events whose horizon runs past the end of the log are
censored (left out and counted).

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
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from streams.metrics import Metrics
from streams.offpolicy import evaluate, join
from streams.offpolicy import render as render_off_policy
from streams.pipeline import Message, local_pipeline
from streams.records import event_adapter
from streams.scoring import read_manifest
from streams.settings import Settings
from streams.splits import split_bounds
from streams.state import UserState, event_tokens, user_partition

BATCH = 256
HORIZON_S = 6 * 3600.0  # purchase horizon of the propensity ranking (the Taobao model's label)
TOP = 0.1  # the top decile


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
    order_pos: dict[str, list[int]] = field(default_factory=dict)  # user -> log positions of orders
    token_times: list[float] = field(default_factory=list)  # every token's time (streams.splits)

    def trigger_time(self, promo: dict[str, Any]) -> float:
        """When a promotion was decided, in event time: cart timers fire at anchor + idle time."""
        t = self.event_time.get(promo["trigger_event_id"], 0.0)
        return t + float(promo["scores"]["idle_s"]) if promo["kind"] == "cart_abandonment" else t

    def ordered_within(self, user: str, start: float, window: float) -> bool:
        times = self.orders.get(user, [])
        i = bisect.bisect_left(times, start)
        return i < len(times) and times[i] <= start + window

    def ordered_after(self, user: str, pos: int, t: float, horizon: float) -> bool:
        """An order by ``user`` after the event at log position ``pos`` (time ``t``), within
        ``horizon``: the propensity's label (the event's own order is not "after")."""
        times, positions = self.orders.get(user, []), self.order_pos.get(user, [])
        i = bisect.bisect_left(times, t)
        while i < len(times) and times[i] <= t + horizon:
            if positions[i] > pos:
                return True
            i += 1
        return False


def ground_truth(events: Iterable[dict[str, Any]]) -> Truth:
    """Order times and cart instances per user, folded with the worker's own state logic."""
    truth = Truth()
    states: dict[str, UserState] = {}
    open_cart: dict[str, CartInstance] = {}
    for pos, raw in enumerate(events):
        ev = event_adapter.validate_json(orjson.dumps(raw))
        t = ev.event_time.timestamp()
        truth.end = max(truth.end, t)
        truth.event_time[ev.event_id] = t
        truth.token_times += [float(tok[2]) for tok in event_tokens(ev)]
        state = states.setdefault(ev.user_id, UserState())
        before = state.promo.get("cart")
        state.apply(ev, 0, 1)
        after = state.promo.get("cart")
        if ev.type == "order":
            truth.orders.setdefault(ev.user_id, []).append(t)
            truth.order_pos.setdefault(ev.user_id, []).append(pos)
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


@dataclass
class Replay:
    """What one policy did over the log; counts are of the scored period only."""

    promos: list[dict[str, Any]]  # every promotion record (the caller filters by trigger time)
    suppressed: Counter[str]
    scored: int  # events the model scored
    propensity: list[tuple[int, float]]  # (log position, propensity) of the events the model scored
    outcomes: list[dict[str, Any]] = field(default_factory=list)  # attribution outcome records


def replay_policy(
    events: list[dict[str, Any]],
    settings: Settings,
    model_dir: Path | None,
    partitions: int,
    since: float = 0.0,
) -> Replay:
    """Run the pipeline over all the events; suppressions and scored events count from the first
    event at or after ``since`` on (the counters are read when the replay gets there)."""
    settings = settings.model_copy(update={"model_dir": model_dir})
    pipeline = local_pipeline(settings, settings.discount_budget_per_day / partitions, clock=lambda: 0.0)
    timers, metrics = pipeline.timers, pipeline.metrics  # the clock: timers follow event time only
    promos: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    propensity: list[tuple[int, float]] = []
    all_parts = set(range(partitions))
    buffer: list[Message] = []
    positions: list[int] = []  # log position of each buffered message

    def flush(clock: float | None) -> None:
        """Process the buffered events, then let every cart timer due by ``clock`` fire."""
        result = pipeline.process(buffer) if buffer else None
        outputs = result.outputs if result else []
        if result:
            propensity.extend((positions[i], p) for i, p in sorted(result.propensity.items()))
        buffer.clear()
        positions.clear()
        if clock is not None:
            for p in all_parts:  # the log is in time order: one clock for every partition
                timers.observe(p, clock, 0.0)
            outputs += pipeline.due_carts(all_parts, 0.0)
        promos.extend(orjson.loads(o.value) for o in outputs if o.topic == settings.topic_promotions)
        outcomes.extend(
            orjson.loads(o.value) for o in outputs if o.topic == settings.topic_promotion_outcomes
        )

    def counters() -> tuple[Counter[str], int]:
        suppressed = Counter(
            {labels["reason"]: int(v) for labels, v in _samples(metrics, "promotions_suppressed")}
        )
        scored = sum(
            v for labels, v in _samples(metrics, "recommendations") if labels.get("source") == "model"
        )
        return suppressed, int(scored)

    before: tuple[Counter[str], int] | None = None  # the counters when the period began
    due = timers.next_due()
    for pos, e in enumerate(events):
        t = datetime.fromisoformat(e["event_time"]).timestamp()
        if before is None and t >= since:
            flush(None)  # what came before the period (timers due by now fire with this event)
            before = counters()
        if t >= due:  # a cart timer fires before this event is seen, as it would live
            flush(t)
            due = timers.next_due()
        key = e["user_id"].encode()
        buffer.append(Message(user_partition(key, partitions), key, orjson.dumps(e), None))
        positions.append(pos)
        if len(buffer) >= BATCH or e["type"] == "cart":  # a cart change sets a timer: know it now
            flush(None)
            due = timers.next_due()
    flush(max((datetime.fromisoformat(e["event_time"]).timestamp() for e in events[-1:]), default=None))
    suppressed, scored = counters()
    if before is not None:
        suppressed, scored = suppressed - before[0], scored - before[1]
    else:  # the period starts after the log
        suppressed, scored = Counter(), 0
    return Replay(promos, suppressed, scored, propensity, outcomes)


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


def period_start(truth: Truth, dataset: str, model_dir: Path | None) -> tuple[float, str]:
    """Start of the test period and where it comes from: the model manifest's ``split`` (when the
    model was trained on this data set), else the data set's own (``streams.splits``)."""
    note = ""
    if model_dir is not None and (model_dir / "manifest.json").is_file():
        manifest = read_manifest(model_dir)
        split, trained_on = manifest.get("split"), (manifest.get("config") or {}).get("data")
        start = split.get("test_start") if isinstance(split, dict) else None
        if isinstance(start, int | float) and trained_on in (None, dataset):
            return float(
                start
            ), f"the test period of model {manifest.get('model_version')} (its manifest's split)"
        if isinstance(start, int | float):
            note = f"; model {manifest.get('model_version')} was trained on {trained_on}, not {dataset}"
    _valid, start, _end = split_bounds(dataset, truth.token_times)
    return start, f"the test period of {dataset} (streams.splits){note}"


def lift(rows: Sequence[tuple[float, bool]], top: float = TOP) -> dict[str, Any]:
    """Purchase rate of the ``top`` share of ``rows`` (propensity, bought) ranked by propensity,
    against all rows. Ties at the cut count at their expected share, as if broken at random
    (a model that scores many events alike is not flattered by the log's order)."""
    n = len(rows)
    bought = sum(b for _, b in rows)
    if n == 0:
        return {
            "events": 0,
            "purchases": 0,
            "rate": None,
            "top_events": 0,
            "top_purchases": 0.0,
            "top_rate": None,
            "cutoff": None,
            "lift": None,
        }
    k = math.ceil(top * n)
    cutoff = sorted((p for p, _ in rows), reverse=True)[k - 1]
    above = [b for p, b in rows if p > cutoff]
    tied = [b for p, b in rows if p == cutoff]
    top_bought = sum(above) + (k - len(above)) * sum(tied) / len(tied)
    rate, top_rate = bought / n, top_bought / k
    return {
        "events": n,
        "purchases": bought,
        "rate": rate,
        "top_events": k,
        "top_purchases": round(top_bought, 3),
        "top_rate": top_rate,
        "cutoff": cutoff,
        "lift": top_rate / rate if rate else None,
    }


def propensity_ranking(
    events: Sequence[dict[str, Any]],
    scored: Iterable[tuple[int, float]],
    truth: Truth,
    horizon: float,
    since: float,
    top: float = TOP,
) -> dict[str, Any]:
    """``lift`` over the events of the period the model scored (log position, propensity), each
    labelled by an order of its user later in the log within ``horizon``; censored: the horizon
    runs past the end of the log."""
    rows: list[tuple[float, bool]] = []
    censored = 0
    for pos, p in scored:
        e = events[pos]
        t = truth.event_time[e["event_id"]]
        if t < since:
            continue
        if t + horizon > truth.end:
            censored += 1
            continue
        rows.append((p, truth.ordered_after(e["user_id"], pos, t, horizon)))
    return {"horizon_s": horizon, "top": top, "censored": censored, **lift(rows, top)}


def evaluate_promotions(
    events: list[dict[str, Any]],
    settings: Settings,
    model_dir: Path | None,
    *,
    window: float,
    since: float | None = 0.0,
    dataset: str = "",
    horizon: float = HORIZON_S,
    partitions: int = 8,
) -> dict[str, Any]:
    """The report's figures. ``since``: count from this instant (0: the whole log; None: the test
    period of the model or of ``dataset``, see ``period_start``)."""
    # the attribution window is the report's outcome window
    settings = settings.model_copy(update={"holdout_percent": 0.0, "attribution_window_s": window})
    truth = ground_truth(events)
    if since is None:
        since, period = period_start(truth, dataset, model_dir)
    else:
        period = "the whole log" if since <= 0 else "given (--since)"
    first = datetime.fromisoformat(events[0]["event_time"]).timestamp() if events else 0.0
    out: dict[str, Any] = {
        "events": len(events),
        "users": truth.users,
        "window_s": window,
        "cart_abandon_after_s": settings.cart_abandon_after_s,
        "since": since,
        "period": {
            "since": since,
            "from": datetime.fromtimestamp(max(since, first), UTC).isoformat(),
            "source": period,
            "warm_up_events": sum(1 for t in truth.event_time.values() if t < since),
        },
        "policies": {},
    }
    runs = [("rule-only", None)] + ([("model", model_dir)] if model_dir else [])
    for name, folder in runs:
        started = time.perf_counter()
        replay = replay_policy(events, settings, folder, partitions, since)
        counted = [p for p in replay.promos if truth.trigger_time(p) >= since]
        kinds = Counter(p["kind"] for p in counted)
        out["policies"][name] = {
            "promotions": len(counted),
            "per_kind": dict(kinds),
            "per_1k_users": {k: round(1000 * n / max(truth.users, 1), 2) for k, n in kinds.items()},
            "suppressed": dict(replay.suppressed),
            "model_scored_events": replay.scored,
            "cart_abandonment": cart_report(
                replay.promos, truth, window, settings.cart_abandon_after_s, since
            ),
            "attributed": attributed(counted, replay.outcomes, truth.end),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if any("offer_probability" in (p.get("scores") or {}) for p in counted):
            out["policies"][name]["off_policy"] = off_policy(
                counted, replay.outcomes, truth.end, settings.max_discount_percent
            )
        if folder is not None:
            out["policies"][name]["propensity_ranking"] = propensity_ranking(
                events, replay.propensity, truth, horizon, since
            )
    return out


def attributed(
    promos: list[dict[str, Any]], outcomes: list[dict[str, Any]], log_end: float
) -> dict[str, dict[str, Any]]:
    """Per kind, of the period's promotions whose attribution window ends inside the log
    (``log_end``): converted (an order within the window) or not, with the converted orders'
    revenue and discount cost (``streams.attribution``); the rest is censored whatever its outcome
    (an order can convert a window early, a window without one closes only at its end: counting
    the early conversions would inflate the rate), and closures for capacity are counted apart."""
    by_id = {o["promotion_id"]: o for o in outcomes}
    out: dict[str, dict[str, Any]] = {}
    for p in promos:
        row = out.setdefault(
            p["kind"],
            {
                "promotions": 0,
                "converted": 0,
                "unconverted": 0,
                "censored": 0,
                "capacity": 0,
                "revenue_order": 0.0,
                "discount_cost": 0.0,
            },
        )
        row["promotions"] += 1
        o = by_id.get(p["promotion_id"])
        if o is None or datetime.fromisoformat(o["window_end"]).timestamp() > log_end:
            row["censored"] += 1
        elif o["closed_by"] == "capacity":
            row["capacity"] += 1
        elif o["converted"]:
            row["converted"] += 1
            row["revenue_order"] += o["revenue_order"]
            row["discount_cost"] += o["discount_cost"]
        else:
            row["unconverted"] += 1
    for row in out.values():
        closed = row["converted"] + row["unconverted"]
        row["conversion"] = row["converted"] / closed if closed else None
        row["revenue_order"] = round(row["revenue_order"], 2)
        row["discount_cost"] = round(row["discount_cost"], 2)
    return out


def off_policy(
    promos: list[dict[str, Any]], outcomes: list[dict[str, Any]], log_end: float, max_discount_percent: float
) -> dict[str, Any]:
    """The off-policy estimates (``streams.offpolicy``) of the bandit's decisions of the period
    whose attribution window ends inside the log (``log_end``); the rest count as without an
    outcome yet (censored, whatever their outcome, as in ``attributed``)."""
    closed = [o for o in outcomes if datetime.fromisoformat(o["window_end"]).timestamp() <= log_end]
    rows, left_out = join(promos, closed)
    return {"estimates": evaluate(rows, max_discount_percent), "left_out": left_out}


def report(results: dict[str, Any], name: str) -> str:
    period = results["period"]
    lines = [
        f"# Promotion policy, offline: {name}",
        "",
        f"{results['events']} events, {results['users']} users; cart idle threshold "
        f"{results['cart_abandon_after_s'] / 60:.0f} min, outcome window {results['window_s'] / 3600:g} h.",
        "",
        f"Scored period: from {period['from']} ({period['source']}) to the end of the log. Every event "
        f"runs through the pipeline; the {period['warm_up_events']} before the period only warm up the "
        "state and are not counted.",
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
    lines += [
        "",
        "Attributed conversions (the user's first order within the outcome window after a promotion of "
        "the period; promotions whose window runs past the end of the log are censored; nobody here "
        "received a promotion, so these are natural purchases, not the effect of an offer):",
        "",
        "| policy | kind | promotions | converted | not converted | censored | conversion "
        "| order revenue | discount cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pol, r in results["policies"].items():
        for kind, a in sorted(r["attributed"].items()):
            lines.append(
                f"| {pol} | {kind} | {a['promotions']} | {a['converted']} | {a['unconverted']} "
                f"| {a['censored']} | {pct(a['conversion'])} | {a['revenue_order']:.2f} "
                f"| {a['discount_cost']:.2f} |"
            )
    for pol, r in results["policies"].items():
        if "off_policy" in r:
            lines += [
                "",
                f"{pol} run, offers chosen by the bandit. Nobody in a real log received an offer: an "
                "order in the window is a natural purchase whatever the offer, so every offer's estimate "
                "is the same conversion less its discount cost, within noise. What this shows is the "
                "estimator on the period's real decisions (how many match each offer, how wide the "
                "intervals are at this volume); what offers achieve needs the logged decisions of a live "
                "deployment (shopstream uplift-report).",
                "",
                render_off_policy(r["off_policy"]["estimates"], r["off_policy"]["left_out"]),
            ]
    pols = results["policies"]
    if "model" in pols:
        saved = (
            pols["rule-only"]["cart_abandonment"]["discount_spend_on_buyers"]
            - pols["model"]["cart_abandonment"]["discount_spend_on_buyers"]
        )
        lines += ["", f"Discount spend on users who bought anyway, avoided by the model: {saved:.2f}."]
        r = pols["model"].get("propensity_ranking")
        if r is not None and not r["events"]:
            lines += [
                "",
                f"Propensity ranking: no event of the period the model scored has its "
                f"{r['horizon_s'] / 3600:g} h horizon inside the log ({r['censored']} censored).",
            ]
        elif r is not None:
            lines += [
                "",
                f"Propensity ranking (events of the period the model scored; purchase = an order by the "
                f"user within {r['horizon_s'] / 3600:g} h after the event; {r['censored']} censored "
                "events left out):",
                "",
                "| events | purchase rate | top decile | its purchase rate | lift |",
                "|---|---|---|---|---|",
                f"| {r['events']} ({r['purchases']} bought) | {pct(r['rate'])} "
                f"| {r['top_events']} (propensity >= {_num(r['cutoff'])}; {r['top_purchases']:g} bought) "
                f"| {pct(r['top_rate'])} | {_num(r['lift'], 'x')} |",
            ]
    return "\n".join(lines) + "\n"


def _num(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{unit}"
