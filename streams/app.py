"""The faust application: topology on one screen.

    shop.searches ┐
    shop.views    │  route_by_user        shopstream.events-by-user     score_event (micro-batches)
    shop.carts    ├─ validate, key by ──▶ (keyed by user id, N parts) ──▶ fold into `users`, learn
    shop.orders   │  user id                                             `items`, score with the ONNX
    shop.reviews  ┘      │                                               model, promotion policy
                         │                                                     │
                         └─▶ shop.deadletter (raw bytes + reason)              ├─▶ shop.recommendations
                                                                               └─▶ shop.promotions
    timers: cart_timers (event-time cart abandonment), reload_model (hot swap), expire_idle_users

Tables (rocksdb store, changelog topics ``<app_id>-<table>-changelog``):
- ``users``: user id -> ``UserState`` bytes, partitioned like the by-user topic (the producer's
  murmur2 partitioner on the raw key, so timers may write too); idle users are swept.
- ``items``: ``b"<partition>/<item>"`` -> co-visitation statistics of the baseline recommender.
- ``budget``: ``b"<partition>/<day>"`` -> discount spend of that partition on that event-time day.

The per-batch work lives in ``streams.pipeline`` (no faust there); this module wires it to topics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import EventT, StreamT
from prometheus_client import CollectorRegistry, generate_latest

from streams.baseline import CovisitBaseline, partition_of_key
from streams.deadletter import DeadLetters
from streams.decode import AnyEvent, EventDecoder
from streams.errors import RejectedInput
from streams.metrics import Metrics
from streams.pipeline import Message, Pipeline
from streams.promotions import Budget, CartTimers, Policy
from streams.scoring import Artifact, ModelWatcher
from streams.settings import Settings
from streams.state import UserState, seen_ms_of, user_partition

log = logging.getLogger(__name__)

RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
TABLE_RAW = {"key_type": bytes, "value_type": bytes}  # bytes types select the raw codec in tables


class ItemTable(faust.Table):  # type: ignore[misc]
    """A table whose keys name their partition (``b"<partition>/..."``)."""

    def partition_for_key(self, key: Any) -> int:
        return partition_of_key(key)


class UserTable(faust.Table):  # type: ignore[misc]
    """A table keyed by raw user-id bytes, partitioned exactly like the by-user topic.

    Kafka's default partitioner (murmur2 of the key bytes) picks the partition, computed here
    rather than taken from the current event: timers (expiry) write outside any event, and in
    a batch the "current event" may belong to another partition.
    """

    def partition_for_key(self, key: Any) -> int:
        return user_partition(key, self.partitions)


class _Message:
    __slots__ = ("partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


class _PartitionEvent:
    """Stands in for faust's current event: all a table store reads from it is the partition."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = _Message(topic, partition)


class PartitionScope:
    """``with scope(p):`` table reads and writes go to partition ``p``'s store.

    faust's RocksDB store chooses the partition database from the current event; inside a
    micro-batch that is the batch's last event and in a timer there is none (the changelog side
    is covered by the tables' ``partition_for_key``).
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.events: dict[int, _PartitionEvent] = {}  # strong references for faust's weakref

    @contextmanager
    def __call__(self, partition: int) -> Iterator[None]:
        ev = self.events.get(partition)
        if ev is None:
            ev = self.events[partition] = _PartitionEvent(self.topic, partition)
        token = _current_event.set(weakref.ref(ev))
        try:
            yield
        finally:
            _current_event.reset(token)


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "broker": [f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap_servers.split(",")],
    }
    creds = settings.kafka_client_options()
    if settings.kafka_sasl_mechanism:
        opts["broker_credentials"] = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=creds["sasl_plain_password"],
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=creds.get("ssl_context"),
        )
    elif "ssl_context" in creds:
        opts["broker_credentials"] = faust.SSLCredentials(creds["ssl_context"])
    return opts


def build_app(
    settings: Settings, registry: CollectorRegistry | None = None, *, direct: bool | None = None
) -> faust.App:
    """The worker's faust app with its topics, tables, agents, timer and web pages.

    ``direct`` (default ``settings.direct_input``): the scoring agent reads the input topics
    itself; only the caller knows whether they have the by-user topic's partition count (see
    ``inputs_copartitioned``), which faust needs to give a worker the same partitions of both."""
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry)
    app = faust.App(
        settings.app_id,
        **faust_broker_options(settings),
        store=settings.store,
        datadir=str(settings.data_dir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=settings.standby_replicas,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_rebalance_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=32768,
        broker_max_poll_records=10000,
        producer_linger=0.002,
        logging_config=None,
    )
    # faust warns and stalls when more than 100 changelog writes wait to be sent; one event
    # writes up to covisit_window + 2 of them, so give the buffer room for a poll's worth.
    app.producer.buffer.max_messages = 10_000
    decoder = EventDecoder(
        max_bytes=settings.max_message_bytes,
        min_event_time=settings.min_event_time,
        max_clock_skew_s=settings.max_clock_skew_s,
    )
    input_types = settings.input_topics
    sources = app.topic(*input_types, internal=False, **RAW)
    by_user = app.topic(settings.topic_events_by_user, partitions=settings.partitions, internal=False, **RAW)

    def table(cls: type[faust.Table], name: str, about: str) -> Any:
        """A raw-bytes table of our own class, registered with the app like ``app.Table`` does."""
        return app.tables.add(
            cls(
                app,
                name=name,
                partitions=settings.partitions,
                beacon=app.tables.beacon,
                help=about,
                **TABLE_RAW,
            )
        )

    users = table(UserTable, "users", "Per-user state.")
    items = table(ItemTable, "items", "Baseline co-visitation statistics, per partition.")
    recommender = CovisitBaseline(items, neighbors=settings.covisit_neighbors, window=settings.covisit_window)
    deadletters = DeadLetters(app, settings.topic_deadletter, metrics)

    direct = settings.direct_input if direct is None else direct
    by_user_name = by_user.get_topic_name()

    async def validated(msg: Any) -> AnyEvent | None:
        """The input message as a contract event, or None after dead-lettering it."""
        try:
            return decoder.decode(msg.value, input_types.get(msg.topic))
        except RejectedInput as exc:
            await deadletters.send(msg, exc)
            return None

    async def forward(msg: Any, key: bytes) -> None:
        """Re-key a validated input message by user onto the by-user topic."""
        await app.producer.send(by_user_name, key, msg.value, None, msg.timestamp, msg.headers or None)

    if not direct:

        @app.agent(sources, name="route_by_user")
        async def route_by_user(stream: StreamT) -> None:
            """Validate each input message and forward it keyed by user id, or dead-letter it."""
            async for event in stream.events():
                msg = event.message
                ev = await validated(msg)
                if ev is not None:
                    await forward(msg, ev.user_id.encode())
                    metrics.events.labels(msg.topic, "ok").inc()

    budget = table(ItemTable, "budget", "Discount spend per partition and event-time day.")
    models = ModelWatcher(
        settings.model_dir,
        settings.inference_provider,
        settings.inference_threads,
        on_change=lambda art, outcome: _model_changed(metrics, art, outcome),
    )
    models.load_initial()  # a broken artifact stops the worker here, with the reason
    timers = CartTimers(settings.cart_abandon_after_s)
    policy = Policy(settings, Budget(budget, settings.discount_budget_per_day / settings.partitions))
    pipeline = Pipeline(
        settings,
        users,
        recommender,
        models,
        policy,
        timers,
        metrics,
        scope=PartitionScope(by_user_name),
    )
    seeded: set[int] = set()  # partitions whose popularity and cart timers were rebuilt from the tables

    def seed(partitions: set[int]) -> None:
        """Rebuild in-memory popularity and cart timers of newly assigned partitions (one scan each)."""
        fresh = partitions - seeded
        if not fresh:
            return
        n = recommender.seed_popularity([(k, v) for k, v in items.items() if partition_of_key(k) in fresh])
        carts = pipeline.seed_timers(
            [(k, v) for k, v in users.items() if user_partition(k, settings.partitions) in fresh],
            lambda k: user_partition(k, settings.partitions),
        )
        seeded.update(fresh)
        log.info("partitions %s: popularity of %d items and %d cart timers restored", sorted(fresh), n, carts)

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        """Drop in-memory popularity and cart timers of partitions this worker gives up; if they
        come back they are rebuilt from the tables (which another worker may have changed)."""
        for p in {tp.partition for tp in revoked if tp.topic == by_user_name}:
            timers.drop(p)
            recommender.popular.pop(p, None)
            seeded.discard(p)

    def assigned() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == by_user_name}

    async def admit(events: list[EventT]) -> tuple[list[Message], list[EventT]]:
        """The batch's events this worker scores here, with the faust events they came from.

        By-user messages were validated by the router. An input message (direct mode) is
        validated once here: dead-lettered when invalid, scored here when its user's partition is
        the one it arrived on (producers keyed by user id with Kafka's default partitioner),
        otherwise re-keyed through the by-user topic to the worker that owns the user."""
        batch: list[Message] = []
        origin: list[EventT] = []
        ok: dict[str, int] = {}
        rerouted = 0
        for e in events:
            msg = e.message
            if msg.topic == by_user_name:
                batch.append(Message(msg.partition, msg.key, msg.value, msg.timestamp))
                origin.append(e)
                continue
            ev = await validated(msg)
            if ev is None:
                continue
            ok[msg.topic] = ok.get(msg.topic, 0) + 1
            key = ev.user_id.encode()
            if user_partition(key, settings.partitions) == msg.partition:
                batch.append(Message(msg.partition, key, msg.value, msg.timestamp, ev))
                origin.append(e)
            else:
                await forward(msg, key)
                rerouted += 1
        for topic, n in ok.items():
            metrics.events.labels(topic, "ok").inc(n)
        if rerouted:
            metrics.rerouted.inc(rerouted)
        return batch, origin

    async def handle(events: list[EventT]) -> None:
        batch, origin = await admit(events)
        if not batch:
            return
        partitions = {m.partition for m in batch}
        seed(partitions)
        result = pipeline.process(batch)
        for i, exc in result.failed:
            await deadletters.send(origin[i].message, exc)
        outputs = result.outputs
        if settings.promotions:  # carts that came due in the event time this batch moved past
            outputs += pipeline.due_carts(partitions, time.time())
        send = app.producer.send
        for topic, key, value in outputs:
            await send(topic, key, value, None, None, None)

    scored = app.topic(*input_types, by_user_name, internal=False, **RAW) if direct else by_user

    @app.agent(scored, name="score_event")
    async def score_event(stream: StreamT) -> None:
        """Fold events into user state, score them with the model in micro-batches, publish
        recommendations and promotions."""
        if settings.batch_max <= 1:
            async for event in stream.events():
                await handle([event])
        else:
            async for events in stream.take_events(settings.batch_max, within=settings.batch_wait_ms / 1000):
                await handle(list(events))

    @app.timer(interval=settings.promotion_tick_s)
    async def cart_timers() -> None:
        """Fire cart-abandonment promotions whose event-time timers came due."""
        if not settings.promotions or app.rebalancing or app.tables.recovery.in_recovery:
            return
        mine = assigned()
        for p in set(timers.heaps) - mine:
            timers.drop(p)  # revoked: the new owner rebuilds them from the table
        seed(mine)
        send = app.producer.send
        for topic, key, value in pipeline.due_carts(mine, time.time()):
            await send(topic, key, value, None, None, None)
        metrics.cart_timers.set(timers.pending())

    @app.timer(interval=settings.model_poll_s)
    async def reload_model() -> None:
        """Swap in a new model version exported into the model folder."""
        await models.poll()

    @app.timer(interval=settings.expiry_interval_s)
    async def expire_idle_users() -> None:
        """Delete users idle longer than the TTL (worker clock) from this worker's partitions."""
        cutoff = int((time.time() - settings.user_ttl_s) * 1000)
        expired = [k for k, v in users.items() if seen_ms_of(v) < cutoff]
        for i, key in enumerate(expired):
            del users[key]
            if i % 500 == 499:
                await asyncio.sleep(0)
        if expired:
            metrics.users_expired.inc(len(expired))
            log.info("expired %d idle users", len(expired))

    @app.page("/users/{user_id}/")
    @app.table_route(table=users, match_info="user_id")
    async def user_state(web: Any, request: Any, user_id: str) -> Any:
        raw = users.get(user_id.encode())
        return web.json(UserState.loads(raw).as_json() if raw else None)

    # --- health, readiness and the metrics that need the app -----------------------------------
    health = {"assigned": False, "recovery_started": 0.0}

    @app.on_partitions_assigned.connect
    async def count_assignment(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        health["assigned"] = True
        metrics.rebalances.inc()

    def readiness() -> tuple[bool, dict[str, Any]]:
        recovering = bool(app.tables.recovery.in_recovery)
        checks = {
            "consuming": bool(health["assigned"]) and not app.rebalancing,
            "tables_recovered": not recovering,
            "model_loaded": settings.model_dir is None or models.current is not None,
        }
        return all(checks.values()), checks

    consumed = {settings.topic_events_by_user, *settings.input_topics}

    @app.timer(interval=settings.metrics_interval_s)
    async def refresh_metrics() -> None:
        """Gauges that are read rather than counted: lag, table sizes, readiness, recovery time."""
        ok, _ = readiness()
        metrics.ready.set(1 if ok else 0)
        recovering = bool(app.tables.recovery.in_recovery)
        if recovering and not health["recovery_started"]:
            health["recovery_started"] = time.monotonic()
        elif not recovering and health["recovery_started"]:
            metrics.recovery_seconds.set(time.monotonic() - float(health["recovery_started"]))
            metrics.recoveries.inc()
            health["recovery_started"] = 0.0
        metrics.consumer_lag.clear()
        consumer = app.consumer
        for tp in app.assignor.assigned_actives():
            if tp.topic not in consumed:
                continue
            high = consumer.highwater(tp)
            last = consumer._read_offset.get(tp)  # faust's last offset handed to a stream
            done = last + 1 if last is not None else consumer._committed_offset.get(tp)
            if high is not None and done is not None:
                metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - done))
        for name, tbl in (("users", users), ("items", items), ("budget", budget)):
            metrics.table_keys.labels(name).set(estimate_keys(tbl))

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    @app.page("/debug/tasks")
    async def debug_tasks(web: Any, request: Any) -> Any:
        """Every asyncio task of the worker with where it waits: what to look at when it stalls."""
        out = []
        for task in asyncio.all_tasks():
            frames = [
                f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack(limit=12)
            ]
            out.append({"task": task.get_name(), "coro": repr(task.get_coro())[:200], "stack": frames})
        return web.json(out)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """The process is alive and its event loop answers."""
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        """200 when consuming, tables recovered and the model (if configured) loaded; else 503."""
        ok, checks = readiness()
        return web.json({"ready": ok, **checks}, status=200 if ok else 503)

    return app


def estimate_keys(table: Any) -> int:
    """Keys of a table's active partitions: RocksDB's estimate per partition database, else len()."""
    store = table.data
    try:
        return sum(
            int(db.property_int_value("rocksdb.estimate-num-keys") or 0) for db in store._dbs_for_actives()
        )
    except AttributeError:  # the memory:// store
        return len(table)


def _model_changed(metrics: Metrics, art: Artifact | None, outcome: str) -> None:
    metrics.model_reloads.labels(outcome).inc()
    if outcome != "failed":
        metrics.model_info.clear()
        if art is not None:
            metrics.model_info.labels(art.version, art.provider).set(1)
