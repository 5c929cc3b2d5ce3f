"""Raw Kafka message bytes -> a validated event of the contract, or ``RejectedInput``.

In: the value bytes of a message from an input topic and the event type that topic carries.
Out: a ``SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent`` (``decode``), or also an
``ErasureEvent | ConsentEvent`` from the privacy topics (``decode_input``, the worker's router);
every failure is a ``RejectedInput`` with a bounded reason, which the worker dead-letters.
It accepts what the published JSON Schemas (``streams/schemas/``) accept, within the deployment's
bounds on top: message size, earliest event time, clock skew.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError

from streams.errors import RejectedInput, RejectReason
from streams.records import (
    CartEvent,
    ConsentEvent,
    ErasureEvent,
    OrderEvent,
    ReviewEvent,
    SearchEvent,
    ViewEvent,
    input_adapter,
)

if TYPE_CHECKING:
    from streams.settings import Settings

AnyEvent = SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent
ControlEvent = ErasureEvent | ConsentEvent  # requests about a user rather than their behaviour
AnyInput = AnyEvent | ControlEvent


class EventDecoder:
    """Validates input messages against the contract and its plausibility bounds."""

    def __init__(self, *, max_bytes: int, min_event_time: str, max_clock_skew_s: float) -> None:
        self.max_bytes = max_bytes
        self.min_ts = datetime.fromisoformat(min_event_time.replace("Z", "+00:00")).timestamp()
        self.max_skew = max_clock_skew_s

    @classmethod
    def from_settings(cls, settings: Settings) -> EventDecoder:
        """The decoder with the deployment's bounds: the worker's and the archiver's are the same."""
        return cls(
            max_bytes=settings.max_message_bytes,
            min_event_time=settings.min_event_time,
            max_clock_skew_s=settings.max_clock_skew_s,
        )

    def decode(self, raw: bytes | None, expected_type: str | None) -> AnyEvent:
        """A behaviour event; an erasure or consent request is on the wrong topic here."""
        event = self.decode_input(raw, expected_type)
        if isinstance(event, ErasureEvent | ConsentEvent):
            raise RejectedInput(
                RejectReason.WRONG_TOPIC, f"a {event.type!r} request where behaviour events are expected"
            )
        return event

    def decode_input(self, raw: bytes | None, expected_type: str | None) -> AnyInput:
        """Any input of the contract: a behaviour event or a request about a user."""
        if not raw:
            raise RejectedInput(RejectReason.EMPTY, "message has no value")
        if len(raw) > self.max_bytes:
            raise RejectedInput(RejectReason.OVERSIZED, f"{len(raw)} bytes > limit {self.max_bytes}")
        try:
            event = input_adapter.validate_json(raw)
        except ValidationError as exc:
            raise rejection(exc) from None
        if expected_type is not None and event.type != expected_type:
            raise RejectedInput(
                RejectReason.WRONG_TOPIC, f"a {event.type!r} event on a topic of {expected_type!r} events"
            )
        ts = event.event_time.timestamp()
        if ts < self.min_ts:
            raise RejectedInput(RejectReason.IMPOSSIBLE_VALUE, f"event_time {event.event_time} too old")
        if ts > time.time() + self.max_skew:
            raise RejectedInput(RejectReason.IMPOSSIBLE_VALUE, f"event_time {event.event_time} in the future")
        return event


def rejection(exc: ValidationError) -> RejectedInput:
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return RejectedInput(RejectReason.INVALID_JSON, errors[0]["msg"])
    if all(e["type"] == "impossible_value" for e in errors):  # the contract's own time bounds
        return RejectedInput(RejectReason.IMPOSSIBLE_VALUE, errors[0]["msg"])
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
    return RejectedInput(RejectReason.SCHEMA, detail)
