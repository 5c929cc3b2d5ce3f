"""The event contract, version 1: the JSON records shops publish and the service outputs.

One definition serves every path: shop backends and ``shopstream replay`` publish these inputs,
the worker validates them, and training reads the same JSON. ``shopstream schemas`` writes the
JSON Schema files in ``streams/schemas/`` for producers in other languages.

Rules of the contract:
- Every input carries ``schema_version`` (1), ``type``, ``event_id`` (unique; the idempotency key),
  ``user_id``, optional ``session_id`` and ``event_time`` (RFC 3339 with a zone offset).
- Validation is strict: ``"3"`` is not a quantity and ``"1714550400"`` is not an event time.
  Unknown extra fields are ignored, so producers may add fields before the contract names them.
- Outputs are keyed by ``user_id`` and carry the id of the event that triggered them.

Besides the five behaviour events, two requests about a user share the envelope: an erasure
(forget the user) and a marketing consent (opt out of or back into promotions). They travel on
topics of their own and are validated like the events (``input_adapter`` reads all seven).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
)
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1

Id = Annotated[str, Field(min_length=1, max_length=128)]
ItemId = Annotated[str, Field(min_length=1, max_length=128, description="Product id (SKU).")]
Money = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")]
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]")


def _date_time_text(value: Any) -> Any:
    """An event time is date-time text (or a datetime): pydantic alone would also read a string of
    digits as unix seconds or milliseconds, guessing which from its size."""
    if isinstance(value, datetime) or (isinstance(value, str) and _DATE_TIME.match(value)):
        return value
    raise ValueError("expected RFC 3339 date-time text such as 2024-05-01T10:00:00Z")


EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(3000, 1, 1, tzinfo=UTC)


def _plausible(value: datetime) -> datetime:
    """No shop event happened before 1970 or after 3000, whatever the deployment's tighter bounds
    (the decoder's settings); date arithmetic near year 1 or 9999 overflows downstream."""
    if not EARLIEST <= value < LATEST:
        raise PydanticCustomError(
            "impossible_value", "event_time {t} is before 1970 or after 3000", {"t": str(value)}
        )
    return value


# Lax parsing of what the check above let through (strict mode refuses text once a validator ran).
EventTime = Annotated[
    AwareDatetime, BeforeValidator(_date_time_text), Strict(False), AfterValidator(_plausible)
]


def _integer(value: Any) -> Any:
    """An int literal compares equal to ``true`` and ``1.0``, which pydantic then accepts even in
    strict mode."""
    if isinstance(value, bool | float):
        raise ValueError("expected an integer")
    return value


Version = Annotated[Literal[1], BeforeValidator(_integer)]


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    schema_version: Version = Field(description="Version of this contract.")
    event_id: Id = Field(description="Unique id of the event; the idempotency key.")
    user_id: Id = Field(description="The shop's id of the user (or a stable anonymous id).")
    session_id: Id | None = Field(None, description="The shop's session id, when known.")
    event_time: EventTime = Field(description="When it happened, RFC 3339 with offset.")


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
    quantity: int = Field(ge=1, le=10_000)
    unit_price: Money | None = None
    currency: Currency | None = None
    category: str | None = Field(None, max_length=256)
    brand: str | None = Field(None, max_length=256)


class OrderLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    item_id: ItemId
    quantity: int = Field(ge=1, le=10_000)
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
    rating: int = Field(ge=1, le=5)
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
event_adapter: TypeAdapter[SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent] = TypeAdapter(
    Event
)


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
input_adapter: TypeAdapter[
    SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent | ErasureEvent | ConsentEvent
] = TypeAdapter(Input)


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


OUTPUT_TYPES: dict[str, type[BaseModel]] = {"recommendation": Recommendation, "promotion": Promotion}
