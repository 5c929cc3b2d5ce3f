"""Bad input for the decoders, by category: the generators the property tests and the fuzz run share.

In: a valid contract event (a dict, as ``streams.replay`` publishes it), a ``random.Random`` and the
decoder's limits. Out: a ``Case`` - the value bytes of one input message, the event type of the
topic it is sent on, its category and the outcomes the contract allows for it (``ACCEPTED`` or a
``RejectReason``; ``None`` where anything but a crash is fine, as for random bytes).

Driven by hypothesis (``st.randoms()``) the cases shrink; driven by a seeded ``Random`` they are
fast and reproducible (``bench/fuzz_decoders.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.decode import EventDecoder
from streams.errors import RejectedInput, RejectReason
from streams.records import EVENT_TYPES, OrderLine

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
JSON_KINDS = {"int": {"int"}, "money": {"int", "float"}, "str": {"str"}, "time": {"str"}}
WRONG_VALUES: dict[str, list[Any]] = {
    "null": [None],
    "bool": [True, False],
    "int": [0, 1, -1, 7, 2**53],
    "float": [1.0, 0.5, -2.5, 1e300],
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
            "0001-01-01T00:00:00Z",
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.999999-23:59",
            "1970-01-01T00:00:00Z",
            "1999-12-31T23:59:59.999999Z",
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
            "0000-01-01T00:00:00Z",
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
    return FIELDS[str(path[-1])]


def _get(ev: Event, path: Path) -> Any:
    node: Any = ev
    for p in path:
        node = node[p]
    return node


def _set(ev: Event, path: Path, value: Any) -> None:
    _get(ev, path[:-1])[path[-1]] = value


def _required(etype: str, path: Path) -> bool:
    model = OrderLine if len(path) > 1 else EVENT_TYPES[etype]
    return model.model_fields[str(path[-1])].is_required()


def _nullable(etype: str, path: Path) -> bool:
    model = OrderLine if len(path) > 1 else EVENT_TYPES[etype]
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
            topic = self.rng.choice(sorted(set(EVENT_TYPES) - {topic}))
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
        if path is None or self.rng.random() < 0.2:
            return self._nest_extra(ev, token), {ACCEPTED}
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
    "unknown_ids": Fuzzer.unknown_ids,
    "wrong_topic": Fuzzer.wrong_topic,
    "empty": Fuzzer.empty,
}
CATEGORIES = tuple(GENERATORS)
