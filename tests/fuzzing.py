"""Bad input for the decoders, by category: the generators the property tests and the fuzz run share.

In: a valid contract event (a dict, as ``streams.replay`` publishes it), a ``random.Random`` and the
decoder's limits. Out: a ``Case`` - the value bytes of one input message, the event type of the
topic it is sent on, its category and the outcomes the contract allows for it (``ACCEPTED`` or a
``RejectReason``; ``None`` where anything but a crash is fine, as for random bytes).

Driven by hypothesis (``st.randoms()``) the cases shrink; driven by a seeded ``Random`` they are
fast and reproducible (``bench/fuzz_decoders.py``). ``schema_accepts`` is the other side of the
contract: the published JSON Schema of the topic's type after the reference JSON parse, which the
decoder must agree with (``agreement``).
"""

from __future__ import annotations

import calendar
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from streams.decode import EventDecoder
from streams.errors import RejectedInput, RejectReason
from streams.records import (
    CONTROL_TYPES,
    INPUT_TYPES,
    JSON_MAX_DEPTH,
    JSON_MAX_INT_DIGITS,
    OrderLine,
)
from streams.schemas import SCHEMA_DIR

Event = dict[str, Any]
Path = tuple[str | int, ...]

ACCEPTED = "ok"
EMPTY, OVERSIZED, INVALID_JSON = RejectReason.EMPTY, RejectReason.OVERSIZED, RejectReason.INVALID_JSON
SCHEMA, WRONG_TOPIC, IMPOSSIBLE = RejectReason.SCHEMA, RejectReason.WRONG_TOPIC, RejectReason.IMPOSSIBLE_VALUE
MARK = "\u2603FUZZ\u2603"  # placeholder in a serialised event, replaced by raw bytes
MEBIBYTE = 1 << 20


def template(etype: str, **fields: Any) -> Event:
    return {
        "schema_version": 1,
        "type": etype,
        "event_id": "e1",
        "user_id": "u1",
        "event_time": "2024-05-01T10:00:00+02:00",
        **fields,
    }


VALID: dict[str, Event] = {
    "search": template("search", query="rote schuhe", results=["a", "b"], clicked_item="b"),
    "view": template("view", item_id="i1", price=9.99, currency="EUR", category="shoes"),
    "cart": template("cart", action="remove", item_id="i1", quantity=2, unit_price=3.5),
    "order": template("order", order_id="o1", lines=[{"item_id": "i1", "quantity": 1}], total=3.5),
    "review": template("review", item_id="i1", rating=5, text="great"),
}
CONTROL: dict[str, Event] = {"erasure": template("erasure"), "consent": template("consent", marketing=False)}


@dataclass(frozen=True)
class Spec:
    """What the contract wants in one field: the JSON shape, a length or value range, free text."""

    kind: str  # int | money | str | time | bool | list
    max_length: int | None = None
    free: bool = False  # any string up to max_length is valid (no literal, pattern or format)
    lo: float | None = None
    hi: float | None = None


MONEY = Spec("money", lo=0, hi=1e9)
ID = Spec("str", 128, free=True)
FIELDS: dict[str, Spec] = {
    "schema_version": Spec("int", lo=1, hi=1),
    "type": Spec("str"),
    "event_id": ID,
    "user_id": ID,
    "session_id": ID,
    "event_time": Spec("time"),
    "query": Spec("str", 512, free=True),
    "results": Spec("list"),
    "clicked_item": ID,
    "item_id": ID,
    "category": Spec("str", 256, free=True),
    "brand": Spec("str", 256, free=True),
    "price": MONEY,
    "currency": Spec("str"),
    "favorite": Spec("bool"),
    "action": Spec("str"),
    "quantity": Spec("int", lo=1, hi=10_000),
    "unit_price": MONEY,
    "order_id": ID,
    "lines": Spec("list"),
    "total": MONEY,
    "rating": Spec("int", lo=1, hi=5),
    "text": Spec("str", 20_000, free=True),
    "title": Spec("str", 512, free=True),
}
CONTROL_FIELDS = {"marketing": Spec("bool")}
JSON_KINDS = {"int": {"int"}, "money": {"int", "float"}, "str": {"str"}, "time": {"str"}}
WRONG_VALUES: dict[str, list[Any]] = {
    "null": [None],
    "bool": [True, False],
    "int": [0, 1, -1, 7, 2**53],
    "float": [1.5, 0.5, -2.5, 1e300],  # (1.0 is an integer, as in JSON Schema)
    "str": ["", "3", "true", "null", "2024-05-01T10:00:00Z"],
    "list": [[], [1], ["a"]],
    "obj": [{}, {"k": 1}],
}
INVALID_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded in UTF-8
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",  # truncated sequence
    b"\x00",  # control characters must be escaped inside JSON strings
    b"\n",
    b"\\ud800",  # lone surrogates, escaped
    b"\\udfff",
    b"\\udbff\\u0041",
    b"\\ude00\\ud83d",
    b"\\ud800\\ud800",
    b"\\uZZZZ",
    b"\\u12",
    b"\\q",
]
ODD_UNICODE = [
    "\x00",
    "\x7f",
    "\u0085",
    "\u00a0",
    "\u200b",
    "\u200e",
    "\u202e",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "\U0001f600",
    "\U0010ffff",
    "e\u0301",
    "\ue000",
]
ODD_ESCAPES = {b"\\u0000": 1, b"\\ud83d\\ude00": 1, b"\\uDBFF\\uDFFF": 1, b"\\/": 1, b"\\u00e9": 1}
NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1E400"]
EMPTYISH: list[tuple[bytes | None, str]] = [
    (None, EMPTY),
    (b"", EMPTY),
    (b" ", INVALID_JSON),
    (b"\n", INVALID_JSON),
    (b"\x00", INVALID_JSON),
    (b"\xef\xbb\xbf{}", INVALID_JSON),
    (b"null", SCHEMA),
    (b"{}", SCHEMA),
    (b"[]", SCHEMA),
    (b"0", SCHEMA),
    (b'""', SCHEMA),
    (b"true", SCHEMA),
]
TIMESTAMPS: list[tuple[bytes, str]] = [
    *(
        (f'"{t}"'.encode(), IMPOSSIBLE)
        for t in (
            "0000-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.999999-23:59",
            "1970-01-01T00:00:00Z",
            "1970-01-01T23:59:59-23:59",
            "1999-12-31T23:59:59.999999Z",
            "2999-12-31T00:00:00Z",
            "3000-01-01T00:00:00+01:00",
        )
    ),
    *(
        (f'"{t}"'.encode(), SCHEMA)
        for t in (
            "2024-05-01T10:00:00",  # naive
            "2024-05-01 10:00:00",
            "2024-05-01T10:00:00.123",
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2016-12-31T23:59:60Z",
            "2024-05-01T10:00:00+24:00",
            "10:00:00Z",
            "2024-05-01",
            "2024-05-01T10:00:00+0100",
            "2024-05-01T10:00+01:00",
            "2024-05-01T10:00:00,5Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00Z\\n",  # a JSON escape: the newline in the text
            "2024-05-01T10:00:00+01",
            "2024-05-01T10:00:00ZZ",
            " 2024-05-01T10:00:00Z",
            "1e10",
            "infinity",
            "1714550400",  # unix seconds in a string: not RFC 3339 (pydantic would guess s or ms)
            "1714550400000",
            "1714550400.5",
            "-62135596800",
            "0",
        )
    ),
    *((t, SCHEMA) for t in (b"1714550400", b"1714550400.5", b"null", b"true", b"[]", b"{}")),
]
NO_DIGITS = "abcdefghijklmnopqrstuvwxyzTZ:-+. _/\u00e9\u4e2d"
INTEGRAL = [  # integer fields: a point or an exponent keeps an integral number an integer
    *(b"1.0", b"2.0", b"5.0", b"1e0", b"2E0", b"20e-1", b"1.00000", b"1.00000000000000001", b"1e4"),
    *(b"10000.0", b"10001.0", b"0.0", b"-0.0", b"-1.0", b"2.5", b"1.5", b"1.0000000000000002"),
    *(b"4.999999999999999", b"1e300", b"5e-324", b"1", b"2", b"true", b"false", b'"2"', b'"1.0"'),
]
CURRENCIES = ["EUR", "USD", "XAU", "EUR\n", "\nEUR", "EU\n", "eur", "Eur", "EU", "EURO", "E R", "EUR "]
CURRENCIES += [" EUR", "\uff25\uff35\uff32", "\u00c9UR", "\u0130UR", "EU\u0000", "", "E\u0301U", "\u212aRW"]
YEARS = [0, 1, 1969, 1970, 1971, 1999, 2000, 2024, 2100, 2998, 2999, 3000, 9999]
# an RFC 3339 date-time's pieces (date, separator, clock, fraction, offset) -> a near miss of it
NEAR_MISSES: dict[str, Callable[[str, str, str, str, str], str]] = {
    "offset without colon": lambda d, s, c, f, o: (
        d + s + c + f + ("+0100" if o in "Zz" else o.replace(":", ""))
    ),
    "offset hours only": lambda d, s, c, f, o: d + s + c + f + "+01",
    "offset seconds": lambda d, s, c, f, o: d + s + c + f + "+01:00:00",
    "offset hour 24": lambda d, s, c, f, o: d + s + c + f + "-24:00",
    "offset minute 60": lambda d, s, c, f, o: d + s + c + f + "+01:60",
    "no offset": lambda d, s, c, f, o: d + s + c + f,
    "zone name": lambda d, s, c, f, o: d + s + c + f + "UTC",
    "space": lambda d, s, c, f, o: d + " " + c + f + o,
    "no separator": lambda d, s, c, f, o: d + c + f + o,
    "no seconds": lambda d, s, c, f, o: d + s + c[:5] + o,
    "leap second": lambda d, s, c, f, o: d + s + c[:6] + "60" + f + o,
    "hour 24": lambda d, s, c, f, o: d + s + "24:00:00" + o,
    "minute 60": lambda d, s, c, f, o: d + s + c[:3] + "60" + c[5:] + o,
    "decimal comma": lambda d, s, c, f, o: d + s + c + ",5" + o,
    "empty fraction": lambda d, s, c, f, o: d + s + c + "." + o,
    "trailing newline": lambda d, s, c, f, o: d + s + c + f + o + "\n",
    "trailing space": lambda d, s, c, f, o: d + s + c + f + o + " ",
    "leading space": lambda d, s, c, f, o: " " + d + s + c + f + o,
    "month 13": lambda d, s, c, f, o: d[:5] + "13" + d[7:] + s + c + o,
    "day 00": lambda d, s, c, f, o: d[:8] + "00" + s + c + o,
    "day 32": lambda d, s, c, f, o: d[:8] + "32" + s + c + o,
    "one-digit month": lambda d, s, c, f, o: d[:5] + "5" + d[7:] + s + c + o,
    "signed year": lambda d, s, c, f, o: "+" + d + s + c + o,
    "five-digit year": lambda d, s, c, f, o: "1" + d + s + c + o,
    "arabic-indic digit": lambda d, s, c, f, o: d[:3] + "\u0663" + d[4:] + s + c + o,
    "fullwidth digit": lambda d, s, c, f, o: d + s + c[:7] + "\uff13" + f + o,
    "date only": lambda d, s, c, f, o: d,
    "week date": lambda d, s, c, f, o: d[:4] + "-W18-3" + s + c + o,
}


@dataclass(frozen=True)
class Case:
    category: str
    raw: bytes | None
    topic_type: str  # the event type of the input topic the message is sent on
    expect: frozenset[str] | None  # allowed outcomes; None: anything but a crash

    def allows(self, outcome: str) -> bool:
        return self.expect is None or outcome in self.expect


def outcome(decoder: EventDecoder, case: Case) -> str:
    """``ACCEPTED`` or the reason; any other exception propagates (that is a crash)."""
    try:
        if case.topic_type in CONTROL_TYPES:
            decoder.decode_input(case.raw, case.topic_type)
        else:
            decoder.decode(case.raw, case.topic_type)
    except RejectedInput as exc:
        return str(exc.reason)
    return ACCEPTED


def _dumps(ev: Event) -> bytes:
    return orjson.dumps(ev)


def _copy(ev: Event) -> Event:
    copied: Event = orjson.loads(orjson.dumps(ev))
    return copied


def _spec(path: Path) -> Spec:
    name = str(path[-1])
    return CONTROL_FIELDS[name] if name in CONTROL_FIELDS else FIELDS[name]


def _get(ev: Event, path: Path) -> Any:
    node: Any = ev
    for p in path:
        node = node[p]
    return node


def _set(ev: Event, path: Path, value: Any) -> None:
    _get(ev, path[:-1])[path[-1]] = value


def _required(etype: str, path: Path) -> bool:
    model = OrderLine if len(path) > 1 else INPUT_TYPES[etype]
    return model.model_fields[str(path[-1])].is_required()


def _nullable(etype: str, path: Path) -> bool:
    model = OrderLine if len(path) > 1 else INPUT_TYPES[etype]
    field = model.model_fields[str(path[-1])]
    return not field.is_required() and field.default is None


def _paths(ev: Event) -> list[Path]:
    paths: list[Path] = [(k,) for k in ev]
    if ev.get("lines"):
        paths += [("lines", 0, k) for k in ev["lines"][0]]
    return paths


class Fuzzer:
    """Makes one ``Case`` of a category from a valid event; every choice comes from ``rng``."""

    def __init__(self, rng: random.Random, decoder: EventDecoder) -> None:
        self.rng = rng
        self.max_bytes = decoder.max_bytes
        self.min_ts = decoder.min_ts
        self.max_skew = decoder.max_skew

    def case(self, category: str, ev: Event, now: float) -> Case:
        self.now = now
        raw, expect = GENERATORS[category](self, ev)
        topic = ev["type"]
        if category == "wrong_topic":
            topic = self.rng.choice(sorted(set(INPUT_TYPES) - {topic}))
        if expect is not None and raw is not None and len(raw) > self.max_bytes:
            expect = {OVERSIZED}
        return Case(category, raw, topic, None if expect is None else frozenset(expect))

    # --- helpers ------------------------------------------------------------------------------
    def _text(self, n: int, alphabet: str | None = None) -> str:
        if alphabet is not None:
            return "".join(self.rng.choice(alphabet) for _ in range(n))
        out = []
        for _ in range(n):
            lo, hi = self.rng.choice(
                [
                    (0x20, 0x7E),
                    (0x00, 0x1F),
                    (0xA0, 0x2FF),
                    (0x4E00, 0x4FFF),
                    (0xE000, 0xFFFF),
                    (0x1F300, 0x1FAFF),
                ]
            )
            out.append(chr(self.rng.randint(lo, hi)))
        return "".join(out)

    def _json(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth > 3 or r < 0.5:
            return self.rng.choice(
                [
                    None,
                    True,
                    False,
                    self.rng.randint(-(2**63), 2**63 - 1),
                    self.rng.uniform(-1e9, 1e9),
                    self._text(5),
                ]
            )
        if r < 0.75:
            return [self._json(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self._extra_name(): self._json(depth + 1) for _ in range(self.rng.randint(0, 4))}

    def _extra_name(self) -> str:
        name = self._text(self.rng.randint(0, 12))
        return name if name not in FIELDS else name + "_"

    def _splice(self, ev: Event, path: Path, token: bytes, keep: bool = False) -> bytes:
        """``ev`` serialised with the JSON of ``path`` replaced by ``token`` (``keep``: the string
        value kept, ``token`` inserted at its end)."""
        ev = _copy(ev)
        _set(ev, path, (_get(ev, path) if keep else "") + MARK)
        raw = _dumps(ev)
        if keep:
            return raw.replace(MARK.encode(), token)
        return raw.replace(f'"{MARK}"'.encode(), token)

    def _pick(self, ev: Event, kinds: set[str] | None = None, free: bool = False) -> Path | None:
        paths = [p for p in _paths(ev) if kinds is None or _spec(p).kind in kinds]
        if kinds is not None and kinds <= {"str", "time"}:  # a string to append to
            paths = [p for p in paths if isinstance(_get(ev, p), str)]
        if free:
            paths = [p for p in paths if _spec(p).free]
        return self.rng.choice(paths) if paths else None

    # --- categories ---------------------------------------------------------------------------
    def random_bytes(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        n = self.rng.choice(
            [self.rng.randrange(0, 16), self.rng.randrange(0, 512), self.rng.randrange(0, 8192)]
        )
        prefix = self.rng.choice([b"", b"{", b'{"'])
        return prefix + self.rng.randbytes(n), None

    def random_json(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        return _dumps(self._json()), {SCHEMA}

    def truncated(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        raw = _dumps(ev)
        return raw[: self.rng.randrange(1, len(raw))], {INVALID_JSON}

    def byte_mutation(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        buf = bytearray(_dumps(ev))
        for _ in range(self.rng.randint(1, 8)):
            if not buf:
                break
            i = self.rng.randrange(len(buf))
            op = self.rng.randrange(6)
            if op == 0:
                buf[i] ^= 1 << self.rng.randrange(8)
            elif op == 1:
                buf.insert(i, self.rng.randrange(256))
            elif op == 2:
                del buf[i]
            elif op == 3:
                buf[i] = self.rng.choice(b'{}[]",:\\0-eE.tfn ')
            elif op == 4:
                j = self.rng.randrange(i, len(buf))
                buf[j:j] = buf[i:j][:64]
            else:
                del buf[self.rng.randrange(len(buf)) :]
        return bytes(buf), None

    def missing_field(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        path = self.rng.choice(_paths(ev))
        required = _required(ev["type"], path)
        ev = _copy(ev)
        del _get(ev, path[:-1])[path[-1]]
        return _dumps(ev), {SCHEMA} if required else {ACCEPTED}

    def extra_fields(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        ev = _copy(ev)
        for _ in range(self.rng.randint(1, 5)):
            target = ev["lines"][0] if ev.get("lines") and self.rng.random() < 0.3 else ev
            target[self._extra_name()] = self._json()
        return _dumps(ev), {ACCEPTED}

    def wrong_type(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        path = self.rng.choice(_paths(ev))
        spec = _spec(path)
        allowed = JSON_KINDS.get(spec.kind, {spec.kind}) | (
            {"null"} if _nullable(ev["type"], path) else set()
        )
        kind = self.rng.choice(sorted(set(WRONG_VALUES) - allowed))
        ev = _copy(ev)
        _set(ev, path, self.rng.choice(WRONG_VALUES[kind]))
        return _dumps(ev), {SCHEMA}

    def huge_string(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        chunk = self._text(self.rng.randint(1, 16))
        huge = (chunk * (MEBIBYTE // len(chunk) + 1))[:MEBIBYTE]
        path = self._pick(ev, {"str"})
        ev = _copy(ev)
        if path is None or self.rng.random() < 0.3:
            ev[self._extra_name()] = huge
        else:
            _set(ev, path, huge)
        return _dumps(ev), {OVERSIZED}

    def long_string(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        path = self._pick(ev, {"str"}, free=True)
        if path is None:
            return self.huge_string(ev)
        limit = _spec(path).max_length
        assert limit is not None
        ev = _copy(ev)
        _set(ev, path, self._text(limit + self.rng.randint(1, 10), "abcxyz0123-_ "))
        return _dumps(ev), {SCHEMA}

    def deep_nesting(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        deep = self.rng.random() < 0.75
        depth = self.rng.choice([250, 1000, 10_000, 100_000]) if deep else self.rng.randint(2, 150)
        opening, closing = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        nested = opening * depth + (b"1" if opening != b"[" else b"") + closing * depth
        where = self.rng.choice(["top", "extra", "field"])
        if where == "top":
            return nested, {INVALID_JSON} if deep else {SCHEMA}
        if where == "extra":
            return self._nest_extra(ev, nested), {INVALID_JSON} if deep else {ACCEPTED}
        path = self.rng.choice([p for p in _paths(ev) if len(p) == 1])
        return self._splice(ev, path, nested), {INVALID_JSON} if deep else {SCHEMA}

    def _nest_extra(self, ev: Event, nested: bytes) -> bytes:
        ev = _copy(ev)
        ev["x" + self._extra_name()] = MARK
        return _dumps(ev).replace(f'"{MARK}"'.encode(), nested)

    def invalid_unicode(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        bad = self.rng.choice(INVALID_UTF8)
        path = self._pick(ev, {"str", "time"})
        if path is None or self.rng.random() < 0.2:  # in a key
            ev = _copy(ev)
            ev[MARK] = 1
            return _dumps(ev).replace(MARK.encode(), bad), {INVALID_JSON}
        return self._splice(ev, path, bad, keep=True), {INVALID_JSON}

    def odd_unicode(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        path = self._pick(ev, {"str", "time"})
        if path is None:
            return self.extra_fields(ev)
        spec, old = _spec(path), _get(ev, path)
        if self.rng.random() < 0.5:
            odd = self.rng.choice(ODD_UNICODE)
            raw, added = self._splice(ev, path, orjson.dumps(odd)[1:-1], keep=True), len(odd)
        else:
            esc = self.rng.choice(sorted(ODD_ESCAPES))
            raw, added = self._splice(ev, path, esc, keep=True), ODD_ESCAPES[esc]
        ok = spec.free and spec.max_length is not None and len(old) + added <= spec.max_length
        return raw, {ACCEPTED} if ok else {SCHEMA}

    def non_finite(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        token = self.rng.choice(NON_FINITE)
        path = self._pick(ev, {"int", "money"})
        if path is None or self.rng.random() < 0.2:  # ignored, but NaN and Infinity are no JSON
            return self._nest_extra(ev, token), {ACCEPTED} if token[-1:].isdigit() else {INVALID_JSON}
        return self._splice(ev, path, token), {SCHEMA}

    def out_of_range(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        path = self._pick(ev, {"int", "money"})
        if path is None:
            return self.non_finite(ev)
        spec = _spec(path)
        assert spec.lo is not None and spec.hi is not None
        if self.rng.random() < 0.05:
            return self._splice(ev, path, b"1" + b"0" * 5000), {INVALID_JSON}
        values: list[int | float] = [int(spec.lo) - 1, int(spec.hi) + 1, -1, 0, -(2**63), 2**64, 10**30]
        if spec.kind == "money":
            values += [-0.01, -1e308, 1e9 + 1, 1e308, -0.0, 1e9, 5e-324]
        value = self.rng.choice(values)
        ok = spec.lo <= value <= spec.hi
        return self._splice(ev, path, repr(value).encode()), {ACCEPTED} if ok else {SCHEMA}

    def timestamp(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        r = self.rng.random()
        if r < 0.55:
            token, reason = self.rng.choice(TIMESTAMPS)
            return self._splice(ev, ("event_time",), token), {reason}
        if r < 0.7:  # beyond the clock-skew bound, or inside the bounds
            future = self.rng.random() < 0.5
            t = (
                self.now + self.max_skew + self.rng.uniform(3600, 3e9)
                if future
                else self.rng.uniform(self.min_ts + 1, self.now)
            )
            stamp = datetime.fromtimestamp(t, UTC).isoformat()
            return self._splice(ev, ("event_time",), orjson.dumps(stamp)), {
                IMPOSSIBLE if future else ACCEPTED
            }
        if r < 0.85:
            garbage = self._text(self.rng.randint(0, 40), NO_DIGITS)
            return self._splice(ev, ("event_time",), orjson.dumps(garbage)), {SCHEMA}
        mangled = bytearray(str(ev["event_time"]).encode())  # a real stamp, a few characters changed
        for _ in range(self.rng.randint(1, 3)):
            mangled[self.rng.randrange(len(mangled))] = self.rng.choice(b"0123456789-:TZ+. x")
        return self._splice(ev, ("event_time",), orjson.dumps(mangled.decode())), None

    def integral_number(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        """An integer field as a number with a point or an exponent, a boolean or a string."""
        path = self._pick(ev, {"int"})
        assert path is not None  # schema_version is everywhere
        spec = _spec(path)
        assert spec.lo is not None and spec.hi is not None
        n = self.rng.randint(int(spec.lo) - 2, int(spec.hi) + 2)
        token = self.rng.choice([*INTEGRAL, f"{n}.0".encode(), f"{n}e0".encode(), f"{n * 10}E-1".encode()])
        value = json.loads(token)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
        ok = ok and spec.lo <= value <= spec.hi
        return self._splice(ev, path, token), {ACCEPTED} if ok else {SCHEMA}

    def currency(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        """A currency: three capital letters (a Python re ``^[A-Z]{3}$`` also matches "EUR\\n")."""
        value = self.rng.choice([*CURRENCIES, None, 3, ["EUR"], self._text(3, "ABCXYZabc\n ")])
        ev = _copy(ev)
        ev["currency"] = value
        field = "currency" in INPUT_TYPES[ev["type"]].model_fields  # else an ignored extra field
        ok = value is None or (
            isinstance(value, str) and len(value) == 3 and all("A" <= c <= "Z" for c in value)
        )
        return _dumps(ev), {ACCEPTED} if ok or not field else {SCHEMA}

    def rfc3339(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        """An event time from RFC 3339's grammar (section 5.6) at the edges of its fields and of the
        contract's dates, or a near miss of one."""
        rng = self.rng
        year = rng.choice([rng.randint(1970, 2999), rng.randint(0, 9999), rng.choice(YEARS)])
        month = rng.randint(1, 12)
        last = calendar.monthrange(year or 2000, month)[1]  # year 0 is a leap year like 2000
        day = rng.choice([rng.randint(1, last), 1, last, min(last + 1, 31)])
        hour, minute, second = rng.randint(0, 23), rng.choice([0, 59, rng.randint(0, 59)]), rng.randint(0, 59)
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
        frac = rng.choice(["", "", "." + digits, "." + "9" * len(digits)])
        sign, oh, om = (
            rng.choice("+-"),
            rng.choice([0, 23, rng.randint(0, 23)]),
            rng.choice([0, 59, rng.randint(0, 59)]),
        )
        offset = rng.choice(["Z", "z", f"{sign}{oh:02}:{om:02}"])
        date, clock = f"{year:04}-{month:02}-{day:02}", f"{hour:02}:{minute:02}:{second:02}"
        sep = rng.choice("Tt")
        expect: str
        if not 1970 <= year <= 2999 or date in ("1970-01-01", "2999-12-31"):
            text, expect = date + sep + clock + frac + offset, IMPOSSIBLE
        elif day > last:  # no such day
            text, expect = date + sep + clock + frac + offset, SCHEMA
        elif rng.random() < 0.4:
            text, expect = rng.choice(list(NEAR_MISSES.values()))(date, sep, clock, frac, offset), SCHEMA
        else:
            text = date + sep + clock + frac + offset
            zone = UTC if offset in "Zz" else timezone(int(sign + "1") * timedelta(hours=oh, minutes=om))
            micro = int((frac[1:] + "000000")[:6])
            t = datetime(year, month, day, hour, minute, second, micro, tzinfo=zone).timestamp()
            expect = IMPOSSIBLE if t < self.min_ts or t > self.now + self.max_skew else ACCEPTED
        return self._splice(ev, ("event_time",), orjson.dumps(text)), {expect}

    def duplicate_name(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        """A member twice, once with a valid value and once with one of the wrong JSON type: the
        last one counts (in jiter as in Python's json and JavaScript's JSON.parse)."""
        path = self.rng.choice(_paths(ev))
        spec = _spec(path)
        allowed = JSON_KINDS.get(spec.kind, {spec.kind}) | (
            {"null"} if _nullable(ev["type"], path) else set()
        )
        bad = self.rng.choice(WRONG_VALUES[self.rng.choice(sorted(set(WRONG_VALUES) - allowed))])
        bad_last = self.rng.random() < 0.5
        first, last = (_get(ev, path), bad) if bad_last else (bad, _get(ev, path))
        ev = _copy(ev)
        _set(ev, path, first)
        _get(ev, path[:-1])[MARK] = MARK  # after the first, in the same object
        again = orjson.dumps(str(path[-1])) + b":" + orjson.dumps(last)
        return _dumps(ev).replace(f'"{MARK}":"{MARK}"'.encode(), again), {SCHEMA} if bad_last else {ACCEPTED}

    def json_limits(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        """Nesting and number sizes at the limits of pydantic's JSON parser, which the contract's."""
        where = self.rng.choice(["top", "extra", "field"])
        if self.rng.random() < 0.5:
            n = self.rng.randint(JSON_MAX_DEPTH - 2, JSON_MAX_DEPTH + 2)
            arrays = self.rng.random() < 0.5
            token = b"[" * n + b"]" * n if arrays else b'{"a":' * n + b"1" + b"}" * n
            deepest = n - 1 if arrays else n  # containers around the innermost value
        else:
            n = self.rng.randint(JSON_MAX_INT_DIGITS - 1, JSON_MAX_INT_DIGITS + 1)
            sign, tail = self.rng.choice(["", "-"]), self.rng.choice(["", ".5", "e2", "E-9"])
            token, deepest = f"{sign}{'1' * n}{tail}".encode(), 0
            where = "extra" if where == "top" else where
        fits = n <= JSON_MAX_INT_DIGITS if deepest == 0 else deepest + (where != "top") <= JSON_MAX_DEPTH
        if where == "top":
            return token, {SCHEMA} if fits else {INVALID_JSON}
        if where == "extra":
            return self._nest_extra(ev, token), {ACCEPTED} if fits else {INVALID_JSON}
        path = self._pick(ev, {"int", "money"}) if deepest == 0 else (self.rng.choice(list(ev)),)
        assert path is not None
        return self._splice(ev, path, token), {SCHEMA} if fits else {INVALID_JSON}

    def unknown_ids(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        ev = _copy(ev)
        for path in _paths(ev):
            spec = _spec(path)
            if spec.free and spec.max_length == 128 and self.rng.random() < 0.7:
                _set(ev, path, self._text(self.rng.randint(1, 128)))
        if ev.get("results") and len(ev["results"]) <= 20:
            ev["results"] = [self._text(self.rng.randint(1, 128)) for _ in ev["results"]]
        return _dumps(ev), {ACCEPTED}

    def wrong_topic(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        return _dumps(ev), {WRONG_TOPIC}

    def empty(self, ev: Event) -> tuple[bytes | None, set[str] | None]:
        raw, reason = self.rng.choice(EMPTYISH)
        return raw, {reason}


GENERATORS: dict[str, Callable[[Fuzzer, Event], tuple[bytes | None, set[str] | None]]] = {
    "random_bytes": Fuzzer.random_bytes,
    "random_json": Fuzzer.random_json,
    "truncated": Fuzzer.truncated,
    "byte_mutation": Fuzzer.byte_mutation,
    "missing_field": Fuzzer.missing_field,
    "extra_fields": Fuzzer.extra_fields,
    "wrong_type": Fuzzer.wrong_type,
    "huge_string": Fuzzer.huge_string,
    "long_string": Fuzzer.long_string,
    "deep_nesting": Fuzzer.deep_nesting,
    "invalid_unicode": Fuzzer.invalid_unicode,
    "odd_unicode": Fuzzer.odd_unicode,
    "non_finite": Fuzzer.non_finite,
    "out_of_range": Fuzzer.out_of_range,
    "timestamp": Fuzzer.timestamp,
    "integral_number": Fuzzer.integral_number,
    "currency": Fuzzer.currency,
    "rfc3339": Fuzzer.rfc3339,
    "duplicate_name": Fuzzer.duplicate_name,
    "json_limits": Fuzzer.json_limits,
    "unknown_ids": Fuzzer.unknown_ids,
    "wrong_topic": Fuzzer.wrong_topic,
    "empty": Fuzzer.empty,
}
CATEGORIES = tuple(GENERATORS)


# --- the schema side of the contract -------------------------------------------------------------
assert "date-time" in Draft202012Validator.FORMAT_CHECKER.checkers, "pip install rfc3339-validator"
_SURROGATE = re.compile("[\ud800-\udfff]")
_INTEGER_PART = re.compile(r"-?([0-9]*)")


class _Repeated(dict[str, Any]):
    """An object with a repeated name: the values that the last one replaced, still to check."""

    replaced: list[Any]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)  # the last value of a name counts
    if len(obj) == len(pairs):
        return obj
    repeated, seen = _Repeated(obj), set()
    repeated.replaced = []
    for name, value in reversed(pairs):
        if name in seen:
            repeated.replaced.append(value)
        seen.add(name)
    return repeated


def _number(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def checked(text: str) -> Any:
        match = _INTEGER_PART.match(text)
        if match is None or len(match[1]) > JSON_MAX_INT_DIGITS:
            raise ValueError(f"more than {JSON_MAX_INT_DIGITS} digits before the point")
        return parse(text)

    return checked


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is no JSON")


def reference_json(raw: bytes | None) -> tuple[bool, Any]:
    """``raw`` read as JSON by the contract's rules (``streams.records``), with Python's json: RFC
    8259 in UTF-8 (decoded here: json would guess UTF-16 or -32 from bytes), without NaN, Infinity
    or lone surrogates, pydantic's parser's limits of depth and digits; of a repeated name the last
    value counts, but the others must be JSON too. Out: (False, None) or (True, the value)."""
    if raw is None:
        return False, None
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_object,
            parse_int=_number(int),
            parse_float=_number(float),
            parse_constant=_constant,
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False, None
    todo = [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if depth > JSON_MAX_DEPTH or (isinstance(v, str) and _SURROGATE.search(v)):
            return False, None
        if isinstance(v, dict):
            if any(_SURROGATE.search(k) for k in v):
                return False, None
            todo += [(x, depth + 1) for x in v.values()]
            todo += [(x, depth + 1) for x in getattr(v, "replaced", ())]
        elif isinstance(v, list):
            todo += [(x, depth + 1) for x in v]
    return True, value


@cache
def schema_validator(etype: str) -> Draft202012Validator:
    """The published JSON Schema of an input type, with format checking (RFC 3339 date-times)."""
    schema = json.loads((SCHEMA_DIR / f"{etype}-event.schema.json").read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_accepts(raw: bytes | None, etype: str) -> bool:
    ok, value = reference_json(raw)
    return ok and schema_validator(etype).is_valid(value)


def agreement(
    decoder: EventDecoder,
    seeds: list[Event],
    n: int,
    seed: int,
    now: float,
    categories: tuple[str, ...] = CATEGORIES,
) -> tuple[Counter[str], list[tuple[Case, str]]]:
    """``n`` seeded cases of every category: how many of each, and those that the decoder (give it
    wide deployment bounds) and the topic's schema answer differently, with the decoder's answer."""
    rng = random.Random(seed)
    fuzzer = Fuzzer(rng, decoder)
    tried: Counter[str] = Counter()
    disagreements: list[tuple[Case, str]] = []
    for _ in range(n):
        case = fuzzer.case(rng.choice(categories), rng.choice(seeds), now)
        got = outcome(decoder, case)
        tried[case.category] += 1
        if (got == ACCEPTED) != schema_accepts(case.raw, case.topic_type):
            disagreements.append((case, got))
    return tried, disagreements
