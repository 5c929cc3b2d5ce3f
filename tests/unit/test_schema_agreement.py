"""The decoder and the published JSON Schemas accept and refuse the same inputs.

The decoder gets wide deployment bounds (size, earliest time, clock skew are not in the schemas);
the schema side is the topic's type's schema file, with format checking, after the reference JSON
parse (``tests.fuzzing.reference_json``). Inputs: every bad-input category of ``tests/fuzzing.py``
and generators aimed at the spots where the two used to differ.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.decode import EventDecoder
from streams.records import JSON_MAX_DEPTH, CartEvent, ReviewEvent
from streams.settings import Settings
from streams.sources.datasets import load
from tests.fuzzing import (
    ACCEPTED,
    CATEGORIES,
    CONTROL,
    CURRENCIES,
    VALID,
    Case,
    Event,
    Fuzzer,
    agreement,
    outcome,
    schema_accepts,
)

WIDE = EventDecoder(max_bytes=1 << 40, min_event_time="1970-01-01T00:00:00Z", max_clock_skew_s=1e11)
NOW = time.time()
REAL = list(load("rees46-demo", Settings().datasets_dir))  # real views, carts and orders
SEEDS: list[Event] = [*VALID.values(), *CONTROL.values(), *REAL[::50]]
QUICK = tuple(c for c in CATEGORIES if c != "huge_string")  # 1 MiB strings: a size bound, slow
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
tried: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def count_inputs() -> Iterator[None]:
    yield
    print(f"\nschema agreement: {sum(tried.values())} inputs compared")  # shown by pytest -s


def check(raw: bytes, topic: str, category: str = "targeted") -> str:
    """The decoder's answer, after asserting that the schema of ``topic`` agrees with it."""
    got = outcome(WIDE, Case(category, raw, topic, None))
    tried[category] += 1
    assert (got == ACCEPTED) == schema_accepts(raw, topic), f"decoder: {got}, schema disagrees: {raw!r:.400}"
    return got


def event(etype: str, **fields: Any) -> bytes:
    """The valid event of ``etype`` with ``fields`` set, as Python's json writes it (which writes
    big integers, and ``NaN`` and ``Infinity`` for non-finite floats)."""
    return json.dumps({**(CONTROL | VALID)[etype], **fields}).encode()


@PROPERTY
@given(category=st.sampled_from(QUICK), seed=st.sampled_from(SEEDS), rnd=st.randoms(use_true_random=False))
def test_every_category_of_bad_input_gets_the_same_answer(category: str, seed: Event, rnd: Any) -> None:
    case = Fuzzer(rnd, WIDE).case(category, seed, NOW)
    assert case.raw is not None or category == "empty"
    check(case.raw or b"", case.topic_type, category)


numbers = st.one_of(
    st.integers(-3, 10_003),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-3, 10_003).map(float),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@PROPERTY
@given(field=st.sampled_from(["schema_version", "quantity", "rating", "line"]), value=numbers)
def test_integer_fields_take_integral_numbers_only(field: str, value: Any) -> None:
    if field == "line":
        check(event("order", lines=[{"item_id": "i", "quantity": value}]), "order")
    else:
        etype = {"schema_version": "consent", "quantity": "cart", "rating": "review"}[field]
        check(event(etype, **{field: value}), etype)


OFFSETS = st.one_of(
    st.just(UTC),
    st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-(24 * 60 - 1), 24 * 60 - 1)),
)
LOOSE_TIME = (  # RFC 3339's shape, each part a little too wide or optional: near misses
    r"[0-9]{4}-[0-9]{1,2}-[0-9]{2}[Tt _]?[0-9]{2}:[0-9]{2}(:[0-9]{2})?([.,][0-9]{0,10})?"
    r"([Zz]|[+-][0-9]{2}(:?[0-9]{2})?|UTC)?\n?"
)


@PROPERTY
@given(
    text=st.one_of(
        st.builds(
            lambda t, sep, spec: t.isoformat(sep=sep, timespec=spec),
            st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=OFFSETS),
            st.sampled_from(["T", "t", " "]),
            st.sampled_from(["auto", "minutes", "seconds", "milliseconds", "microseconds"]),
        ),
        st.datetimes(min_value=datetime(1969, 12, 30), max_value=datetime(1970, 1, 3), timezones=OFFSETS).map(
            datetime.isoformat
        ),
        st.datetimes(min_value=datetime(2999, 12, 29), max_value=datetime(3000, 1, 2), timezones=OFFSETS).map(
            datetime.isoformat
        ),
        st.from_regex(LOOSE_TIME, fullmatch=True),
        st.text(max_size=30),
    ),
    etype=st.sampled_from(["view", "erasure"]),
)
def test_event_times_are_rfc3339_on_both_sides(text: str, etype: str) -> None:
    check(event(etype, event_time=text), etype)


@PROPERTY
@given(
    code=st.one_of(
        st.sampled_from(CURRENCIES),
        st.from_regex(r"\A\n?[A-Za-z]{2,4}\n?\Z"),
        st.text(max_size=4),
    ),
    etype=st.sampled_from(["view", "cart", "order"]),
)
def test_currencies_are_three_capital_letters_on_both_sides(code: str, etype: str) -> None:
    check(event(etype, currency=code), etype)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@PROPERTY
@given(
    etype=st.sampled_from(["erasure", "consent"]),
    marketing=st.one_of(st.booleans(), json_values),
    extra=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    drop=st.sampled_from([None, "marketing", "user_id", "event_time", "type", "schema_version"]),
    topic=st.sampled_from(["erasure", "consent", "view"]),
)
def test_privacy_requests_get_the_same_answer(
    etype: str, marketing: Any, extra: dict[str, Any], drop: str | None, topic: str
) -> None:
    body = {**extra, **CONTROL[etype], "marketing": marketing}
    if drop is not None:
        body.pop(drop, None)
    check(json.dumps(body).encode(), topic)


def test_a_seeded_run_of_every_category_has_no_disagreement() -> None:
    """What ``bench/fuzz_decoders.py --agreement`` runs at length."""
    counts, disagreements = agreement(WIDE, SEEDS, 1500, seed=0, now=NOW, categories=QUICK)
    tried.update(counts)
    assert sum(counts.values()) == 1500 and set(counts) == set(QUICK)
    assert not disagreements, [(c.category, got, c.raw) for c, got in disagreements[:5]]


# --- known answers: one per fix ------------------------------------------------------------------
def splice(etype: str, field: str, token: bytes) -> bytes:
    return event(etype, **{field: "MARK"}).replace(b'"MARK"', token)


def deep(n: int) -> bytes:
    """A view with an extra field of ``n`` nested arrays: its innermost value ``n`` deep."""
    return splice("view", "x", b"[" * n + b"]" * n)


@pytest.mark.parametrize(
    ("raw", "topic", "accepted"),
    [
        (splice("cart", "quantity", b"2.0"), "cart", True),
        (splice("cart", "quantity", b"20e-1"), "cart", True),
        (splice("cart", "quantity", b"2.5"), "cart", False),
        (splice("cart", "quantity", b"true"), "cart", False),
        (splice("cart", "quantity", b'"3"'), "cart", False),
        (splice("cart", "quantity", b"1e300"), "cart", False),
        (splice("review", "rating", b"5.0"), "review", True),
        (splice("view", "schema_version", b"1.0"), "view", True),
        (splice("view", "schema_version", b"true"), "view", False),
        (event("view", event_time="2024-05-01T10:00:00+0100"), "view", False),
        (event("view", event_time="2024-05-01T10:00+01:00"), "view", False),
        (event("view", event_time="2024-05-01 10:00:00Z"), "view", False),
        (event("view", event_time="2024-05-01T10:00:00,5Z"), "view", False),
        (event("view", event_time="2016-12-31T23:59:60Z"), "view", False),
        (event("view", event_time="2024-05-01T10:00:00Z\n"), "view", False),
        (event("view", event_time="2024-05-01T10:00:00.123456789-00:00"), "view", True),
        (event("view", event_time="2024-05-01t10:00:00z"), "view", True),
        (event("view", event_time="1970-01-02T00:00:00+23:59"), "view", True),
        (event("view", event_time="1970-01-01T00:30:00+01:00"), "view", False),
        (event("view", event_time="2999-12-30T23:59:59-23:59"), "view", True),
        (event("view", event_time="2999-12-31T00:00:00Z"), "view", False),
        (event("view", currency="EUR"), "view", True),
        (event("view", currency="EUR\n"), "view", False),
        (splice("view", "x", b"NaN"), "view", False),
        (splice("view", "x", b"-Infinity"), "view", False),
        (splice("view", "x", b"1e999"), "view", True),
        (splice("view", "x", b'"NaN and -Infinity"'), "view", True),
        (splice("view", "x", b'"\\ud800"'), "view", False),
        (splice("view", "x", b"1" * 4300), "view", True),
        (splice("view", "x", b"1" * 4301 + b".5"), "view", False),
        (deep(JSON_MAX_DEPTH), "view", True),
        (deep(JSON_MAX_DEPTH + 1), "view", False),
        (event("cart", quantity="MARK").replace(b'"MARK"', b'"x","quantity":2'), "cart", True),
        (event("cart", quantity="MARK").replace(b'"MARK"', b'2,"quantity":"x"'), "cart", False),
        (event("consent", marketing=True), "consent", True),
        (event("consent", marketing=1), "consent", False),
        (event("erasure"), "erasure", True),
        (event("erasure", event_time="2024-05-01T10:00:00+0100"), "erasure", False),
    ],
)
def test_known_answers(raw: bytes, topic: str, accepted: bool) -> None:
    assert (check(raw, topic) == ACCEPTED) is accepted


def test_integral_numbers_decode_as_integers() -> None:
    cart = WIDE.decode(splice("cart", "quantity", b"2.0"), "cart")
    review = WIDE.decode(splice("review", "rating", b"5e0"), "review")
    assert isinstance(cart, CartEvent) and type(cart.quantity) is int and cart.quantity == 2
    assert isinstance(review, ReviewEvent) and type(review.rating) is int and review.rating == 5


def test_of_a_repeated_name_the_last_value_counts() -> None:
    raw = event("view", item_id="MARK").replace(b'"MARK"', b'"first","item_id":"last"')
    assert WIDE.decode(raw, "view").model_dump()["item_id"] == "last"
