"""Per-user state: what the worker keeps about each user, folded event by event.

In: validated contract events. Out: a compact ``UserState`` stored in the ``users`` table as
bytes: an 8-byte big-endian "last seen" worker clock (ms), then orjson. The prefix lets the
expiry sweep read a user's idle time without decoding the JSON.

Tokens are the vocabulary the behaviour model reads: ``[item_id, kind, unix_seconds, features]``,
one per item touched (an order yields one purchase token per line; a search without a click has
item ""). ``features`` are hashed ids of what the event says beyond the item: its category and
brand (static, in the lower half of the hash space), its price bucket, rating and the word pieces
of its query or review text (dynamic, upper half). Training tokenises with the same functions, so
the model and the worker agree on every id.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

from streams.decode import AnyEvent
from streams.records import CartEvent, OrderEvent, ReviewEvent, SearchEvent, ViewEvent

_SEEN = struct.Struct(">q")
RECENT_IDS = 32  # event ids remembered per user to drop redelivered duplicates
MAX_BOUGHT = 100  # recent purchases remembered per user (excluded from recommendations)
MAX_CART_LINES = 200
LOW_RATING = 2  # ratings at or below this count as negative reviews

FEATURE_BUCKETS = 1 << 15  # hashed feature ids: 1 .. FEATURE_BUCKETS - 1 (0 is padding)
STATIC_BUCKETS = FEATURE_BUCKETS // 2  # ids below this describe the item itself (category, brand)
MAX_FEATURES = 8  # features per token
MAX_WORDS = 5  # word pieces of query / review text per token
_WORD = re.compile(r"[^\W_]+")
N_GAPS = 20  # time-gap buckets, PAD (0) included
FIRST_GAP = 1  # bucket of a token with no predecessor (or no time information)


def gap_bucket(gap_s: float) -> int:
    """Bucket of the time since the previous token: 2 + floor(log2(seconds + 1)), capped."""
    return 2 + min(int(math.log2(max(gap_s, 0.0) + 1.0)), N_GAPS - 3)


class TokenKind(IntEnum):
    """Event kind of a token; stable integers shared with the model's vocabulary."""

    SEARCH = 1
    VIEW = 2
    CART_ADD = 3
    CART_REMOVE = 4
    PURCHASE = 5
    REVIEW = 6


Token = tuple[str, int, int, list[int]]  # (item_id or "", TokenKind, unix seconds, feature ids)


def _hash(text: str, lo: int, hi: int) -> int:
    return lo + zlib.crc32(text.encode()) % (hi - lo)


def static_feature(name: str, value: str) -> int:
    """Hashed id of an attribute of the item itself (``c`` category, ``b`` brand, ``a`` attribute)."""
    return _hash(f"{name}:{value}", 1, STATIC_BUCKETS)


def dynamic_feature(name: str, value: str) -> int:
    """Hashed id of an attribute of the event (``p`` price bucket, ``r`` rating, ``w`` word, ...)."""
    return _hash(f"{name}:{value}", STATIC_BUCKETS, FEATURE_BUCKETS)


def price_bucket(price: float) -> int:
    """Half-octave price bucket: 0 below 1, then 2 per doubling."""
    return int(2 * math.log2(price)) + 1 if price >= 1 else 0


def word_pieces(text: str, limit: int = MAX_WORDS) -> list[str]:
    """The first ``limit`` distinct lower-cased words of ``text``."""
    out: list[str] = []
    for m in _WORD.finditer(text.lower()):
        w = m.group()[:32]
        if w not in out:
            out.append(w)
            if len(out) == limit:
                break
    return out


def _features(
    category: str | None = None,
    brand: str | None = None,
    price: float | None = None,
    extra: tuple[str, str] | None = None,
    text: str = "",
) -> list[int]:
    feats = []
    if category:
        feats.append(static_feature("c", category))
    if brand:
        feats.append(static_feature("b", brand.lower()))
    if price is not None:
        feats.append(dynamic_feature("p", str(price_bucket(price))))
    if extra:
        feats.append(dynamic_feature(*extra))
    if text:
        feats.extend(
            dynamic_feature("w", w) for w in word_pieces(text, min(MAX_WORDS, MAX_FEATURES - len(feats)))
        )
    return feats[:MAX_FEATURES]


def event_tokens(event: AnyEvent) -> list[Token]:
    """The tokens one event contributes to a user's sequence."""
    t = int(event.event_time.timestamp())
    match event:
        case ViewEvent():
            fav = ("f", "1") if event.favorite else None
            return [
                (event.item_id, TokenKind.VIEW, t, _features(event.category, event.brand, event.price, fav))
            ]
        case CartEvent():
            kind = TokenKind.CART_ADD if event.action == "add" else TokenKind.CART_REMOVE
            feats = _features(event.category, event.brand, event.unit_price)
            return [(event.item_id, kind, t, feats)]
        case OrderEvent():
            return [
                (line.item_id, TokenKind.PURCHASE, t, _features(price=line.unit_price))
                for line in event.lines
            ]
        case ReviewEvent():
            text = f"{event.title} {event.text}" if event.title else event.text
            return [
                (event.item_id, TokenKind.REVIEW, t, _features(extra=("r", str(event.rating)), text=text))
            ]
        case SearchEvent():
            return [(event.clicked_item or "", TokenKind.SEARCH, t, _features(text=event.query))]
    raise TypeError(f"not an event: {type(event).__name__}")  # pragma: no cover


@dataclass(slots=True)
class UserState:
    """Everything the service remembers about one user."""

    seq: list[list[Any]] = field(default_factory=list)  # recent tokens, oldest first
    cart: dict[str, list[Any]] = field(default_factory=dict)  # item -> [quantity, unit_price|None]
    counts: dict[str, int] = field(default_factory=dict)  # event type -> count
    reviews: list[float] = field(default_factory=lambda: [0, 0.0, 0])  # [n, rating sum, n low]
    bought: dict[str, int] = field(default_factory=dict)  # item -> unix seconds of last purchase
    last_event_s: int = 0  # event time of the latest event
    recent_ids: list[str] = field(default_factory=list)  # idempotency window
    seen_ms: int = 0  # worker clock when last touched (drives expiry)
    # promotion bookkeeping (streams.promotions): "cart": [unix s, event id] of the last cart change
    # while the cart holds items; "order": unix s of the last order; "tz": UTC offset in minutes
    # when events carry one; "fired": unix s of recent promotions; "ids": recent promotion ids;
    # "done": cart event id already triggered; "p": last propensity; "abandoned": carts abandoned
    promo: dict[str, Any] = field(default_factory=dict)

    # --- serialisation -----------------------------------------------------------------------
    def dumps(self) -> bytes:
        body = orjson.dumps(
            {
                "seq": self.seq,
                "cart": self.cart,
                "counts": self.counts,
                "reviews": self.reviews,
                "bought": self.bought,
                "last": self.last_event_s,
                "ids": self.recent_ids,
                "promo": self.promo,
            }
        )
        return _SEEN.pack(self.seen_ms) + body

    @classmethod
    def loads(cls, raw: bytes) -> UserState:
        d = orjson.loads(raw[_SEEN.size :])
        return cls(
            seq=d["seq"],
            cart=d["cart"],
            counts=d["counts"],
            reviews=d["reviews"],
            bought=d["bought"],
            last_event_s=d["last"],
            recent_ids=d["ids"],
            seen_ms=_SEEN.unpack_from(raw)[0],
            promo=d.get("promo", {}),
        )

    def as_json(self) -> dict[str, Any]:
        """A readable view for the HTTP state endpoint and tests."""
        d = orjson.loads(self.dumps()[_SEEN.size :])
        d["seen_ms"] = self.seen_ms
        return d  # type: ignore[no-any-return]

    # --- the fold ----------------------------------------------------------------------------
    def apply(self, event: AnyEvent, now_ms: int, max_len: int) -> list[Token] | None:
        """Fold one event in and return its tokens; None (and no change) for an event id seen before."""
        if event.event_id in self.recent_ids:
            return None
        self.recent_ids.append(event.event_id)
        if len(self.recent_ids) > RECENT_IDS:
            del self.recent_ids[0]
        tokens = event_tokens(event)
        self.seq.extend(list(tok) for tok in tokens)
        if len(self.seq) > max_len:
            del self.seq[: len(self.seq) - max_len]
        kind = event.type if not isinstance(event, CartEvent) else f"cart_{event.action}"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        t = tokens[0][2]
        self.last_event_s = max(self.last_event_s, t)
        self.seen_ms = now_ms
        offset = event.event_time.utcoffset()
        if offset:
            self.promo["tz"] = int(offset.total_seconds() // 60)
        match event:
            case CartEvent(action="add"):
                line = self.cart.get(event.item_id)
                qty = event.quantity + (line[0] if line else 0)
                self.cart[event.item_id] = [qty, event.unit_price]
                if len(self.cart) > MAX_CART_LINES:
                    del self.cart[next(iter(self.cart))]
                self.promo["cart"] = [t, event.event_id]
            case CartEvent(action="remove"):
                line = self.cart.get(event.item_id)
                if line is not None:
                    if line[0] > event.quantity:
                        line[0] -= event.quantity
                    else:
                        del self.cart[event.item_id]
                if self.cart:
                    self.promo["cart"] = [t, event.event_id]
                else:
                    self.promo.pop("cart", None)
            case OrderEvent():
                self.promo["order"] = max(t, self.promo.get("order", 0))
                for order_line in event.lines:
                    self.cart.pop(order_line.item_id, None)
                    self.bought.pop(order_line.item_id, None)
                    self.bought[order_line.item_id] = t
                if not self.cart:
                    self.promo.pop("cart", None)
                while len(self.bought) > MAX_BOUGHT:
                    del self.bought[next(iter(self.bought))]
            case ReviewEvent():
                self.reviews[0] += 1
                self.reviews[1] += event.rating
                if event.rating <= LOW_RATING:
                    self.reviews[2] += 1
        return tokens

    def recent_items(self, n: int) -> list[str]:
        """The user's last ``n`` distinct items, most recent first."""
        out: list[str] = []
        for tok in reversed(self.seq):
            item = tok[0]
            if item and item not in out:
                out.append(item)
                if len(out) == n:
                    break
        return out


def seen_ms_of(raw: bytes) -> int:
    """The worker-clock last-seen time of a stored state, without decoding it."""
    return int(_SEEN.unpack_from(raw)[0])


def user_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (as Java's ``Utils.toPositive``)."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions
