"""Folding events into per-user state."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from streams.records import event_adapter
from streams.state import MAX_BOUGHT, RECENT_IDS, TokenKind, UserState, seen_ms_of, user_partition


def ev(etype: str, eid: str, t: str = "2024-05-01T10:00:00Z", **fields: Any) -> Any:
    return event_adapter.validate_json(
        orjson.dumps(
            {"schema_version": 1, "type": etype, "event_id": eid, "user_id": "u", "event_time": t, **fields}
        )
    )


def test_fold_tracks_sequence_cart_counts_reviews_and_purchases() -> None:
    s = UserState()
    s.apply(ev("view", "1", item_id="a"), 1000, 50)
    s.apply(ev("cart", "2", action="add", item_id="a", quantity=2, unit_price=4.0), 1001, 50)
    s.apply(ev("cart", "3", action="add", item_id="b", quantity=1), 1002, 50)
    s.apply(ev("cart", "4", action="remove", item_id="a", quantity=1), 1003, 50)
    assert s.cart == {"a": [1, 4.0], "b": [1, None]}
    s.apply(
        ev("order", "5", t="2024-05-01T11:00:00Z", order_id="o", lines=[{"item_id": "b", "quantity": 1}]),
        1004,
        50,
    )
    s.apply(ev("review", "6", item_id="b", rating=1, text="broken"), 1005, 50)
    s.apply(ev("search", "7", query="socks"), 1006, 50)
    assert s.cart == {"a": [1, 4.0]}
    assert s.bought == {"b": 1714561200}
    assert s.counts == {"view": 1, "cart_add": 2, "cart_remove": 1, "order": 1, "review": 1, "search": 1}
    assert s.reviews == [1, 1.0, 1]
    assert [tok[1] for tok in s.seq] == [
        TokenKind.VIEW,
        TokenKind.CART_ADD,
        TokenKind.CART_ADD,
        TokenKind.CART_REMOVE,
        TokenKind.PURCHASE,
        TokenKind.REVIEW,
        TokenKind.SEARCH,
    ]
    assert s.last_event_s == 1714561200 and s.seen_ms == 1006
    assert s.recent_items(3) == ["b", "a"]


def test_removing_more_than_the_cart_holds_drops_the_line() -> None:
    s = UserState()
    s.apply(ev("cart", "1", action="add", item_id="a", quantity=1), 1, 50)
    s.apply(ev("cart", "2", action="remove", item_id="a", quantity=5), 2, 50)
    s.apply(ev("cart", "3", action="remove", item_id="zzz", quantity=1), 3, 50)
    assert s.cart == {}


def test_duplicate_event_ids_are_not_folded_twice() -> None:
    s = UserState()
    assert s.apply(ev("view", "1", item_id="a"), 1, 50)
    assert not s.apply(ev("view", "1", item_id="a"), 2, 50)
    assert s.counts == {"view": 1} and len(s.seq) == 1


def test_state_is_bounded() -> None:
    s = UserState()
    for i in range(300):
        s.apply(ev("order", f"e{i}", order_id=f"o{i}", lines=[{"item_id": f"i{i}", "quantity": 1}]), i, 20)
    assert len(s.seq) == 20 and s.seq[-1][0] == "i299"
    assert len(s.bought) == MAX_BOUGHT and "i299" in s.bought and "i0" not in s.bought
    assert len(s.recent_ids) == RECENT_IDS


def test_serialisation_round_trips_and_exposes_last_seen_without_decoding() -> None:
    s = UserState()
    s.apply(ev("cart", "1", action="add", item_id="a", quantity=3, unit_price=1.25), 1_700_000_000_123, 50)
    raw = s.dumps()
    assert seen_ms_of(raw) == 1_700_000_000_123
    assert UserState.loads(raw) == s


@pytest.mark.parametrize(
    # computed with Kafka's own org.apache.kafka.common.utils.Utils (kafka-clients 4.1.1)
    ("key", "p8", "p12"),
    [
        ("21", 4, 0),
        ("foobar", 6, 6),
        ("user-42", 4, 4),
        ("541312140", 2, 6),
        ("a-little-bit-longer-string", 3, 11),
        ("ü-unicode", 1, 5),
    ],
)
def test_user_partition_matches_kafkas_default_partitioner(key: str, p8: int, p12: int) -> None:
    assert user_partition(key.encode(), 8) == p8
    assert user_partition(key.encode(), 12) == p12


def test_tokens_carry_hashed_static_and_dynamic_features() -> None:
    from streams.state import FEATURE_BUCKETS, MAX_FEATURES, STATIC_BUCKETS, event_tokens, word_pieces

    view = ev("view", "1", item_id="a", category="shoes.running", brand="Acme", price=59.0)
    cart = ev("cart", "2", action="add", item_id="b", quantity=1, category="shoes.running", unit_price=61.0)
    (_, _, _, vf), (_, _, _, cf) = event_tokens(view)[0], event_tokens(cart)[0]
    assert vf[0] == cf[0] and 0 < vf[0] < STATIC_BUCKETS  # same category, same static id
    assert vf[2] == cf[1] and STATIC_BUCKETS <= vf[2] < FEATURE_BUCKETS  # 59 and 61 share a price bucket
    (_, kind, _, sf) = event_tokens(ev("search", "3", query="Red Running-Shoes, red!"))[0]
    assert kind == TokenKind.SEARCH and len(sf) == 3 == len(word_pieces("Red Running-Shoes, red!"))
    review = ev("review", "4", item_id="a", rating=1, title="Broken", text="w " * 9000 + "stuck zipper again")
    (_, _, _, rf) = event_tokens(review)[0]
    assert len(rf) <= MAX_FEATURES and all(STATIC_BUCKETS <= f < FEATURE_BUCKETS for f in rf)
    assert event_tokens(ev("view", "5", item_id="a"))[0][3] == []


def test_states_stored_before_token_features_still_load() -> None:
    old = UserState(seq=[["a", 2, 100], ["b", 3, 101]])
    s = UserState.loads(old.dumps())
    s.apply(ev("view", "1", item_id="c", category="x"), 5, 50)
    assert s.recent_items(5) == ["c", "b", "a"]
