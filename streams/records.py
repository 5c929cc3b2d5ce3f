"""The event contract, version 1: the JSON records shops publish and the service outputs.

One definition serves every path: shop backends and ``shopstream replay`` publish these inputs,
the worker validates them, and training reads the same JSON. ``shopstream schemas`` writes the
JSON Schema files in ``streams/schemas/`` for producers in other languages; a message passes them
exactly when the worker's decoder accepts it, apart from the deployment's own bounds (message size,
earliest event time, clock skew: the decoder's settings), which come on top.

Rules of the contract:
- Every input carries ``schema_version`` (1), ``type``, ``event_id`` (unique; the idempotency key),
  ``user_id``, optional ``session_id`` and ``event_time``.
- ``event_time`` is an RFC 3339 date-time (section 5.6): ``T`` (or ``t``), seconds, an optional
  fraction, ``Z`` (or ``z``) or an offset ``+hh:mm``/``-hh:mm``; no leap second ``:60``. Its date
  as written is 1970-01-02 to 2999-12-30, so that with any offset it lies within 1970-2999 UTC.
- Validation is strict: ``"3"`` is not a quantity and ``"1714550400"`` is not an event time. An
  integer field takes any integral JSON number (``2.0`` is 2, as JSON Schema's ``integer``), never
  ``true``. Unknown extra fields are ignored, so producers may add fields before the contract
  names them.
- The message is RFC 8259 JSON in UTF-8: no ``NaN`` or ``Infinity`` (not even in an ignored
  field), no lone surrogate, values nested at most ``JSON_MAX_DEPTH`` deep, at most
  ``JSON_MAX_INT_DIGITS`` digits before a number's point or exponent (the limits of pydantic's
  parser). A repeated member name: the last one counts (I-JSON says producers must not send any).
- Outputs are keyed by ``user_id`` and carry the id of the event that triggered them.

Besides the five behaviour events, two requests about a user share the envelope: an erasure
(forget the user) and a marketing consent (opt out of or back into promotions). They travel on
topics of their own and are validated like the events (``input_adapter`` reads all seven).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticKnownError

SCHEMA_VERSION = 1
JSON_MAX_DEPTH = 200  # pydantic's JSON parser (jiter) refuses a value inside more containers
JSON_MAX_INT_DIGITS = 4300  # ... and a number with more digits before its point or exponent

Id = Annotated[str, Field(min_length=1, max_length=128)]
ItemId = Annotated[str, Field(min_length=1, max_length=128, description="Product id (SKU).")]
Money = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
# the lengths keep "EUR\n" out: Python's re (JSON Schema validators in Python) lets $ match before it
Currency = Annotated[
    str, Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
]


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` is a mathematical one, so ``2.0`` is the integer 2; ``true`` is no
    number (pydantic's ``Literal[1]`` would take it, as ``True == 1``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool):
        raise PydanticKnownError("int_type")
    return value


Count = Annotated[int, BeforeValidator(_integral)]
Version = Annotated[Literal[1], BeforeValidator(_integral)]

# RFC 3339's date-time as the published schema's pattern, which the decoder matches too (with
# Python's re, as jsonschema does); written to mean the same in ECMA-262: [0-9] as \d is any Unicode
# digit in Python, and (?!\n) as Python's $ also matches before a trailing newline.
_TIME = (
    r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])(?!\n)$"
)
EVENT_TIME_PATTERN = r"^(?!1970-01-01|2999-12-31)(19[7-9][0-9]|2[0-9]{3})" + _TIME
_EVENT_TIME, _ANY_YEAR = re.compile(EVENT_TIME_PATTERN), re.compile(r"^[0-9]{4}" + _TIME)


def _event_time_text(value: Any) -> Any:
    """The text ``EVENT_TIME_PATTERN`` allows (pydantic alone would also read a string of digits as
    unix seconds or milliseconds, a space for ``T``, ``+0100``, no seconds). Other dates are
    impossible: no shop event happened before 1970 or after 3000, whatever the deployment's tighter
    bounds (the decoder's settings), and date arithmetic near year 1 or 9999 overflows downstream.
    The calendar (no February 30) is pydantic's check."""
    text = value.isoformat() if isinstance(value, datetime) else value
    if isinstance(text, str) and _EVENT_TIME.match(text):
        return value
    if isinstance(text, str) and _ANY_YEAR.match(text):
        raise PydanticCustomError(
            "impossible_value", "event_time {t} is not dated 1970-01-02 to 2999-12-30", {"t": text}
        )
    raise ValueError("expected RFC 3339 date-time text such as 2024-05-01T10:00:00Z")


# Lax parsing of what the check above let through (strict mode refuses text once a validator ran).
EventTime = Annotated[
    AwareDatetime,
    BeforeValidator(_event_time_text),
    Strict(False),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": EVENT_TIME_PATTERN}),
]


_R = TypeVar("_R")
# a JSON string, or NaN / Infinity outside of one (in text that pydantic's parser accepted)
_NON_FINITE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(NaN|Infinity)', re.DOTALL)


class Adapter(Generic[_R]):
    """A pydantic ``TypeAdapter`` whose JSON is RFC 8259: pydantic's parser also reads ``NaN``,
    ``Infinity`` and ``-Infinity``, which a number field refuses but an ignored field let through.
    In: JSON bytes or Python values. Out: the validated record, or a ``ValidationError``."""

    def __init__(self, tp: Any) -> None:
        self.adapter: TypeAdapter[_R] = TypeAdapter(tp)

    def validate_json(self, raw: bytes) -> _R:
        record = self.adapter.validate_json(raw)
        if (b"NaN" in raw or b"Infinity" in raw) and any(m[1] for m in _NON_FINITE.finditer(raw)):
            error = "NaN and Infinity are no JSON"
            details: InitErrorDetails = {
                "type": "json_invalid",
                "loc": (),
                "input": raw,
                "ctx": {"error": error},
            }
            raise ValidationError.from_exception_data("JSON", [details])
        return record

    def validate_python(self, value: Any) -> _R:
        return self.adapter.validate_python(value)


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    schema_version: Version = Field(description="Version of this contract.")
    event_id: Id = Field(description="Unique id of the event; the idempotency key.")
    user_id: Id = Field(description="The shop's id of the user (or a stable anonymous id).")
    session_id: Id | None = Field(None, description="The shop's session id, when known.")
    event_time: EventTime = Field(
        description="When it happened: RFC 3339 with Z or an offset, dated 1970-01-02 to 2999-12-30."
    )


class SearchEvent(_Event):
    """A search: the query text, optionally what was shown and what was clicked."""

    type: Literal["search"]
    query: str = Field(max_length=512)
    results: list[ItemId] = Field(default_factory=list, max_length=200)
    clicked_item: ItemId | None = None


class ViewEvent(_Event):
    """A product page view."""

    type: Literal["view"]
    item_id: ItemId
    category: str | None = Field(None, max_length=256)
    brand: str | None = Field(None, max_length=256)
    price: Money | None = None
    currency: Currency | None = None
    favorite: bool = Field(False, description="The user saved the item (wishlist / favourite).")


class CartEvent(_Event):
    """An item added to or removed from the cart."""

    type: Literal["cart"]
    action: Literal["add", "remove"]
    item_id: ItemId
    quantity: Count = Field(ge=1, le=10_000)
    unit_price: Money | None = None
    currency: Currency | None = None
    category: str | None = Field(None, max_length=256)
    brand: str | None = Field(None, max_length=256)


class OrderLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    item_id: ItemId
    quantity: Count = Field(ge=1, le=10_000)
    unit_price: Money | None = None


class OrderEvent(_Event):
    """A placed order."""

    type: Literal["order"]
    order_id: Id
    lines: list[OrderLine] = Field(min_length=1, max_length=1000)
    total: Money | None = None
    currency: Currency | None = None


class ReviewEvent(_Event):
    """A product review with a 1-5 rating and text."""

    type: Literal["review"]
    item_id: ItemId
    rating: Count = Field(ge=1, le=5)
    text: str = Field("", max_length=20_000)
    title: str | None = Field(None, max_length=512)


Event = Annotated[SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent, Field(discriminator="type")]
EVENT_TYPES: dict[str, type[_Event]] = {
    "search": SearchEvent,
    "view": ViewEvent,
    "cart": CartEvent,
    "order": OrderEvent,
    "review": ReviewEvent,
}
event_adapter: Adapter[SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent] = Adapter(Event)


# --- requests about a user (privacy), on their own topics, applied in order with the user's events
class ErasureEvent(_Event):
    """Forget this user: the worker deletes every per-user state it holds (``shop.erasures``)."""

    type: Literal["erasure"]


class ConsentEvent(_Event):
    """The user's marketing consent (``shop.consents``): ``false`` stops promotions to them,
    ``true`` allows them again; recommendations go on either way."""

    type: Literal["consent"]
    marketing: bool = Field(description="Whether the user may receive promotions.")


CONTROL_TYPES: dict[str, type[_Event]] = {"erasure": ErasureEvent, "consent": ConsentEvent}
INPUT_TYPES: dict[str, type[_Event]] = {**EVENT_TYPES, **CONTROL_TYPES}  # every input topic's type
Input = Annotated[
    SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent | ErasureEvent | ConsentEvent,
    Field(discriminator="type"),
]
input_adapter: Adapter[
    SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent | ErasureEvent | ConsentEvent
] = Adapter(Input)


# --- outputs -----------------------------------------------------------------------------------
class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    user_id: Id


class ScoredItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: ItemId
    score: float = Field(description="Higher is better; comparable within one recommendation.")


class Recommendation(_Output):
    """Ranked items for a user, published on every input event (``shop.recommendations``)."""

    event_id: Id = Field(description="The input event that triggered this recommendation.")
    event_type: Literal["search", "view", "cart", "order", "review"]
    event_time: datetime
    items: list[ScoredItem] = Field(description="Best first; may be empty for a brand-new shop.")
    source: Literal["model", "baseline"] = Field(description="Which recommender produced the list.")
    model_version: str = Field(description="Model version, or the baseline's version.")
    generated_at: datetime


class Offer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["reminder", "percent_off", "free_shipping", "service_recovery"]
    value: float = Field(0.0, ge=0, description="Percent for percent_off, else 0.")
    currency: Currency | None = None


class Promotion(_Output):
    """A promotion trigger for CRM tools (``shop.promotions``)."""

    promotion_id: Id = Field(description="Deterministic: the same input never yields two ids.")
    kind: Literal[
        "cart_abandonment", "browse_abandonment", "review_recovery", "high_intent", "price_sensitivity"
    ]
    reason: str = Field(max_length=512)
    trigger_event_id: Id
    items: list[ItemId]
    offer: Offer
    scores: dict[str, float] = Field(description="The scores that drove the decision.")
    holdout: bool = Field(description="True: logged for uplift measurement, not to be sent.")
    created_at: datetime
    expires_at: datetime
    model_version: str


class PromotionOutcome(_Output):
    """What a promotion achieved (``shop.promotion-outcomes``): the user's first order within its
    attribution window, or none; one record per promotion id (``streams.attribution``)."""

    promotion_id: Id = Field(description="The promotion this outcome belongs to.")
    kind: Literal[
        "cart_abandonment", "browse_abandonment", "review_recovery", "high_intent", "price_sensitivity"
    ]
    offer: Offer = Field(description="The offer as decided (after the discount budget).")
    holdout: bool = Field(description="True: the promotion was logged for the holdout group, not sent.")
    promoted_at: datetime = Field(description="Event time of the decision; the window starts here.")
    window_end: datetime = Field(description="End of the attribution window (event time).")
    converted: bool = Field(description="An order of the user fell inside the window.")
    order_id: Id | None = Field(description="The converting order, else null.")
    order_event_id: Id | None = Field(description="Event id of the converting order, else null.")
    converted_at: datetime | None = Field(description="Event time of the converting order, else null.")
    revenue_items: float = Field(
        ge=0, description="The order's lines of the promoted items (quantity x price)."
    )
    revenue_order: float = Field(ge=0, description="The whole order: its total, else the sum of its lines.")
    discount_cost: float = Field(
        ge=0, description="The offer's percent of revenue_items for a sent percent_off offer, else 0."
    )
    currency: Currency | None = Field(description="The order's currency, when it gave one.")
    closed_by: Literal["order", "window", "capacity"] = Field(
        description="order: converted; window: the window ended without an order; capacity: closed early "
        "because the user had too many open windows (leave these out of reports)."
    )
    model_version: str = Field(description="The model version (or rules) that decided the promotion.")


OUTPUT_TYPES: dict[str, type[BaseModel]] = {
    "recommendation": Recommendation,
    "promotion": Promotion,
    "promotion-outcome": PromotionOutcome,
}
