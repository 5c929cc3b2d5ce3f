"""Converters from the real public data sets into contract events (JSON-ready dicts).

In: the files under the data folder (``../shared/data`` by default; see its README for terms).
Out: events in event-time order, each a dict that validates as a contract event. Event ids are
deterministic (``<dataset>-<row>``), so a replay repeated is recognised as the same events.
The same converters feed ``shopstream replay`` and model training.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.errors import ConfigurationError

Event = dict[str, Any]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _base(dataset: str, row: int, user: str, ts: float, etype: str, session: str | None = None) -> Event:
    ev: Event = {
        "schema_version": 1,
        "type": etype,
        "event_id": f"{dataset}-{row}",
        "user_id": user,
        "event_time": _iso(ts),
    }
    if session:
        ev["session_id"] = session
    return ev


def _sorted(events: list[tuple[float, int, Event]]) -> Iterator[Event]:
    events.sort(key=lambda e: (e[0], e[1]))
    for _, _, ev in events:
        yield ev


def taobao(path: Path) -> Iterator[Event]:
    """Taobao UserBehavior: pv -> view, fav -> view(favorite), cart -> cart add, buy -> order."""
    out: list[tuple[float, int, Event]] = []
    with path.open(newline="") as f:
        for row, (user, item, cat, behavior, ts_s) in enumerate(csv.reader(f)):
            ts = float(ts_s)
            if behavior in ("pv", "fav"):
                ev = _base("taobao", row, user, ts, "view")
                ev.update(item_id=item, category=cat, favorite=behavior == "fav")
            elif behavior == "cart":
                ev = _base("taobao", row, user, ts, "cart")
                ev.update(action="add", item_id=item, quantity=1, category=cat)
            elif behavior == "buy":
                ev = _base("taobao", row, user, ts, "order")
                ev.update(order_id=f"taobao-{row}", lines=[{"item_id": item, "quantity": 1}])
            else:
                continue
            out.append((ts, row, ev))
    return _sorted(out)


def rees46(path: Path) -> Iterator[Event]:
    """REES46 (Open CDP): view / cart / remove_from_cart / purchase with price, brand and category."""
    out: list[tuple[float, int, Event]] = []
    with path.open(newline="") as f:
        for row, r in enumerate(csv.DictReader(f)):
            ts = datetime.strptime(r["event_time"], "%Y-%m-%d %H:%M:%S %Z").replace(tzinfo=UTC).timestamp()
            price = float(r["price"]) if r["price"] else None
            item, kind = r["product_id"], r["event_type"]
            session = r["user_session"] or None
            category = r["category_code"] or r["category_id"] or None
            brand = r["brand"] or None
            if kind == "view":
                ev = _base("rees46", row, r["user_id"], ts, "view", session)
                ev.update(item_id=item, price=price, category=category, brand=brand)
            elif kind in ("cart", "remove_from_cart"):
                ev = _base("rees46", row, r["user_id"], ts, "cart", session)
                action = "add" if kind == "cart" else "remove"
                ev.update(
                    action=action, item_id=item, quantity=1, unit_price=price, category=category, brand=brand
                )
            elif kind == "purchase":
                ev = _base("rees46", row, r["user_id"], ts, "order", session)
                ev.update(
                    order_id=f"rees46-{row}",
                    lines=[{"item_id": item, "quantity": 1, "unit_price": price}],
                    total=price,
                )
            else:
                continue
            out.append((ts, row, {k: v for k, v in ev.items() if v is not None}))
    return _sorted(out)


INSTACART_EPOCH = datetime(2017, 1, 1, tzinfo=UTC)


def instacart(path: Path) -> Iterator[Event]:
    """Instacart: each basket becomes cart adds in ``add_to_cart_order``, then the order.

    The data has no dates, only day-of-week, hour and days since the prior order: each user's
    timeline starts at 2017-01-01 and advances by ``days_since_prior_order``; cart adds are 30 s
    apart and end 30 s before the order.
    """
    orders: dict[tuple[str, int], dict[str, Any]] = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            key = (r["user_id"], int(r["order_number"]))
            o = orders.setdefault(
                key,
                {
                    "id": r["order_id"],
                    "days": float(r["days_since_prior_order"] or 0),
                    "hour": int(r["order_hour_of_day"]),
                    "lines": [],
                },
            )
            o["lines"].append((float(r["add_to_cart_order"] or 0), r["product_id"]))
    out: list[tuple[float, int, Event]] = []
    day = 0.0
    last_user = None
    seq = 0
    for (user, _n), o in sorted(orders.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        day = 0.0 if user != last_user else day + o["days"]
        last_user = user
        t_order = (INSTACART_EPOCH + timedelta(days=int(day), hours=o["hour"])).timestamp()
        lines = sorted(o["lines"])
        for i, (_pos, product) in enumerate(lines):
            ts = t_order - 30.0 * (len(lines) - i)
            ev = _base("instacart", seq, user, ts, "cart")
            ev.update(action="add", item_id=product, quantity=1)
            out.append((ts, seq, ev))
            seq += 1
        ev = _base("instacart", seq, user, t_order, "order")
        ev.update(order_id=o["id"], lines=[{"item_id": p, "quantity": 1} for _, p in lines])
        out.append((t_order, seq, ev))
        seq += 1
    return _sorted(out)


def bestbuy(path: Path) -> Iterator[Event]:
    """Best Buy mobile search: each query a search event, with the clicked SKU where known."""
    out: list[tuple[float, int, Event]] = []
    with path.open(newline="") as f:
        for row, r in enumerate(csv.DictReader(f)):
            ts = datetime.fromisoformat(r["query_time"]).replace(tzinfo=UTC).timestamp()
            ev = _base("bestbuy", row, r["user"], ts, "search")
            ev["query"] = r["query"][:512]
            if r.get("sku"):
                ev["clicked_item"] = r["sku"]
            out.append((ts, row, ev))
    return _sorted(out)


def amazon_reviews(path: Path) -> Iterator[Event]:
    """Amazon 2018 5-core reviews: rating and text."""
    out: list[tuple[float, int, Event]] = []
    with gzip.open(path, "rt") as f:
        for row, line in enumerate(f):
            r = json.loads(line)
            ts = float(r["unixReviewTime"])
            ev = _base("amazon", row, r["reviewerID"], ts, "review")
            ev.update(item_id=r["asin"], rating=int(r["overall"]), text=(r.get("reviewText") or "")[:20_000])
            if r.get("summary"):
                ev["title"] = r["summary"][:512]
            out.append((ts, row, ev))
    return _sorted(out)


@dataclass(frozen=True)
class Dataset:
    name: str
    relpath: str  # under the data folder
    convert: Callable[[Path], Iterator[Event]]
    about: str


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("taobao", "taobao-userbehavior/timeslice.csv", taobao, "Taobao time slice, 96k events"),
        Dataset("taobao-users", "taobao-userbehavior/users_prefix.csv", taobao, "814 full Taobao users"),
        Dataset("rees46", "rees46/2019-Oct-first17k.csv", rees46, "REES46, 17k events with prices"),
        Dataset("instacart", "instacart/orders_sample.csv", instacart, "Instacart baskets, 593 users"),
        Dataset("bestbuy", "bestbuy-search/train_sample.csv", bestbuy, "Best Buy queries -> clicks"),
        Dataset(
            "amazon-beauty",
            "amazon-reviews-2018/All_Beauty_5.json.gz",
            amazon_reviews,
            "Amazon All_Beauty reviews",
        ),
        Dataset(
            "amazon-fashion",
            "amazon-reviews-2018/AMAZON_FASHION_5.json.gz",
            amazon_reviews,
            "Amazon Fashion reviews",
        ),
    )
}
DEMO_SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "rees46-sample.csv"


def load(name: str, data_dir: Path, path: Path | None = None) -> Iterator[Event]:
    """Events of a named data set, from ``path`` or the data folder (``rees46-demo``: the shipped sample)."""
    if name == "rees46-demo":
        return rees46(path or DEMO_SAMPLE)
    if name not in DATASETS:
        raise ConfigurationError(f"unknown data set {name!r}; known: rees46-demo, {', '.join(DATASETS)}")
    ds = DATASETS[name]
    file = path or data_dir / ds.relpath
    if not file.exists():
        raise ConfigurationError(f"{file} not found (set SHOPSTREAM_DATASETS_DIR to the data folder)")
    return ds.convert(file)
