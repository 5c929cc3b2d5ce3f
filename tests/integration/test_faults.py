"""Faults: a killed worker, a stopped broker and a worker lost from a group lose nothing.

At-least-once: every input event still gets its recommendation (redeliveries carry the same
event id and are counted), the user tables equal a recomputation from the by-user topic the
workers consumed, and promotions keep their deterministic ids (a redelivered trigger repeats an
id, never invents a new one). The checks are the helpers below; ``bench/soak.py`` reuses them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import ConsumerRecord, TopicPartition

from streams import price_response
from streams.admin import ensure_topics
from streams.delivery import EXIT_FATAL
from streams.pipeline import Message, local_pipeline
from streams.price_response import PriceReference
from streams.promotions import promotion_id
from streams.records import event_adapter
from streams.replay import rebase, replay
from streams.scoring import read_manifest, read_price_reference
from streams.settings import Settings
from streams.sources.datasets import Event, load
from streams.state import UserState, user_partition
from tests.integration.harness import (
    ROOT,
    PrivateBroker,
    WorkerProcess,
    collect,
    free_port,
    get_json,
    group_clients,
    isolated_env,
    partitions_of,
    read_to_end,
    settings_of,
    uncommitted_by_partition,
    values,
)

pytestmark = pytest.mark.integration

Records = list[ConsumerRecord[bytes, bytes]]


# --- the no-loss checks -----------------------------------------------------------------------


def answered(records: Records) -> set[str]:
    return {v["event_id"] for v in values(records)}


def first_answers_ms(records: Records) -> dict[str, int]:
    """Event id -> create time (worker clock, ms) of its first recommendation."""
    out: dict[str, int] = {}
    for r in records:
        if r.value is not None:
            eid = orjson.loads(r.value)["event_id"]
            out[eid] = min(out.get(eid, r.timestamp), r.timestamp)
    return out


def user_state(port: int, user: str, timeout: float = 120.0) -> Any:
    """The user's state (None: the worker holds none); a 503 (rebalance or recovery) asks again."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get_json(f"http://127.0.0.1:{port}/users/{user}/")
        if status in (200, 404):
            return body if status == 200 else None
        assert time.monotonic() < deadline, (port, user, status)
        time.sleep(0.5)


@dataclass
class NoLoss:
    """What the checks found; ``problems()`` is empty when nothing was lost or invented."""

    events_in: int
    answered: int
    redelivered: int  # recommendations beyond the first per event id
    promotion_ids: int
    promotion_repeats: int  # promotion records beyond the first per id
    users_checked: int
    promotion_conflicts: list[Any] = field(default_factory=list)  # one id, different promotions
    table_mismatches: list[str] = field(default_factory=list)
    promotions_missing: list[str] = field(default_factory=list)  # decided by the recomputation, not sent
    promotions_unexpected: list[str] = field(default_factory=list)  # sent, never decided by it
    # input and by-user records the group had not committed when the checks ran, by partition
    uncommitted: dict[str, int] = field(default_factory=dict)
    outcome_ids: int = 0
    outcomes_missing: list[str] = field(default_factory=list)  # converted by the recomputation, not sent
    outcomes_unexpected: list[str] = field(default_factory=list)  # for a promotion nothing decides
    outcome_conflicts: list[Any] = field(default_factory=list)  # one promotion, different outcomes
    # where the unanswered events are: ``topic[partition]`` -> their offsets and the group's commit
    unanswered_at: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.answered != self.events_in:
            out.append(
                f"{self.events_in - self.answered} of {self.events_in} events unanswered, "
                f"at: {self.unanswered_at}"
            )
        if self.promotions_missing:
            out.append(f"promotions lost: {self.promotions_missing[:10]}")
        if self.promotions_unexpected:
            out.append(f"promotions no recomputation decides: {self.promotions_unexpected[:10]}")
        if self.uncommitted:
            out.append(
                f"{sum(self.uncommitted.values())} input or by-user records never committed (a stalled "
                f"partition): {self.uncommitted}"
            )
        if self.outcomes_missing:
            out.append(f"promotion outcomes lost: {self.outcomes_missing[:10]}")
        if self.outcomes_unexpected:
            out.append(f"outcomes of promotions no recomputation decides: {self.outcomes_unexpected[:10]}")
        out += [f"one promotion, different outcomes: {c}" for c in self.outcome_conflicts]
        out += [f"promotion id reused for another promotion: {c}" for c in self.promotion_conflicts]
        out += [f"user table differs from the recomputation: {u}" for u in self.table_mismatches]
        return out

    def summary(self) -> str:
        return (
            f"events in {self.events_in}, answered {self.answered}, redelivered {self.redelivered}; "
            f"{self.promotion_ids} promotion ids, {self.promotion_repeats} repeated records, "
            f"{len(self.promotion_conflicts)} reused for another promotion; "
            f"{self.users_checked} users checked, {len(self.table_mismatches)} table mismatches; "
            f"promotions: {len(self.promotions_missing)} lost, {len(self.promotions_unexpected)} unexpected; "
            f"{self.outcome_ids} outcomes, {len(self.outcomes_missing)} lost, "
            f"{len(self.outcomes_unexpected)} unexpected, {len(self.outcome_conflicts)} conflicting; "
            f"{sum(self.uncommitted.values())} uncommitted"
        )


async def answer_all(
    settings: Settings, wanted: set[str], timeout: float = 180.0, worker: WorkerProcess | None = None
) -> Records:
    """The recommendations topic, read until every wanted event id is answered (or ``timeout``)."""
    return await collect(
        settings,
        settings.topic_recommendations,
        lambda rs: answered(rs) >= wanted,
        timeout=timeout,
        worker=worker,
    )


def scored_here(settings: Settings, record: Any, user_id: str) -> bool:
    """Whether the worker scored this record: every by-user record, and an input record on its
    user's partition (direct input; the others were forwarded through the by-user topic)."""
    return record.topic == settings.topic_events_by_user or (
        settings.direct_input and user_partition(user_id.encode(), settings.partitions) == record.partition
    )


Scored = list[tuple[ConsumerRecord[bytes, bytes], Any]]  # (the record an event was read from, the event)


async def scored_events(settings: Settings) -> Scored:
    """Every event the workers scored, once each: (the record they read it from, the event)."""
    out = []
    seen: set[str] = set()
    topics = [settings.topic_events_by_user, *settings.input_topics]
    for r in sorted(await read_to_end(settings, topics), key=lambda r: (r.topic, r.partition, r.offset)):
        try:
            ev = event_adapter.validate_json(r.value or b"")
        except ValueError:  # dead-lettered by the router
            continue
        if ev.event_id not in seen and scored_here(settings, r, ev.user_id):
            seen.add(ev.event_id)
            out.append((r, ev))
    return out


def recompute_users(
    events: Scored, sequence_length: int, prices: PriceReference | None = None
) -> tuple[dict[str, UserState], Counter[str]]:
    """The users the scored ``events`` make, and the tokens each was given in all (each event
    folded once; the comparison does not depend on the order, see ``differs``). ``prices``: the
    served model's price reference, whose evidence the worker folds with the promotions."""
    users: dict[str, UserState] = {}
    tokens: Counter[str] = Counter()
    for _, ev in sorted(events, key=lambda re: (re[0].timestamp, re[0].topic)):
        state = users.setdefault(ev.user_id, UserState())
        folded = state.apply(ev, 0, sequence_length)
        tokens[ev.user_id] += len(folded or ())
        if folded is not None and prices is not None:
            price_response.observe(state, ev, prices)
    return users, tokens


def served_prices(settings: Settings) -> PriceReference | None:
    """The price reference the workers fold (their model's, while promotions run), or None."""
    if not settings.promotions or settings.model_dir is None:
        return None
    return read_price_reference(read_manifest(settings.model_dir), settings.model_dir)


async def scoring_order(settings: Settings, events: Scored) -> Scored:
    """The scored ``events`` in the order the workers folded them into each user's state.

    Through the by-user topic that is its order in each partition. With direct input a user's
    events come from several input topics, interleaved as the worker fetched them, which no
    input topic records; the recommendations topic does: one recommendation per event, published
    in the order the worker scored them, on the user's partition. An event scored again after a
    restart (its state was not yet in the changelog) counts where it was scored last: the state
    restored from the changelog was folded without it."""
    if not any(r.topic != settings.topic_events_by_user for r, _ in events):
        return sorted(events, key=lambda re: (re[0].partition, re[0].offset))
    last: dict[str, tuple[int, int]] = {}
    for rec in await read_to_end(settings, [settings.topic_recommendations]):
        if rec.value is not None:
            last[orjson.loads(rec.value)["event_id"]] = (rec.partition, rec.offset)
    missing = [ev.event_id for _, ev in events if ev.event_id not in last]
    assert not missing, f"{len(missing)} scored events have no recommendation, e.g. {missing[:3]}"
    return sorted(events, key=lambda re: last[re[1].event_id])


async def recompute_promotions(settings: Settings, events: Scored) -> tuple[set[str], set[str], set[str]]:
    """The promotion ids a one-by-one run of the worker's pipeline over the scored events, in the
    order the workers folded them (``scoring_order``), decides: (certain, possible), and the ids
    of the event-driven promotions an order converts in that run (their outcomes are certain: a
    window converts on the user's first order after it). Event-driven ones and carts due by the
    newest event time are certain.

    Possible besides: the abandonment of any cart a user left holding items. The worker's clock
    runs on with the wall clock between events (so carts come due in quiet traffic), so whether a
    cart came due before the user's next event also depends on when that event arrived, which a
    recomputation from event times cannot know; its id is the cart event's either way."""
    pipeline = local_pipeline(settings, settings.discount_budget_per_day / settings.partitions)
    ids: set[str] = set()
    carts: set[str] = set()
    converted: set[str] = set()
    newest = 0.0
    for r, ev in await scoring_order(settings, events):
        key = ev.user_id.encode()
        msg = Message(user_partition(key, settings.partitions), key, r.value or b"", None)
        for out in pipeline.process([msg]).outputs:
            if out.topic == settings.topic_promotions:
                ids.add(orjson.loads(out.value)["promotion_id"])
            if out.topic == settings.topic_promotion_outcomes:
                o = orjson.loads(out.value)
                if o["closed_by"] == "order" and o["kind"] != "cart_abandonment":
                    converted.add(o["promotion_id"])
        newest = max(newest, ev.event_time.timestamp())
        if ev.type == "cart" and UserState.loads(pipeline.users[msg.key]).cart:
            carts.add(promotion_id(ev.user_id, "cart_abandonment", ev.event_id))
    parts = set(range(settings.partitions))

    def due_at(clock: float) -> set[str]:
        for p in parts:
            pipeline.timers.clock[p] = (clock, 0.0)
        return {orjson.loads(o.value)["promotion_id"] for o in pipeline.due_carts(parts, 0.0)}

    certain = ids | due_at(newest)
    return certain, certain | carts, converted


async def uncommitted(settings: Settings, timeout: float = 120.0) -> dict[str, int]:
    """Input and by-user records past the group's committed offsets (``topic[partition]`` -> how
    many), once none are left or ``timeout`` passed."""
    topics = [settings.topic_events_by_user, *settings.input_topics, *settings.control_topics]
    async with group_clients(settings) as (admin, consumer):
        end = await consumer.end_offsets(await partitions_of(consumer, topics))
        deadline = time.monotonic() + timeout
        while True:
            behind = await uncommitted_by_partition(admin, settings.app_id, end)
            if not behind or time.monotonic() > deadline:
                return {f"{tp.topic}[{tp.partition}] (end {end[tp]})": n for tp, n in behind.items()}
            await asyncio.sleep(1.0)


async def locate(settings: Settings, event_ids: set[str]) -> dict[str, str]:
    """Where the records of ``event_ids`` are in the input and by-user topics: ``topic[partition]``
    -> how many, their offsets' range and the group's committed offset there (a diagnosis for
    unanswered events: never forwarded, forwarded and committed past, or waiting)."""
    if not event_ids:
        return {}
    topics = [settings.topic_events_by_user, *settings.input_topics]
    at: dict[tuple[str, int], list[int]] = {}
    for r in await read_to_end(settings, topics):
        try:
            ev = event_adapter.validate_json(r.value or b"")
        except ValueError:
            continue
        if ev.event_id in event_ids:
            at.setdefault((r.topic, r.partition), []).append(r.offset)
    async with group_clients(settings) as (admin, _):
        done = await admin.list_consumer_group_offsets(
            settings.app_id, partitions=[TopicPartition(t, p) for t, p in at]
        )
    return {
        f"{t}[{p}]": f"{len(o)} at offsets {min(o)}-{max(o)}, committed "
        f"{done[TopicPartition(t, p)].offset if TopicPartition(t, p) in done else None}"
        for (t, p), o in sorted(at.items())
    }


def differs(got: Any, want: UserState, tokens: int, max_len: int) -> list[str]:
    """The fields of a served user state that differ from the recomputation.

    One user's events come from up to five input topics, and the order in which the worker
    interleaved them is not recorded anywhere, so only what does not depend on it is compared:
    counts, reviews and the latest event time always, the tokens as a multiset while the user has
    no more than ``max_len`` (none fell out of the window), the cart while no order removed
    items from it (adds and removes share one topic, whose order is kept)."""
    if got is None:
        return ["missing"]
    out = [
        f
        for f, w in (("counts", want.counts), ("reviews", want.reviews), ("last", want.last_event_s))
        if got[f] != w
    ]
    if tokens <= max_len:
        if sorted(orjson.dumps(t) for t in got["seq"]) != sorted(orjson.dumps(t) for t in want.seq):
            out.append("seq")
    elif len(got["seq"]) != max_len:
        out.append("seq length")
    if "order" not in want.counts and got["cart"] != want.cart:
        out.append("cart")
    # the price evidence: a count and a sum, the same in any order (the sum to its rounding)
    n, total = got["promo"].get(price_response.EVIDENCE, (0, 0.0))
    want_n, want_total = want.promo.get(price_response.EVIDENCE, (0, 0.0))
    if n != want_n or abs(total - want_total) > 1e-4:
        out.append("price evidence")
    return out


async def no_loss(
    settings: Settings, wanted: set[str], recs: Records, ports: Sequence[int], sample: int | None = 40
) -> NoLoss:
    """Compare what the workers published and hold with what went in.

    The tables are checked for ``sample`` users spread over the partitions (None: every user);
    each user is asked of the workers in turn (a worker forwards a key it does not own to its
    owner)."""
    ids = Counter(v["event_id"] for v in values(recs))
    events = await scored_events(settings)
    expected, tokens = recompute_users(events, settings.sequence_length, served_prices(settings))
    users = sorted(expected)
    if sample:
        users = users[:: max(1, len(users) // sample)]
    mismatches = []
    for i, user in enumerate(users):
        bad = differs(
            user_state(ports[i % len(ports)], user), expected[user], tokens[user], settings.sequence_length
        )
        if bad:
            mismatches.append(f"{user} ({', '.join(bad)})")

    behind = await uncommitted(settings)
    promos = values(await read_to_end(settings, [settings.topic_promotions]))
    per_id: dict[str, set[tuple[str, str, str]]] = {}
    for p in promos:  # a repeated id is the same promotion re-sent: consumers deduplicate on it
        per_id.setdefault(p["promotion_id"], set()).add((p["kind"], p["user_id"], p["trigger_event_id"]))
    certain, possible, converted = await recompute_promotions(settings, events)
    outcomes = values(await read_to_end(settings, [settings.topic_promotion_outcomes]))
    per_outcome: dict[str, set[tuple[bool, str | None]]] = {}
    for o in outcomes:  # re-sent after a redelivery: the same outcome again
        per_outcome.setdefault(o["promotion_id"], set()).add((o["converted"], o["order_id"]))
    return NoLoss(
        events_in=len(wanted),
        answered=len(set(ids) & wanted),
        redelivered=sum(n - 1 for n in ids.values()),
        promotion_ids=len(per_id),
        promotion_repeats=len(promos) - len(per_id),
        users_checked=len(users),
        promotion_conflicts=[sorted(s) for s in per_id.values() if len(s) > 1],
        table_mismatches=mismatches,
        promotions_missing=sorted(certain - set(per_id)),
        promotions_unexpected=sorted(set(per_id) - possible),
        uncommitted=behind,
        outcome_ids=len(per_outcome),
        outcomes_missing=sorted(converted - set(per_outcome)),
        outcomes_unexpected=sorted(set(per_outcome) - possible),
        outcome_conflicts=[sorted(s, key=str) for s in per_outcome.values() if len(s) > 1],
        unanswered_at=await locate(settings, wanted - set(ids)),
    )


def demo_env(bootstrap: str, workdir: Path, **extra: str) -> dict[str, str]:
    return isolated_env(
        bootstrap,
        workdir,
        SHOPSTREAM_MODEL_DIR=str(ROOT / "deploy" / "demo" / "model"),
        SHOPSTREAM_INFERENCE_PROVIDER="cpu",
        SHOPSTREAM_QUIET_HOURS="",
        # no frequency cap: when the timer task fires a cart (wall clock) against when the next
        # event of the user arrives would change which later triggers the cap lets through, and
        # the recomputation checks every promotion by id
        SHOPSTREAM_FREQUENCY_CAP="100000",
        **extra,
    )


def live_events(settings: Settings) -> list[Event]:
    """The REES46 sample, its times shifted once so that the last event is now."""
    events = list(load("rees46-demo", settings.datasets_dir))
    rebase(events, None, time.time())
    return events


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", ["true", "false"], ids=["direct-input", "by-user-hop"])
async def test_kill_9_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap: str, tmp_path: Path, direct: str
) -> None:
    """Input keyed by user id: scored where it is read (direct input), or every event through the
    by-user topic."""
    settings = settings_of(env := demo_env(kafka_bootstrap, tmp_path, SHOPSTREAM_DIRECT_INPUT=direct))
    await ensure_topics(settings)
    events = live_events(settings)
    wanted = {e["event_id"] for e in events}
    first = WorkerProcess(env, tmp_path / "worker1.log").start()
    await replay(settings, events, keep_time=True, progress=False)

    partial = await collect(
        settings, settings.topic_recommendations, lambda rs: len(answered(rs)) >= 800, worker=first
    )
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-stream, no clean shutdown
    killed_at = len(answered(partial))
    assert killed_at < len(wanted), "the worker finished before it was killed: nothing was tested"

    second = WorkerProcess(env, tmp_path / "worker2.log").start()  # same data dir and group
    started = time.monotonic()
    try:
        recs = await answer_all(settings, wanted, worker=second)
        recovered_s = time.monotonic() - started
        checks = await no_loss(settings, wanted, recs, [settings.web_port])
        assert not checks.problems(), checks.problems()
        print(f"\nkilled after {killed_at}/{len(wanted)} answered; all answered {recovered_s:.1f}s later")
        print(checks.summary())
    finally:
        assert second.stop() == 0, second.tail()


def cpu_seconds(worker: WorkerProcess) -> float:
    assert worker.proc is not None
    fields = Path(f"/proc/{worker.proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def test_broker_stopped_mid_stream_worker_resumes(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """The broker goes away for 20 s while the worker is busy; the same worker process carries on,
    without spinning while it waits."""
    # the outage is 20 s plus the broker's shutdown and start, which took over 60 s together on a
    # busy machine: the sends waiting through it must not hit the 60 s delivery timeout (which
    # stops the worker by design, test_output_refused_by_the_broker_stops_the_worker_unacked)
    env = demo_env(private_broker.bootstrap, tmp_path, SHOPSTREAM_DELIVERY_TIMEOUT_S="600")
    settings = settings_of(env)
    await ensure_topics(settings)
    events = live_events(settings)
    wanted = {e["event_id"] for e in events}
    before, after = events[:2000], events[2000:]
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await replay(settings, before, keep_time=True, progress=False)
        partial = await collect(
            settings, settings.topic_recommendations, lambda rs: len(answered(rs)) >= 800, worker=worker
        )
        stopping_ms, cpu = int(time.time() * 1000), cpu_seconds(worker)
        private_broker.run("down")
        await asyncio.sleep(20)
        assert worker.alive(), worker.tail()
        cpu = cpu_seconds(worker) - cpu
        private_broker.run("up")  # same data folder: the log survives
        up_ms = int(time.time() * 1000)
        await replay(settings, after, keep_time=True, progress=False)  # the stream goes on

        recs = await answer_all(settings, wanted, worker=worker)
        checks = await no_loss(settings, wanted, recs, [settings.web_port])
        assert not checks.problems(), checks.problems()
        failed_refreshes = worker.log.read_text(errors="replace").count("Unable to update metadata")
        firsts = first_answers_ms(recs)
        late = sum(1 for e in before if firsts[e["event_id"]] >= stopping_ms)
        print(
            f"\nbroker stopped after {len(answered(partial))}/{len(wanted)} answered "
            f"({late} of the first {len(before)} answered after the stop began); worker CPU while "
            f"it was away: {cpu:.1f}s in 20s, {failed_refreshes} failed metadata refreshes logged; "
            f"all answered {(max(firsts.values()) - up_ms) / 1000:.1f}s after the broker was back"
        )
        print(checks.summary())
        assert failed_refreshes < 2000, "the worker retried in a busy loop while the broker was away"
    finally:
        assert worker.stop() == 0, worker.tail()


def owners(port: int, settings: Settings) -> dict[int, set[int]]:
    """Web port -> the by-user partitions that worker owns, as the group's assignment says."""
    status, body = get_json(f"http://127.0.0.1:{port}/router/users/")
    if status != 200 or not body:
        return {}
    return {
        int(url.rpartition(":")[2].rstrip("/")): {p for parts in tps.values() for p in parts}
        for url, tps in body.items()
    }


def stuck_tasks(port: int) -> str:
    """Where a live worker's tasks wait (``/debug/tasks``), the ones in our code or faust's
    consumer, and where its fetching stands per partition (``/debug/consumer``): what a check
    that found a worker wedged reports."""
    status, tasks = get_json(f"http://127.0.0.1:{port}/debug/tasks")
    if status != 200 or not tasks:
        return f"(no /debug/tasks on port {port}: {status})"
    ours = ("/streams/", "/faust/", "/aiokafka/")
    mine = [t for t in tasks if any(m in f for f in t["stack"] for m in ours) and "debug_tasks" not in str(t)]
    where = "\n".join(f"{t['task']}: {' -> '.join(f.rpartition('/')[2] for f in t['stack'])}" for t in mine)
    status, state = get_json(f"http://127.0.0.1:{port}/debug/consumer")
    if status != 200 or not isinstance(state, dict):
        return f"{where}\n(no /debug/consumer on port {port}: {status})"
    parts = state.pop("partitions")
    rows = "\n".join(str(p) for p in parts if "changelog" not in p["topic"])
    return f"{where}\nconsumer: {state}\n{rows}"


async def until(check: Any, what: str, worker: WorkerProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert worker.alive(), worker.tail()
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s:\n{worker.tail()}"
        await asyncio.sleep(0.3)


async def test_two_workers_one_killed_and_restarted_loses_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """One group of two workers with standby replicas; one is killed mid-stream: the other takes
    its partitions over, it comes back, the partitions are shared again and nothing is lost."""
    env = demo_env(
        kafka_bootstrap,
        tmp_path,
        SHOPSTREAM_PARTITIONS="4",
        SHOPSTREAM_STANDBY_REPLICAS="1",
    )
    settings = settings_of(env)
    envs = [
        {**env, "SHOPSTREAM_DATA_DIR": str(tmp_path / name), "SHOPSTREAM_WEB_PORT": str(free_port())}
        for name in ("a", "b")
    ]
    ports = [int(e["SHOPSTREAM_WEB_PORT"]) for e in envs]
    await ensure_topics(settings)
    events = live_events(settings)
    wanted = {e["event_id"] for e in events}
    a, b = (WorkerProcess(e, tmp_path / f"worker-{n}.log").start() for e, n in zip(envs, "ab", strict=True))
    try:
        for w, port in ((a, ports[0]), (b, ports[1])):
            await until(lambda p=port: get_json(f"http://127.0.0.1:{p}/readyz")[0] == 200, "ready", w)
        await until(lambda: all(owners(ports[1], settings).get(p) for p in ports), "both own partitions", b)
        a_parts = owners(ports[1], settings)[ports[0]]

        # half the stream, a killed once 800 are answered, then the rest: a's partitions always have
        # events left to take over, however far the workers got before the kill
        half = len(events) // 2
        await replay(settings, events[:half], keep_time=True, progress=False)
        await collect(settings, settings.topic_recommendations, lambda rs: len(answered(rs)) >= 800, worker=b)
        kill_ms = int(time.time() * 1000)
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        await replay(settings, events[half:], keep_time=True, progress=False)

        def a_answers(rs: Records) -> list[int]:
            """Create times of answers to events of a's partitions given after the kill."""
            parts = (user_partition(v["user_id"].encode(), settings.partitions) for v in values(rs))
            return [
                r.timestamp for r, p in zip(rs, parts, strict=True) if p in a_parts and r.timestamp > kill_ms
            ]

        taken_over = await collect(settings, settings.topic_recommendations, a_answers, worker=b)
        assert a_answers(taken_over), (
            f"worker b answered none of a's partitions {sorted(a_parts)} after the kill:\n"
            f"{b.notable()}\n{stuck_tasks(ports[1])}"
        )
        next_answer_s = (min(a_answers(taken_over)) - kill_ms) / 1000

        restarted = time.monotonic()
        a = WorkerProcess(envs[0], tmp_path / "worker-a.log").start()  # same data dir, back in the group
        await until(
            lambda: get_json(f"http://127.0.0.1:{ports[0]}/readyz")[0] == 200, "ready after restart", a
        )
        ready_s = time.monotonic() - restarted
        await until(
            lambda: all(owners(ports[0], settings).get(p) for p in ports), "partitions shared again", a
        )

        recs = await answer_all(settings, wanted, worker=b)
        assert a.alive(), a.tail()
        checks = await no_loss(settings, wanted, recs, ports)
        assert not checks.problems(), (
            checks.problems(),
            a.notable(),
            b.notable(),
            *(stuck_tasks(p) for p in ports),
        )
        print(
            f"\nworker a (partitions {sorted(a_parts)}) killed; worker b answered a's next event "
            f"{next_answer_s:.1f}s after the kill; a ready {ready_s:.1f}s after its restart; "
            f"all answered {(max(first_answers_ms(recs).values()) - kill_ms) / 1000:.1f}s after the kill"
        )
        print(checks.summary())
    finally:
        codes = {w.log.name: w.stop() for w in (a, b)}  # a: the restarted one, or the killed one
        assert set(codes.values()) <= {0, -signal.SIGKILL}, (codes, a.tail(), b.tail())


async def set_topic_config(settings: Settings, topic: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        await admin.close()


async def test_output_refused_by_the_broker_stops_the_worker_unacked(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The recommendations topic starts refusing records mid-stream (its max.message.bytes lowered
    below a recommendation's size): the worker exits with code 70 before committing the offsets of
    events whose answers were refused; once the topic accepts records again, the restarted worker
    answers every event and nothing is lost."""
    settings = settings_of(env := demo_env(kafka_bootstrap, tmp_path))
    await ensure_topics(settings)
    events = live_events(settings)
    wanted = {e["event_id"] for e in events}
    first = WorkerProcess(env, tmp_path / "worker1.log").start()
    await replay(settings, events[:1500], keep_time=True, progress=False)
    partial = await collect(
        settings, settings.topic_recommendations, lambda rs: len(answered(rs)) >= 500, worker=first
    )
    await set_topic_config(settings, settings.topic_recommendations, {"max.message.bytes": "200"})
    await replay(settings, events[1500:], keep_time=True, progress=False)
    proc = first.proc
    assert proc is not None
    code = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(timeout=180))
    log = first.log.read_text(errors="replace")
    assert code == EXIT_FATAL, (code, first.tail())
    assert "exiting with 70" in log and "MessageSizeTooLarge" in log, first.tail()

    await set_topic_config(settings, settings.topic_recommendations, {"max.message.bytes": "1048588"})
    second = WorkerProcess(env, tmp_path / "worker2.log").start()
    try:
        recs = await answer_all(settings, wanted, worker=second)
        checks = await no_loss(settings, wanted, recs, [settings.web_port])
        assert not checks.problems(), checks.problems()
        print(f"\nrefused after {len(answered(partial))}/{len(wanted)} answered; worker 1 exited {code}")
        print(checks.summary())
    finally:
        assert second.stop() == 0, second.tail()
