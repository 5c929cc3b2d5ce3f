"""Attribution of orders to promotions, in the user's state: what a promotion achieved.

Every promotion the policy decides (sent, or logged for the holdout group) opens an attribution
window of ``attribution_window_s`` event time in the user's state (``promo["open"]``). The first
order of the user inside the window converts it; a window that ends without one closes it
unconverted. Either way one outcome record goes to ``shop.promotion-outcomes``
(``streams.records.PromotionOutcome``), once per promotion id:

- the entry leaves the state in the same state write that publishes the outcome, and a
  redelivered order is not folded twice (its outcomes are re-sent from the outbox with the same
  content, as its promotions are);
- a window closes at its end in event time, by the user's next event or by the partition's timer
  (``streams.promotions.CartTimers`` tracks the earliest end), whichever comes first; either way
  the record is the same, so how events were batched or when the timer ran does not change it;
- the state is bounded: at most ``KEEP_OPEN`` windows per user; one more closes the oldest early,
  unconverted, with ``closed_by="capacity"`` (reports leave those out);
- an erasure deletes the state and with it the open windows: no outcome is published for an
  erased user.

Revenue is read from the order: ``revenue_items`` is the lines of the promoted items (quantity x
unit price), ``revenue_order`` the order's total (else the sum of its lines). The discount cost is
the offer's percent of ``revenue_items`` for a ``percent_off`` offer that was sent; a holdout
promotion costs nothing (it was not sent). An order whose event time is before the promotion's
(a late event) converts nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from streams.records import OrderEvent
from streams.state import UserState

OPEN = "open"  # promo key: promotions whose attribution window is open
KEEP_OPEN = 16  # open windows per user (frequency cap 3 a day over a 3-day window, and review recoveries)
OnClose = Callable[[dict[str, Any], dict[str, Any]], None]  # (window entry, its outcome record)


def open_window(
    state: UserState,
    user: str,
    record: dict[str, Any],
    t: float,
    window_s: float,
    arm: list[Any] | None = None,
    on_close: OnClose | None = None,
) -> list[dict[str, Any]]:
    """Open the attribution window of a promotion ``record`` decided at event time ``t`` (``arm``:
    the bandit's [context, percent], kept for learning from the outcome); returns the outcomes of
    the windows this closes early (beyond ``KEEP_OPEN``, oldest first). ``on_close(entry,
    outcome)`` is called for every window closed, here and in ``settle`` and ``on_order``."""
    entries: list[dict[str, Any]] = state.promo.setdefault(OPEN, [])
    if any(e["id"] == record["promotion_id"] for e in entries):
        return []
    offer = record["offer"]
    entries.append(
        {
            "id": record["promotion_id"],
            "kind": record["kind"],
            "offer": [offer["kind"], float(offer.get("value", 0.0))],
            "holdout": bool(record["holdout"]),
            "items": list(record["items"]),
            "t": t,
            "until": t + window_s,
            "model": record["model_version"],
            **({"b": arm} if arm is not None else {}),
        }
    )
    if len(entries) <= KEEP_OPEN:
        return []
    entries.sort(key=lambda e: (e["t"], e["id"]))
    over = entries[: len(entries) - KEEP_OPEN]
    del entries[: len(over)]
    return _closed(over, [outcome(user, e, "capacity") for e in over], on_close)


def next_end(state: UserState) -> float | None:
    """The earliest end of the user's open windows (None: none open)."""
    return min((e["until"] for e in state.promo.get(OPEN, ())), default=None)


def settle(state: UserState, user: str, now: float, on_close: OnClose | None = None) -> list[dict[str, Any]]:
    """Close the windows that ended at or before event time ``now``; returns their outcome
    records, the earliest end first."""
    entries = state.promo.get(OPEN)
    if not entries:
        return []
    ended = [e for e in entries if e["until"] <= now]
    if not ended:
        return []
    _keep(state, [e for e in entries if e["until"] > now])
    ended.sort(key=lambda e: (e["until"], e["id"]))
    return _closed(ended, [outcome(user, e, "window") for e in ended], on_close)


def on_order(state: UserState, order: OrderEvent, on_close: OnClose | None = None) -> list[dict[str, Any]]:
    """The outcomes an order converts: every window open at its event time that began at or before
    it (call ``settle`` at the order's time first, so a window that ended before it is closed)."""
    entries = state.promo.get(OPEN)
    if not entries:
        return []
    t = order.event_time.timestamp()
    won = [e for e in entries if e["t"] <= t < e["until"]]
    if not won:
        return []
    _keep(state, [e for e in entries if not e["t"] <= t < e["until"]])
    return _closed(won, [outcome(order.user_id, e, "order", order) for e in won], on_close)


def outcome(
    user: str, entry: dict[str, Any], closed_by: str, order: OrderEvent | None = None
) -> dict[str, Any]:
    """The outcome record of one window (``streams.records.PromotionOutcome``)."""
    kind, value = entry["offer"]
    items = set(entry["items"])
    revenue_items = revenue_order = 0.0
    if order is not None:
        lines = [(ln.item_id, ln.quantity * (ln.unit_price or 0.0)) for ln in order.lines]
        revenue_items = sum(v for item, v in lines if item in items)
        revenue_order = order.total if order.total is not None else sum(v for _, v in lines)
    cost = revenue_items * value / 100 if kind == "percent_off" and not entry["holdout"] else 0.0
    return {
        "schema_version": 1,
        "user_id": user,
        "promotion_id": entry["id"],
        "kind": entry["kind"],
        "offer": {"kind": kind, "value": value},
        "holdout": entry["holdout"],
        "promoted_at": datetime.fromtimestamp(entry["t"], UTC),
        "window_end": datetime.fromtimestamp(entry["until"], UTC),
        "converted": order is not None,
        "order_id": order.order_id if order is not None else None,
        "order_event_id": order.event_id if order is not None else None,
        "converted_at": order.event_time if order is not None else None,
        "revenue_items": round(revenue_items, 2),
        "revenue_order": round(float(revenue_order), 2),
        "discount_cost": round(cost, 2),
        "currency": order.currency if order is not None else None,
        "closed_by": closed_by,
        "model_version": entry["model"],
    }


def offer_label(offer: dict[str, Any]) -> str:
    """A bounded metric label for an offer: ``reminder``, ``percent_off:10``, ..."""
    kind = str(offer["kind"])
    return f"{kind}:{float(offer.get('value', 0.0)):g}" if kind == "percent_off" else kind


def dedupe(outcomes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One outcome record per promotion id (the first: a re-sent one is the same record), capacity
    closures left out (their windows did not run their course): what reports count."""
    seen: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        if o.get("closed_by") != "capacity":
            seen.setdefault(o["promotion_id"], o)
    return list(seen.values())


def reward(record: dict[str, Any]) -> float:
    """The bandit's reward of an outcome: the order's revenue less the discount cost, 0 unconverted."""
    return float(record["revenue_order"]) - float(record["discount_cost"]) if record["converted"] else 0.0


def _closed(
    entries: list[dict[str, Any]], records: list[dict[str, Any]], on_close: OnClose | None
) -> list[dict[str, Any]]:
    if on_close is not None:
        for e, r in zip(entries, records, strict=True):
            on_close(e, r)
    return records


def _keep(state: UserState, entries: list[dict[str, Any]]) -> None:
    if entries:
        state.promo[OPEN] = entries
    else:
        state.promo.pop(OPEN, None)
