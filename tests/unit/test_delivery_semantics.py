"""Promotions at least once and event-time timers, without Kafka: the outbox re-sends on
redelivery, a cart comes due before the user's next event, quiet hours defer review recovery,
future-dated events cannot run a partition's clock ahead, clocks are rebuilt from stored states,
and a batch's deliveries are confirmed or fail loudly."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from streams.delivery import Deliveries
from streams.errors import DeliveryFailed
from streams.pipeline import OUTBOX, Message, Pipeline, local_pipeline
from streams.promotions import DEFERRED, CartTimers
from streams.settings import Settings
from streams.state import UserState, user_partition

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def msg(etype: str, eid: str, t: float, user: str = "u1", **fields: Any) -> Message:
    raw = {
        "schema_version": 1,
        "type": etype,
        "event_id": eid,
        "user_id": user,
        "event_time": datetime.fromtimestamp(t, UTC).isoformat(),
        **fields,
    }
    key = user.encode()
    return Message(user_partition(key, 8), key, orjson.dumps(raw), None)


def promotions(p: Pipeline, *msgs: Message) -> list[dict[str, Any]]:
    outs = p.process(list(msgs)).outputs
    return [orjson.loads(o.value) for o in outs if o.topic == p.s.topic_promotions]


def pipe(**overrides: Any) -> Pipeline:
    s = Settings(**{"holdout_percent": 0.0, "quiet_hours": "", **overrides})
    return local_pipeline(s, budget_per_partition=100.0, clock=lambda: T0.timestamp())


def test_a_redelivered_event_sends_its_promotions_again_with_the_same_ids() -> None:
    p = pipe()
    review = msg("review", "r1", T0.timestamp(), item_id="i", rating=1, text="broken")
    first = promotions(p, review)
    assert [r["kind"] for r in first] == ["review_recovery"]
    again = promotions(p, review)  # its offset was not committed: redelivered
    assert again == first  # the same record, id included
    other = promotions(p, msg("view", "v1", T0.timestamp() + 1, item_id="x"))
    assert other == []  # a new event does not re-send anything
    state = UserState.loads(p.users[b"u1"])
    assert [e["by"] for e in state.promo[OUTBOX]] == ["r1"]


def test_the_outbox_forgets_events_that_left_the_redelivery_window() -> None:
    p = pipe(frequency_cap=1000)
    t = T0.timestamp()
    first = []
    for i in range(40):  # more reviews than the user's window of recent event ids (32)
        first += promotions(p, msg("review", f"r{i}", t + i, item_id=f"i{i}", rating=1))
    state = UserState.loads(p.users[b"u1"])
    assert len(state.promo[OUTBOX]) <= 4
    assert all(e["by"] in state.recent_ids for e in state.promo[OUTBOX])
    # r0 left the window: it looks new and is decided again, with the id it had
    (again,) = promotions(p, msg("review", "r0", t, item_id="i0", rating=1))
    assert again["promotion_id"] == first[0]["promotion_id"]


def test_a_cart_due_before_the_next_event_fires_first_whatever_the_batching() -> None:
    t = T0.timestamp()
    add = msg("cart", "c1", t, action="add", item_id="a", quantity=1, unit_price=10.0)
    late_view = msg("view", "v1", t + 4000, item_id="b")  # after the hour the cart needs
    one = pipe()
    by_one = promotions(one, add) + promotions(one, late_view)
    batched = promotions(pipe(), add, late_view)  # one batch: the timer task never ran between
    assert [r["kind"] for r in by_one] == [r["kind"] for r in batched] == ["cart_abandonment"]
    assert by_one[0]["promotion_id"] == batched[0]["promotion_id"]
    early = pipe()
    assert promotions(early, add, msg("view", "v2", t + 100, item_id="b")) == []  # not due yet


def test_review_recovery_in_quiet_hours_waits_for_the_morning() -> None:
    p = pipe(quiet_hours="22-8")
    night = T0.replace(hour=23).timestamp()
    review = msg("review", "r1", night, item_id="i", rating=1)
    assert promotions(p, review) == []
    state = UserState.loads(p.users[b"u1"])
    assert state.promo[DEFERRED][0]["at"] == T0.replace(day=3, hour=8).timestamp()
    outputs, changed = p.due({review.partition}, wall=T0.timestamp())  # the clock is not there yet
    assert outputs == []
    p.timers.observe(review.partition, T0.replace(day=3, hour=8, minute=1).timestamp(), 0.0)
    outputs, changed = p.due({review.partition}, wall=0.0)
    (rec,) = [orjson.loads(o.value) for o in outputs]
    assert rec["kind"] == "review_recovery" and rec["trigger_event_id"] == "r1"
    p.store_due(changed)
    assert DEFERRED not in UserState.loads(p.users[b"u1"]).promo


def test_a_future_dated_event_cannot_run_the_clock_ahead_of_the_wall_clock() -> None:
    timers = CartTimers(after_s=3600, tolerance_s=300)
    wall = T0.timestamp()
    timers.observe(1, wall + 6 * 3600, wall)  # one view stamped six hours ahead
    assert timers.now(1, wall) == wall + 300
    timers.observe(1, wall - 50, wall + 10)  # an older event never moves the clock back
    assert timers.now(1, wall + 10) == wall + 310
    offline = CartTimers(after_s=3600)  # replays of old logs: event time alone
    offline.observe(1, wall + 6 * 3600, 0.0)
    assert offline.now(1, 0.0) == wall + 6 * 3600


def test_clocks_and_timers_are_rebuilt_from_stored_states() -> None:
    p = pipe()
    t = T0.timestamp()
    add = msg("cart", "c1", t, action="add", item_id="a", quantity=1)
    p.process([add])
    raw = p.users[b"u1"]
    fresh = pipe()  # a restarted worker: nothing in memory, no event on this partition yet
    assert fresh.timers.now(add.partition, t + 4000) is None
    fresh.users[b"u1"] = raw  # the table, recovered from its changelog
    fresh.seed_timers(add.partition, [(b"u1", raw)])
    # the state reached event time t at worker time t (the pipeline's clock): the clock runs on
    assert fresh.timers.now(add.partition, t + 4000) == t + 4000
    outputs, _ = fresh.due({add.partition}, wall=t + 4000)
    assert [orjson.loads(o.value)["kind"] for o in outputs] == ["cart_abandonment"]


def test_deliveries_confirm_every_future_or_fail_with_the_reason() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        d = Deliveries(timeout_s=1.0)
        ok = loop.create_future()
        ok.set_result("meta")
        d.add(ok)
        assert await d.confirm() == 1 and len(d) == 0
        bad = loop.create_future()
        bad.set_exception(RuntimeError("MessageSizeTooLarge"))
        d.add(bad)
        with pytest.raises(DeliveryFailed, match="1 of 1 records not delivered: RuntimeError"):
            await d.confirm()
        stuck = loop.create_future()  # never acknowledged, like a faust FutureMessage of a topic
        stuck.message = SimpleNamespace(channel=SimpleNamespace(get_topic_name=lambda: "shop.promotions"))  # type: ignore[attr-defined]
        d.add(stuck)
        d.timeout_s = 0.05
        with pytest.raises(
            DeliveryFailed,
            match=r"1 records not acknowledged by the broker within 0\.05s \(still waiting, by topic: "
            r"\{'shop.promotions': 1\}\)",
        ):
            await d.confirm()

    asyncio.run(scenario())


def test_records_taken_are_confirmed_apart_from_those_sent_after() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        d = Deliveries(timeout_s=0.05)
        first = loop.create_future()
        d.add(first, records=3)  # a record batch's future
        taken = d.take()
        later = loop.create_future()  # sent after the take, never acknowledged
        d.add(later, "shop.recommendations")
        first.set_result("meta")
        assert len(taken) == 1 and await taken.confirm() == 3
        assert len(d) == 1
        with pytest.raises(DeliveryFailed, match=r"shop\.recommendations"):
            await d.confirm()
        assert len(d) == 0 and await d.take().confirm() == 0

    asyncio.run(scenario())


def test_a_future_dated_event_fires_no_cart_early_and_keeps_the_budget_day() -> None:
    p = pipe()
    p.timers = CartTimers(p.s.cart_abandon_after_s, tolerance_s=300)  # as the worker has it
    t = T0.timestamp()
    add = msg("cart", "c1", t - 60, action="add", item_id="a", quantity=1, unit_price=10.0)
    ahead = msg("view", "v1", t + 6 * 3600, item_id="b")  # stamped six hours ahead of the clock
    assert promotions(p, add, ahead) == []  # the cart is one minute old, not abandoned
    assert p.timers.now(add.partition, t) == t + 300
