"""Forget a user and the marketing opt-out, without Kafka: the contract of both requests (decoder
and JSON Schemas agree), an erasure deletes every trace of the user in the pipeline's state at its
place among the user's events, an opt-out stops promotions but not recommendations, and outlives
the idle-user expiry."""

from __future__ import annotations

import json
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from streams.cli import parser
from streams.decode import EventDecoder
from streams.errors import RejectedInput, RejectReason, ShopstreamError
from streams.expiry import ExpiryIndex
from streams.pipeline import Message, Pipeline, local_pipeline
from streams.privacy import request
from streams.promotions import CONSENT, expiry_residue, opted_out
from streams.records import ConsentEvent, ErasureEvent
from streams.schemas import SCHEMA_DIR
from streams.settings import Settings
from streams.state import UserState, user_partition

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # noon UTC
decoder = EventDecoder(max_bytes=4096, min_event_time="2000-01-01T00:00:00Z", max_clock_skew_s=86400)


def body(etype: str, eid: str = "e1", user: str = "u1", at: datetime = T0, **fields: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "type": etype,
        "event_id": eid,
        "user_id": user,
        "event_time": at.isoformat().replace("+00:00", "Z"),
        **fields,
    }


# --- the contract ------------------------------------------------------------------------------
ERASURE = body("erasure")
CONSENT_OFF = body("consent", marketing=False)
SCHEMA_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("erasure", ERASURE, True),
    ("erasure", {**ERASURE, "session_id": "s1", "reason": "ignored extra field"}, True),
    ("erasure", {k: v for k, v in ERASURE.items() if k != "user_id"}, False),
    ("erasure", {**ERASURE, "user_id": ""}, False),
    ("erasure", {**ERASURE, "user_id": "u" * 129}, False),
    ("erasure", {**ERASURE, "event_id": 7}, False),
    ("erasure", {**ERASURE, "schema_version": 2}, False),
    ("erasure", {**ERASURE, "type": "erase"}, False),
    ("consent", CONSENT_OFF, True),
    ("consent", {**CONSENT_OFF, "marketing": True}, True),
    ("consent", {k: v for k, v in CONSENT_OFF.items() if k != "marketing"}, False),
    ("consent", {**CONSENT_OFF, "marketing": "false"}, False),
    ("consent", {**CONSENT_OFF, "marketing": 0}, False),
    ("consent", {**CONSENT_OFF, "marketing": None}, False),
]


@pytest.mark.parametrize(("etype", "event", "valid"), SCHEMA_CASES)
def test_the_schema_files_and_the_decoder_agree_on_requests(
    etype: str, event: dict[str, Any], valid: bool
) -> None:
    schema = json.loads((SCHEMA_DIR / f"{etype}-event.schema.json").read_text())
    by_schema = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).is_valid(
        event
    )
    try:
        decoded = decoder.decode_input(orjson.dumps(event), etype)
    except RejectedInput as exc:
        assert exc.reason == RejectReason.SCHEMA
        by_decoder = False
    else:
        assert isinstance(decoded, ErasureEvent | ConsentEvent) and decoded.type == etype
        by_decoder = True
    assert by_schema == by_decoder == valid


def test_requests_are_rejected_like_other_bad_input() -> None:
    cases = [
        (orjson.dumps(ERASURE), "consent", RejectReason.WRONG_TOPIC),
        (orjson.dumps(CONSENT_OFF), "erasure", RejectReason.WRONG_TOPIC),
        (orjson.dumps(body("view", item_id="i")), "erasure", RejectReason.WRONG_TOPIC),
        (orjson.dumps(body("erasure", at=T0.replace(year=1999))), "erasure", RejectReason.IMPOSSIBLE_VALUE),
        (
            orjson.dumps(body("erasure", at=datetime.now(UTC) + timedelta(days=3))),
            "erasure",
            RejectReason.IMPOSSIBLE_VALUE,
        ),
        (orjson.dumps({**ERASURE, "event_time": "2026-03-02T12:00:00"}), "erasure", RejectReason.SCHEMA),
        (b"", "erasure", RejectReason.EMPTY),
        (b"{", "consent", RejectReason.INVALID_JSON),
    ]
    for raw, topic_type, reason in cases:
        with pytest.raises(RejectedInput) as info:
            decoder.decode_input(raw, topic_type)
        assert info.value.reason == reason, (raw, topic_type)
    # the behaviour decoder (archive, tools) never returns a request, wherever it comes from
    expected: list[str | None] = ["view", None]
    for behaviour in expected:
        with pytest.raises(RejectedInput) as info:
            decoder.decode(orjson.dumps(ERASURE), behaviour)
        assert info.value.reason == RejectReason.WRONG_TOPIC


def test_the_commands_build_valid_requests_and_refuse_a_bad_user_id_without_echoing_it() -> None:
    erasure = request("erasure", "u-42")
    assert isinstance(erasure, ErasureEvent) and erasure.user_id == "u-42"
    assert erasure.event_id.startswith("erasure-") and erasure.event_time.utcoffset() == timedelta(0)
    assert decoder.decode_input(erasure.model_dump_json().encode(), "erasure") == erasure
    consent = request("consent", "u-42", marketing=False)
    assert isinstance(consent, ConsentEvent) and consent.marketing is False
    assert request("erasure", "u-42").event_id != erasure.event_id
    secret = "x" * 200
    with pytest.raises(ShopstreamError) as info:
        request("erasure", secret)
    assert "user_id" in str(info.value) and secret not in str(info.value)
    args = parser().parse_args(["consent", "u-42", "--marketing", "off"])
    assert (args.user_id, args.marketing) == ("u-42", "off")
    assert parser().parse_args(["forget", "u-42"]).user_id == "u-42"
    with pytest.raises(SystemExit):
        parser().parse_args(["consent", "u-42", "--marketing", "maybe"])


# --- the pipeline --------------------------------------------------------------------------------
def msg(etype: str, eid: str, t: float, user: str = "u1", **fields: Any) -> Message:
    at = T0 + timedelta(seconds=t)
    key = user.encode()
    return Message(user_partition(key, 8), key, orjson.dumps(body(etype, eid, user, at, **fields)), None)


def pipe(**overrides: Any) -> Pipeline:
    s = Settings(**{"holdout_percent": 0.0, "quiet_hours": "", "cart_abandon_after_s": 600.0, **overrides})
    return local_pipeline(s, budget_per_partition=100.0, clock=lambda: T0.timestamp())


def outputs(p: Pipeline, *msgs: Message) -> list[dict[str, Any]]:
    return [orjson.loads(o.value) for o in p.process(list(msgs)).outputs]


def cart(user: str, eid: str, t: float) -> Message:
    return msg("cart", eid, t, user, action="add", item_id="sku-1", quantity=1, unit_price=30.0)


def same_partition(n: int) -> list[str]:
    names = [f"shopper-{i}" for i in range(200)]
    p = user_partition(names[0].encode(), 8)
    return [u for u in names if user_partition(u.encode(), 8) == p][:n]


def sample(p: Pipeline, name: str, labels: dict[str, str] | None = None) -> float:
    return p.metrics.registry.get_sample_value(name, labels) or 0.0


def test_an_erasure_deletes_the_user_and_cancels_the_cart_timer_others_keep_theirs() -> None:
    gone, kept, ticker = same_partition(3)
    part = user_partition(gone.encode(), 8)
    p = pipe()
    first = outputs(
        p,
        cart(gone, "g1", 0),
        msg("view", "g2", 5, gone, item_id="sku-2"),
        cart(kept, "k1", 0),
        msg("view", "k2", 5, kept, item_id="sku-2"),
    )
    assert [(r["user_id"], r["event_id"]) for r in first] == [
        (gone, "g1"),
        (kept, "k1"),
        (gone, "g2"),
        (kept, "k2"),
    ]
    kept_before = p.users[kept.encode()]
    assert {key for _, key in p.timers.heaps[part]} == {gone.encode(), kept.encode()}

    result = p.process([msg("erasure", "x1", 10, gone)])
    assert result.outputs == [] and result.failed == []  # a request is not answered
    assert result.erased == [(part, gone.encode())]
    assert gone.encode() not in p.users and p.users[kept.encode()] == kept_before
    assert {key for _, key in p.timers.heaps[part]} == {kept.encode()}
    assert sample(p, "shopstream_erasures_total") == 1.0

    # a later event moves the partition's clock past both carts: only the kept user's comes due
    late = outputs(p, msg("view", "t1", 700, ticker, item_id="sku-9"))
    assert [(r["user_id"], r["event_id"]) for r in late] == [(ticker, "t1")]
    promos = [o for o in p.due_carts({part}, T0.timestamp()) if o.topic == p.s.topic_promotions]
    assert [(orjson.loads(o.value)["user_id"], orjson.loads(o.value)["kind"]) for o in promos] == [
        (kept, "cart_abandonment")
    ]
    assert gone.encode() not in p.users
    # the baseline's statistics are kept: items and weights, never a user id
    assert all(gone.encode() not in k and gone.encode() not in v for k, v in p.recommender.table.items())


def test_an_erasure_applies_at_its_place_among_the_users_events_in_one_batch() -> None:
    p = pipe()
    part = user_partition(b"u1", 8)
    result = p.process(
        [
            msg("view", "v1", 0, item_id="a"),
            cart("u1", "c1", 1),
            msg("erasure", "x1", 2),
            msg("view", "v2", 3, item_id="b"),
            msg("view", "o1", 3, "u2", item_id="a"),
        ]
    )
    answered = [orjson.loads(o.value)["event_id"] for o in result.outputs]
    assert sorted(answered) == ["c1", "o1", "v1", "v2"]  # the erasure itself has no answer
    assert result.erased == []  # the user came back within the batch
    state = UserState.loads(p.users[b"u1"])
    assert [tok[0] for tok in state.seq] == ["b"] and state.counts == {"view": 1}
    assert state.cart == {} and state.recent_ids == ["v2"] and "cart" not in state.promo
    assert b"u1" not in {key for _, key in p.timers.heaps.get(part, [])}
    # an erasure of a user nobody knows changes nothing else and is still counted
    again = p.process([msg("erasure", "x2", 4, "nobody")])
    assert again.erased == [(user_partition(b"nobody", 8), b"nobody")] and b"nobody" not in p.users
    assert sample(p, "shopstream_erasures_total") == 2.0


def test_a_redelivered_event_after_an_erasure_starts_a_new_state_and_no_old_promotion() -> None:
    p = pipe()
    review = msg("review", "r1", 0, item_id="i", rating=1, text="broken")
    assert [r.get("kind") for r in outputs(p, review)] == [None, "review_recovery"]
    p.process([msg("erasure", "x1", 1)])
    again = outputs(p, review)  # the same event again: a new user's first event, decided anew
    assert [r.get("kind") for r in again] == [None, "review_recovery"]
    assert UserState.loads(p.users[b"u1"]).recent_ids == ["r1"]


def test_an_opt_out_stops_promotions_but_not_recommendations_and_an_opt_in_restores_them() -> None:
    p = pipe()
    off = p.process([msg("consent", "m1", 0, marketing=False)])
    assert off.outputs == [] and opted_out(UserState.loads(p.users[b"u1"]))

    def views(prefix: str, item: str, t: float) -> list[dict[str, Any]]:
        return outputs(p, *[msg("view", f"{prefix}{i}", t + i, item_id=item) for i in range(3)])

    blocked = views("a", "x", 10)  # the third view of x would trigger browse abandonment
    assert [(r["event_id"], "items" in r) for r in blocked] == [("a0", True), ("a1", True), ("a2", True)]
    review = outputs(p, msg("review", "r1", 20, item_id="x", rating=1, text="broken"))
    assert [r["event_id"] for r in review] == ["r1"]  # service recovery is a promotion too
    assert sample(p, "shopstream_promotions_suppressed_total", {"reason": "opt_out"}) == 2.0
    assert sample(p, "shopstream_consents_total", {"marketing": "false"}) == 1.0

    # an opt-in stamped before the opt-out arrives late: it changes nothing
    stale = p.process([msg("consent", "m0", -5, marketing=True)])
    assert stale.outputs == [] and opted_out(UserState.loads(p.users[b"u1"]))
    assert sample(p, "shopstream_consents_total", {"marketing": "true"}) == 0.0

    p.process([msg("consent", "m2", 30, marketing=True)])
    assert not opted_out(UserState.loads(p.users[b"u1"]))
    allowed = views("b", "y", 40)
    assert [r.get("kind") for r in allowed] == [None, None, None, "browse_abandonment"]
    promo = allowed[-1]
    assert promo["user_id"] == "u1" and promo["trigger_event_id"] == "b2" and promo["items"][0] == "y"
    assert sample(p, "shopstream_consents_total", {"marketing": "true"}) == 1.0


def test_an_opt_out_cancels_the_pending_cart_and_the_resend_outbox() -> None:
    user, ticker = same_partition(2)
    part = user_partition(user.encode(), 8)
    p = pipe()
    review = msg("review", "r1", 0, user, item_id="i", rating=1)
    assert [r.get("kind") for r in outputs(p, review, cart(user, "c1", 1))] == [
        None,
        "review_recovery",
        None,
    ]
    p.process([msg("consent", "m1", 2, user, marketing=False)])
    state = UserState.loads(p.users[user.encode()])
    assert "outbox" not in state.promo and state.promo["done"] == "c1"
    assert [r.get("kind") for r in outputs(p, review)] == [None]  # redelivered: nothing re-sent
    p.process([msg("consent", "m2", 3, user, marketing=True)])
    outputs(p, msg("view", "t1", 700, ticker, item_id="z"))  # the cart would be due now
    assert p.due_carts({part}, T0.timestamp()) == []  # abandoned while opted out: never promoted


def test_an_opt_out_outlives_the_idle_expiry_and_nothing_else_does() -> None:
    ttl = 1_000
    now = int(T0.timestamp() * 1000) + 10 * ttl  # the pipeline's clock is T0
    p = pipe()
    p.process([msg("view", "v1", 0, "out", item_id="a"), msg("consent", "m1", 1, "out", marketing=False)])
    p.process([msg("view", "v2", 0, "in", item_id="a"), msg("consent", "m2", 1, "in", marketing=True)])
    p.process([msg("view", "v3", 0, "plain", item_id="a")])
    table = dict(p.users)
    index = ExpiryIndex(ttl, 100)
    for key in table:
        index.touch(0, key, 0)
    assert index.sweep({0}, now, table, lambda _p: nullcontext(), 10, keep=expiry_residue) == 2
    assert set(table) == {b"out"}
    kept = UserState.loads(table[b"out"])
    assert kept.seq == [] and kept.counts == {} and set(kept.promo) == {CONSENT} and opted_out(kept)
    assert kept.seen_ms == now and index.pending(0) == 1  # swept again one TTL later
    assert expiry_residue(table[b"out"], now + ttl) is not None
