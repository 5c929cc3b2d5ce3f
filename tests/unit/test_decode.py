"""The contract's validation: every kind of bad input is a RejectedInput with the right reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from streams.decode import EventDecoder
from streams.errors import RejectedInput, RejectReason
from tests.fuzzing import VALID

decoder = EventDecoder(max_bytes=4096, min_event_time="2000-01-01T00:00:00Z", max_clock_skew_s=86400)


@pytest.mark.parametrize("etype", list(VALID))
def test_valid_events_decode_on_their_topic(etype: str) -> None:
    event = decoder.decode(orjson.dumps(VALID[etype]), etype)
    assert event.type == etype and event.user_id == "u1"
    assert event.event_time.utcoffset() is not None


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decoder.decode(orjson.dumps({**VALID["view"], "new_field": [1, 2]}), "view").type == "view"


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"quantity": 2.0}, lambda e: type(e.quantity) is int and e.quantity == 2),  # JSON Schema's integer
        ({"quantity": 1e4}, lambda e: e.quantity == 10_000),
        ({"schema_version": 1.0}, lambda e: e.schema_version == 1),
        ({"event_time": "2024-05-01t10:00:00.123456789z"}, lambda e: e.event_time.microsecond == 123456),
        (
            {"event_time": "2024-05-01T10:00:00-00:00"},
            lambda e: e.event_time.utcoffset().total_seconds() == 0,
        ),
        ({"event_time": "2024-05-01T10:00:00+23:59"}, lambda e: e.event_time.hour == 10),
        ({"currency": "EUR"}, lambda e: e.currency == "EUR"),
    ],
)
def test_what_json_schema_accepts_decodes(fields: dict[str, Any], check: Callable[[Any], bool]) -> None:
    assert check(decoder.decode(orjson.dumps({**VALID["cart"], **fields}), "cart"))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", RejectReason.EMPTY),
        (None, RejectReason.EMPTY),
        (b"x" * 5000, RejectReason.OVERSIZED),
        (b"{", RejectReason.INVALID_JSON),
        (b"\xff\xfe", RejectReason.INVALID_JSON),
        (b"[1, 2]", RejectReason.SCHEMA),
        (b'"a string"', RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "type": "wishlist"}), RejectReason.SCHEMA),
        (orjson.dumps({k: v for k, v in VALID["view"].items() if k != "user_id"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "schema_version": 2}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2024-05-01T10:00:00"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["cart"], "quantity": "2"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["cart"], "quantity": 2.5}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["cart"], "quantity": True}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "schema_version": True}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "schema_version": 1.5}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["cart"], "quantity": 0}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["cart"], "unit_price": -1.0}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["review"], "rating": 6}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["order"], "lines": []}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "user_id": ""}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "currency": "euro"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "currency": "EUR\n"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2024-05-01T10:00:00+0100"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2024-05-01T10:00+01:00"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2024-05-01 10:00:00Z"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2024-05-01T10:00:00,5Z"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2016-12-31T23:59:60Z"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2024-05-01T10:00:00Z\n"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "2024-02-30T10:00:00Z"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "x": "MARK"}).replace(b'"MARK"', b"NaN"), RejectReason.INVALID_JSON),
        (
            orjson.dumps({**VALID["view"], "x": "MARK"}).replace(b'"MARK"', b"Infinity"),
            RejectReason.INVALID_JSON,
        ),
        (b'{"price": 1e999}', RejectReason.SCHEMA),
        (
            orjson.dumps({**VALID["view"], "event_time": "1999-12-31T23:59:59Z"}),
            RejectReason.IMPOSSIBLE_VALUE,
        ),
        (
            orjson.dumps({**VALID["view"], "event_time": "2999-01-01T00:00:00Z"}),
            RejectReason.IMPOSSIBLE_VALUE,
        ),
        (  # the contract's dates, whatever the deployment's bounds: 1970-01-02 to 2999-12-30 as written
            orjson.dumps({**VALID["view"], "event_time": "1970-01-01T23:00:00-01:00"}),
            RejectReason.IMPOSSIBLE_VALUE,
        ),
        (
            orjson.dumps({**VALID["view"], "event_time": "0000-01-01T00:00:00Z"}),
            RejectReason.IMPOSSIBLE_VALUE,
        ),
        (orjson.dumps(VALID["cart"]), RejectReason.WRONG_TOPIC),
        (b"[" * 3000 + b"]" * 3000, RejectReason.OVERSIZED),
        (b"[" * 2000 + b"]" * 2000, RejectReason.INVALID_JSON),
    ],
)
def test_bad_input_is_rejected_with_its_reason(raw: bytes | None, reason: RejectReason) -> None:
    with pytest.raises(RejectedInput) as info:
        decoder.decode(raw, "view")
    assert info.value.reason == reason
