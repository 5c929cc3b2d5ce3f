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

The cart does not depend on arrival order. A user's cart changes (shop.carts) and orders
(shop.orders) reach the worker interleaved in no particular order, so ``cart`` (item ->
``[quantity, unit_price|None]``) is a view derived per item from ``cart_base`` (its line as of
the compacted past) and ``cart_log`` (its changes ``[event ms, event id, op, qty, price]`` within
``REORDER_WINDOW_S`` of the user's latest event time), replayed in event-time order: add adds and
sets the price, remove subtracts down to 0, purchase (an order line) empties the line. Ties in
event time go add, remove, purchase (the likely causal order), then event id. Older entries are
folded into the base, in batches once the oldest is a quarter of the window past it. A change
that arrives after its time was folded is therefore applied as though just after the base,
before the item's changes in the window: an approximation only for changes more than the window
late, or for users changing more than ``MAX_CART_LOG`` times one item or ``MAX_LOGGED_ITEMS``
items within the window (their older changes are folded early, keeping the state small).
``promo["cart"]`` is ``[unix s, event id]`` of the latest add or remove by (event time, id), kept
while the cart holds items, so an abandonment timer does not depend on arrival order either.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from bisect import bisect_left
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
MAX_CART_LINES = 200  # items tracked per user (cart lines and recently emptied ones)
MAX_CART_LOG = 8  # changes kept per item in the reorder window; older ones join the base
MAX_LOGGED_ITEMS = 32  # items with changes kept; beyond, the longest kept log joins its base
REORDER_WINDOW_S = 3600  # cart changes this much older than the user's latest event are compacted
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

_NEVER = 1 << 62  # an event time (ms) later than any: "no cart log entry"
_RANK = {"add": 0, "remove": 1, "purchase": 2}  # order of cart changes with equal event times


def _event_ms(entry: list[Any]) -> int:
    return int(entry[0])


def _log_key(entry: list[Any]) -> tuple[int, int, str]:
    """Replay order of a cart log entry ``[event ms, event id, op, qty, price]``."""
    return entry[0], _RANK[entry[2]], entry[1]


def _replay(line: list[Any], entry: list[Any]) -> None:
    """Apply one cart log entry to an item's ``[quantity, unit_price]``."""
    op = entry[2]
    if op == "add":
        line[0] += entry[3]
        line[1] = entry[4]
    elif op == "remove":
        line[0] = max(0, line[0] - entry[3])
    else:  # purchase
        line[0] = 0


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
    # the cart's sources (module docstring): cart[item] = cart_base[item] replayed through
    # cart_log[item]; every tracked item has a base (possibly [0, None]), logs are never empty
    cart_base: dict[str, list[Any]] = field(default_factory=dict)  # item -> [quantity, unit_price]
    cart_log: dict[str, list[list[Any]]] = field(default_factory=dict)  # item -> sorted changes
    cart_changed: list[Any] = field(default_factory=list)  # [event ms, id] of the latest add/remove
    # a lower bound on the event times in cart_log (not stored): compact only when it is passed
    cart_log_min: int = field(default=_NEVER, compare=False, repr=False)
    counts: dict[str, int] = field(default_factory=dict)  # event type -> count
    reviews: list[float] = field(default_factory=lambda: [0, 0.0, 0])  # [n, rating sum, n low]
    bought: dict[str, int] = field(default_factory=dict)  # item -> unix seconds of last purchase
    last_event_s: int = 0  # event time of the latest event
    recent_ids: list[str] = field(default_factory=list)  # idempotency window
    seen_ms: int = 0  # worker clock when last touched (drives expiry)
    # promotion bookkeeping (streams.promotions): "cart": [unix s, event id] of the latest cart add
    # or remove by event time while the cart holds items; "order": unix s of the latest order;
    # "tz": UTC offset in minutes when events carry one; "fired": unix s of recent promotions;
    # "ids": recent promotion ids; "done": cart event id already triggered; "p": last propensity;
    # "abandoned": carts abandoned
    promo: dict[str, Any] = field(default_factory=dict)

    # --- serialisation -----------------------------------------------------------------------
    def dumps(self) -> bytes:
        body = orjson.dumps(
            {
                "seq": self.seq,
                "cart": self.cart,
                "cart_base": self.cart_base,
                "cart_log": self.cart_log,
                "cart_changed": self.cart_changed,
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
        promo = d.get("promo", {})
        if "cart_log" in d:
            base, log, changed = d["cart_base"], d["cart_log"], d["cart_changed"]
        else:  # stored before the cart log: its lines are the base, its last change the anchor
            base, log = {item: list(line) for item, line in d["cart"].items()}, {}
            anchor = promo.get("cart")
            changed = [anchor[0] * 1000, anchor[1]] if anchor else []
        return cls(
            seq=d["seq"],
            cart=d["cart"],
            cart_base=base,
            cart_log=log,
            cart_changed=changed,
            cart_log_min=min((entries[0][0] for entries in log.values()), default=_NEVER),
            counts=d["counts"],
            reviews=d["reviews"],
            bought=d["bought"],
            last_event_s=d["last"],
            recent_ids=d["ids"],
            seen_ms=_SEEN.unpack_from(raw)[0],
            promo=promo,
        )

    def as_json(self) -> dict[str, Any]:
        """A readable view for the HTTP state endpoint and tests."""
        d = orjson.loads(self.dumps()[_SEEN.size :])
        d["seen_ms"] = self.seen_ms
        return d  # type: ignore[no-any-return]

    # --- the fold ----------------------------------------------------------------------------
    def apply(
        self, event: AnyEvent, now_ms: int, max_len: int, *, window_s: float = REORDER_WINDOW_S
    ) -> list[Token] | None:
        """Fold one event in and return its tokens; None (and no change) for an event id seen before.

        Cart changes and orders within ``window_s`` of the user's latest event time fold to the
        same cart whatever their arrival order (module docstring)."""
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
            case CartEvent():
                ms = t * 1000 + event.event_time.microsecond // 1000
                price = event.unit_price if event.action == "add" else None
                self._change(event.item_id, [ms, event.event_id, event.action, event.quantity, price])
                if [ms, event.event_id] > self.cart_changed:
                    self.cart_changed = [ms, event.event_id]
                self._cart_anchor()
            case OrderEvent():
                ms = t * 1000 + event.event_time.microsecond // 1000
                self.promo["order"] = max(t, self.promo.get("order", 0))
                for order_line in event.lines:
                    item = order_line.item_id
                    self._change(item, [ms, event.event_id, "purchase", order_line.quantity, None])
                    self.bought.pop(item, None)
                    self.bought[item] = t
                self._cart_anchor()
                while len(self.bought) > MAX_BOUGHT:
                    del self.bought[next(iter(self.bought))]
            case ReviewEvent():
                self.reviews[0] += 1
                self.reviews[1] += event.rating
                if event.rating <= LOW_RATING:
                    self.reviews[2] += 1
        horizon = self.last_event_s * 1000 - int(window_s * 1000)
        if self.cart_log_min < horizon - int(window_s * 250):  # in batches: not a sweep per event
            self._compact(horizon)
        return tokens

    # --- the cart ----------------------------------------------------------------------------
    def _change(self, item: str, entry: list[Any]) -> None:
        """Insert one change into ``item``'s log at its event-time place and recompute the line."""
        log = self.cart_log.setdefault(item, [])
        key = _log_key(entry)
        i = bisect_left(log, key, key=_log_key)
        if i < len(log) and _log_key(log[i]) == key:
            return  # the same change again (a redelivery past ``RECENT_IDS``, a repeated order line)
        log.insert(i, entry)
        if item not in self.cart_base:
            self.cart_base[item] = [0, None]
            while len(self.cart_base) > MAX_CART_LINES:  # forget the item tracked the longest
                self._forget(next(iter(self.cart_base)))
        if len(log) > MAX_CART_LOG:
            self._fold(item, 1)
        while len(self.cart_log) > MAX_LOGGED_ITEMS:  # fold the log kept the longest
            oldest = next(iter(self.cart_log))
            self._fold(oldest, len(self.cart_log[oldest]))
        self.cart_log_min = min(self.cart_log_min, log[0][0])
        line = list(self.cart_base[item])
        for change in log:
            _replay(line, change)
        if line[0] > 0:
            self.cart[item] = line
        else:
            self.cart.pop(item, None)

    def _fold(self, item: str, n: int) -> None:
        """Fold the oldest ``n`` changes of ``item`` into its base; its cart line stays the same."""
        log, base = self.cart_log[item], self.cart_base[item]
        for entry in log[:n]:
            _replay(base, entry)
        del log[:n]
        if not log:
            del self.cart_log[item]
            if base[0] == 0:  # nothing left to remember
                del self.cart_base[item]

    def _forget(self, item: str) -> None:
        self.cart.pop(item, None)
        self.cart_base.pop(item, None)
        self.cart_log.pop(item, None)

    def _compact(self, horizon: int) -> None:
        """Fold the changes older than ``horizon`` (event ms) into their bases."""
        for item, log in list(self.cart_log.items()):
            self._fold(item, bisect_left(log, horizon, key=_event_ms))
        self.cart_log_min = min((log[0][0] for log in self.cart_log.values()), default=_NEVER)

    def _cart_anchor(self) -> None:
        """``promo["cart"]``: the latest add or remove while the cart holds items."""
        if not self.cart:
            self.promo.pop("cart", None)
        elif self.cart_changed:
            self.promo["cart"] = [self.cart_changed[0] // 1000, self.cart_changed[1]]

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
