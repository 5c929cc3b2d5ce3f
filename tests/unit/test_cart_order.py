"""The cart fold does not depend on the arrival order of a user's cart changes and orders.

They come from different topics (shop.carts, shop.orders) and producers key them as they like, so
the worker sees them in any order; within ``REORDER_WINDOW_S`` of event time the cart and its
abandonment anchor (``promo["cart"]``) must come out as if they had arrived in event-time order.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.promotions import Budget, Policy
from streams.records import event_adapter
from streams.settings import Settings
from streams.state import MAX_CART_LINES, MAX_CART_LOG, MAX_LOGGED_ITEMS, REORDER_WINDOW_S, UserState

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # noon UTC: outside the default quiet hours
T0_S = int(T0.timestamp())
ITEMS = ("a", "b", "c")
SEC, MIN, HOUR = timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1)


def ev(etype: str, eid: str, at: datetime = T0, **fields: Any) -> Any:
    raw = {"schema_version": 1, "type": etype, "event_id": eid, "user_id": "u", "event_time": at.isoformat()}
    return event_adapter.validate_json(orjson.dumps({**raw, **fields}))


def add(eid: str, item: str, at: datetime = T0, qty: int = 1, price: float | None = 2.5) -> Any:
    return ev("cart", eid, at, action="add", item_id=item, quantity=qty, unit_price=price)


def remove(eid: str, item: str, at: datetime = T0, qty: int = 1) -> Any:
    return ev("cart", eid, at, action="remove", item_id=item, quantity=qty)


def order(eid: str, at: datetime, *items: str) -> Any:
    return ev("order", eid, at, order_id=f"o-{eid}", lines=[{"item_id": i, "quantity": 1} for i in items])


def fold(*events: Any, state: UserState | None = None, **kw: Any) -> UserState:
    s = UserState() if state is None else state
    for e in events:
        s.apply(e, 0, 50, **kw)
    return s


@st.composite
def histories(draw: st.DrawFn, ties: bool = False) -> list[Any]:
    """One user's cart adds, removes and orders (ids in draw order, times in any order)."""
    n = draw(st.integers(1, min(10, MAX_CART_LOG)))
    span = 3 if ties else REORDER_WINDOW_S * 1000  # ms; 3: mostly equal event times
    times = st.integers(0, span)
    offsets = draw(st.lists(times, min_size=n, max_size=n, unique=not ties))
    qty, items = st.integers(1, 3), st.sampled_from(ITEMS)
    out = []
    for i, ms in enumerate(offsets):
        at, eid = T0 + timedelta(milliseconds=ms), f"e{i}"
        match draw(st.sampled_from(("add", "remove", "order"))):
            case "add":
                price = draw(st.sampled_from([None, 1.5, 4.0]))
                out.append(add(eid, draw(items), at, draw(qty), price))
            case "remove":
                out.append(remove(eid, draw(items), at, draw(qty)))
            case _:
                lines = [{"item_id": it, "quantity": draw(qty)} for it in draw(st.lists(items, min_size=1))]
                out.append(ev("order", eid, at, order_id=f"o{i}", lines=lines[:3]))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), events=histories())
def test_any_arrival_order_folds_like_event_time_order(data: st.DataObject, events: list[Any]) -> None:
    want = fold(*sorted(events, key=lambda e: e.event_time))
    got = fold(*data.draw(st.permutations(events)))
    assert got.cart == want.cart
    assert got.promo.get("cart") == want.promo.get("cart")
    assert got.promo.get("order") == want.promo.get("order")


@settings(max_examples=200, deadline=None)
@given(data=st.data(), events=histories(ties=True))
def test_equal_event_times_fold_the_same_in_any_arrival_order(data: st.DataObject, events: list[Any]) -> None:
    one, other = fold(*data.draw(st.permutations(events))), fold(*data.draw(st.permutations(events)))
    assert one.cart == other.cart and one.promo.get("cart") == other.promo.get("cart")


def test_a_remove_before_its_add_leaves_no_cart_and_no_abandonment() -> None:
    s = fold(remove("r", "a", T0 + MIN), add("c", "a", T0, price=9.0))
    assert s.cart == {} and "cart" not in s.promo
    settings_ = Settings(holdout_percent=0.0)
    pol = Policy(settings_, Budget({}, settings_.discount_budget_per_day))
    assert pol.on_cart_due(s, "u", T0.timestamp() + 10 * 3600, 0, "m") is None
    assert fold(add("c", "a", T0, price=9.0), remove("r", "a", T0 + MIN)).cart == {}  # as in time order


def test_equal_event_times_remove_after_add() -> None:
    s = fold(remove("1", "a"), add("2", "a"))  # same instant: the remove is taken to follow the add
    assert s.cart == {} and "cart" not in s.promo


def test_an_order_before_a_cart_add_leaves_the_bought_item_out() -> None:
    s = fold(order("o", T0 + 5 * MIN, "a"), add("ca", "a", T0), add("cb", "b", T0 + MIN, qty=2))
    assert s.cart == {"b": [2, 2.5]}
    assert s.promo["cart"] == [T0_S + 60, "cb"] and s.promo["order"] == T0_S + 300
    assert s.bought == {"a": T0_S + 300}
    fold(add("again", "a", T0 + 10 * MIN), state=s)  # added again after the order: in the cart
    assert s.cart == {"b": [2, 2.5], "a": [1, 2.5]} and s.promo["cart"] == [T0_S + 600, "again"]


def test_the_anchor_is_the_latest_change_by_event_time_not_by_arrival() -> None:
    s = fold(add("late", "a", T0 + 20 * MIN), add("early", "b", T0), remove("rm", "b", T0 + 5 * MIN))
    assert s.cart == {"a": [1, 2.5]} and s.promo["cart"] == [T0_S + 1200, "late"]


def test_a_change_later_than_the_window_is_applied_after_the_compacted_past() -> None:
    s = fold(add("a1", "a", T0 + 40 * MIN), ev("view", "v", T0 + 2 * HOUR, item_id="x"))
    assert s.cart == {"a": [1, 2.5]} and s.cart_base == {"a": [1, 2.5]} and s.cart_log == {}
    # happened before a1 but arrives after it left the window: applied on top of it (approximation;
    # in event-time order the cart would hold a)
    fold(remove("r", "a", T0 + 10 * MIN), state=s)
    assert s.cart == {} and s.cart_base == {} and s.cart_log == {}
    # inside the window a late change is still put in its place
    fold(add("b1", "b", T0 + 90 * MIN), remove("rb", "b", T0 + 70 * MIN), state=s)
    assert s.cart == {"b": [1, 2.5]} and s.promo["cart"] == [T0_S + 90 * 60, "b1"]


def test_the_window_is_a_keyword_argument() -> None:
    late = (add("c", "a", T0 + MIN), ev("view", "v", T0 + 2 * MIN, item_id="x"), remove("r", "a", T0))
    assert fold(*late).cart == {"a": [1, 2.5]}  # the remove happened first
    assert fold(*late, window_s=30).cart == {}  # the add had left a 30 s window: the remove lands after it


def test_cart_state_stays_bounded() -> None:
    s = fold(*(add(f"c{i}", f"i{i}", T0 + i * SEC) for i in range(MAX_CART_LINES + 50)))
    assert len(s.cart) == len(s.cart_base) == MAX_CART_LINES and "i0" not in s.cart
    assert len(s.cart_log) == MAX_LOGGED_ITEMS and all(len(log) == 1 for log in s.cart_log.values())
    one = fold(*(add(f"c{i}", "x", T0 + i * SEC) for i in range(3 * MAX_CART_LOG)))
    assert len(one.cart_log["x"]) == MAX_CART_LOG and one.cart == {"x": [3 * MAX_CART_LOG, 2.5]}
    days = fold(*(add(f"c{i}", ITEMS[i % 3], T0 + i * HOUR) for i in range(48)))
    horizon = (days.last_event_s - REORDER_WINDOW_S) * 1000
    assert all(e[0] >= horizon for log in days.cart_log.values() for e in log)
    assert sum(len(log) for log in days.cart_log.values()) == 2 and days.cart == {i: [16, 2.5] for i in ITEMS}


def test_the_cart_log_round_trips() -> None:
    s = fold(add("c1", "a", T0 + MIN, qty=2), order("o", T0, "a"), remove("r", "b", T0))
    raw = s.dumps()
    back = UserState.loads(raw)
    assert back == s and back.dumps() == raw and back.cart_log_min == s.cart_log_min
    assert back.cart_log["a"][0][2] == "purchase" and back.promo["cart"] == [T0_S + 60, "c1"]
    later = ev("view", "v", T0 + 3 * HOUR, item_id="x")
    assert fold(later, state=back) == fold(later, state=s) and s.cart_log == {}


def test_states_stored_before_the_cart_log_still_load() -> None:
    body = {
        "seq": [["a", 3, T0_S, []]],
        "cart": {"a": [2, 4.0]},
        "counts": {"cart_add": 1},
        "reviews": [0, 0.0, 0],
        "bought": {},
        "last": T0_S,
        "ids": ["c1"],
        "promo": {"cart": [T0_S, "c1"]},
    }
    s = UserState.loads(struct.pack(">q", 7) + orjson.dumps(body))
    assert s.cart == s.cart_base == {"a": [2, 4.0]} and s.cart_log == {}
    assert s.cart_changed == [T0_S * 1000, "c1"] and s.seen_ms == 7
    fold(remove("r", "a", T0 + MIN), state=s)  # the old lines are the base the log replays on
    assert s.cart == {"a": [1, 4.0]} and s.cart_base == {"a": [2, 4.0]}
    assert s.promo["cart"] == [T0_S + 60, "r"]
    assert UserState.loads(s.dumps()) == s
