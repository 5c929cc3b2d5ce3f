"""Converters from the real data sets' formats into contract events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.decode import EventDecoder
from streams.sources import datasets
from streams.sources.datasets import DATASETS, load

DATA = Path(__file__).resolve().parents[1] / "data"
decoder = EventDecoder(max_bytes=1 << 20, min_event_time="2000-01-01T00:00:00Z", max_clock_skew_s=86400)


def valid(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for ev in events:
        decoder.decode(orjson.dumps(ev), ev["type"])
    return events


def test_taobao_maps_behaviours_and_sorts_by_time() -> None:
    evs = valid(list(datasets.taobao(DATA / "taobao.csv")))
    assert [(e["type"], e.get("favorite")) for e in evs] == [
        ("view", False),
        ("view", True),
        ("cart", None),
        ("order", None),
        ("view", False),
    ]
    assert evs[3]["lines"] == [{"item_id": "101", "quantity": 1}]
    assert evs[0]["event_time"] == "2017-11-26T01:00:00Z"


def test_rees46_keeps_prices_brands_and_cart_removals() -> None:
    evs = valid(list(datasets.rees46(DATA / "rees46.csv")))
    assert [e["type"] for e in evs] == ["view", "cart", "cart", "order"]
    assert evs[0]["price"] == 10.5 and evs[0]["brand"] == "acme" and evs[0]["category"] == "electronics.phone"
    assert evs[2]["action"] == "remove" and evs[2]["category"] == "77"
    assert evs[3]["total"] == 3.0 and "session_id" not in evs[3]


def test_instacart_basket_is_cart_adds_in_order_then_the_order() -> None:
    evs = valid(list(datasets.instacart(DATA / "instacart.csv")))
    assert [(e["type"], e.get("item_id")) for e in evs[:3]] == [
        ("cart", "501"),
        ("cart", "500"),
        ("order", None),
    ]
    assert evs[2]["event_time"] == "2017-01-01T08:00:00Z"
    assert evs[-1]["event_time"] == "2017-01-08T09:00:00Z"


def test_bestbuy_queries_become_searches_with_clicks() -> None:
    (ev,) = valid(list(datasets.bestbuy(DATA / "bestbuy.csv")))
    assert ev["query"].startswith("Televisiones") and ev["clicked_item"] == "1234"


def test_amazon_reviews_keep_rating_and_text() -> None:
    evs = valid(list(datasets.amazon_reviews(DATA / "amazon.json.gz")))
    assert [(e["rating"], e["text"]) for e in evs] == [(5, ""), (2, "Broke after a day")]


def test_shipped_demo_sample_converts() -> None:
    evs = valid(list(load("rees46-demo", Path("/nonexistent"))))
    assert len(evs) == 3000 and {e["type"] for e in evs} == {"view", "cart", "order"}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_real_data_sets_convert_to_valid_events(name: str, data_dir: Path) -> None:
    evs = list(load(name, data_dir))
    assert len(evs) > 900
    valid(evs[:: max(1, len(evs) // 2000)])
    times = [e["event_time"] for e in evs]
    assert times == sorted(times)
