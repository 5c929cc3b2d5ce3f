"""The co-visitation + popularity baseline over a plain dict standing in for the table."""

from __future__ import annotations

import orjson

from streams.baseline import CovisitBaseline, item_key, partition_of_key
from streams.state import TokenKind

V = TokenKind.VIEW


def test_items_seen_together_are_recommended_together() -> None:
    table: dict[bytes, bytes] = {}
    b = CovisitBaseline(table, neighbors=10, window=3)
    for _user in range(5):  # every user views a then b
        b.observe(0, [], "a", V)
        b.observe(0, ["a"], "b", V)
    b.observe(0, [], "c", V)
    assert b.recommend(0, ["a"], {"a"}, 2)[0][0] == "b"
    assert b.recommend(0, ["b"], {"b"}, 2)[0][0] == "a"
    # co-visited items rank above popularity fill, and the fill respects exclusions
    ranked = b.recommend(0, ["a"], {"a"}, 3)
    assert [i for i, _ in ranked] == ["b", "c"]
    assert ranked[0][1] > ranked[1][1] > 0


def test_partitions_keep_separate_statistics() -> None:
    table: dict[bytes, bytes] = {}
    b = CovisitBaseline(table, neighbors=10, window=3)
    b.observe(1, ["a"], "b", V)
    assert b.recommend(2, ["a"], set(), 5) == []
    assert {partition_of_key(k) for k in table} == {1}
    assert item_key(1, "a") in table


def test_purchases_weigh_more_than_views_and_cart_removals_nothing() -> None:
    table: dict[bytes, bytes] = {}
    b = CovisitBaseline(table, neighbors=10, window=3)
    b.observe(0, ["a"], "v", V)
    b.observe(0, ["a"], "p", TokenKind.PURCHASE)
    b.observe(0, ["a"], "r", TokenKind.CART_REMOVE)
    assert [i for i, _ in b.recommend(0, ["a"], {"a"}, 5)] == ["p", "v"]


def test_neighbour_lists_are_bounded() -> None:
    table: dict[bytes, bytes] = {}
    b = CovisitBaseline(table, neighbors=5, window=1)
    for i in range(100):
        b.observe(0, [f"x{i}"], "hub", V)
    assert len(orjson.loads(table[item_key(0, "hub")])["nb"]) <= 10


def test_popularity_is_rebuilt_from_the_table() -> None:
    table: dict[bytes, bytes] = {}
    b = CovisitBaseline(table, neighbors=10, window=3)
    for _ in range(3):
        b.observe(0, [], "hot", V)
    b.observe(0, [], "cold", V)
    fresh = CovisitBaseline(table, neighbors=10, window=3)
    assert fresh.seed_popularity(table.items()) == 2
    assert [i for i, _ in fresh.recommend(0, [], set(), 2)] == ["hot", "cold"]
