"""The faust application: topology on one screen.

    shop.searches ┐
    shop.views    │  route_by_user        shopstream.events-by-user     score_event
    shop.carts    ├─ validate, key by ──▶ (keyed by user id, N parts) ──▶ fold into `users`,
    shop.orders   │  user id                                             learn `items`, rank,
    shop.reviews  ┘      │                                                     │
                         └─▶ shop.deadletter (raw bytes + reason)              └─▶ shop.recommendations

Tables (rocksdb store, changelog topics ``<app_id>-<table>-changelog``):
- ``users``: user id -> ``UserState`` bytes, partitioned like the by-user topic (the producer's
  murmur2 partitioner on the raw key, so timers may write too); idle users are swept.
- ``items``: ``b"<partition>/<item>"`` -> co-visitation statistics of the baseline recommender.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
from faust.types import EventT, StreamT
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from streams import baseline
from streams.baseline import CovisitBaseline, partition_of_key
from streams.deadletter import DeadLetters
from streams.decode import EventDecoder
from streams.errors import RejectedInput, RejectReason
from streams.metrics import Metrics
from streams.records import CartEvent, OrderEvent, ReviewEvent, SearchEvent, ViewEvent, event_adapter
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


def build_app(settings: Settings, registry: CollectorRegistry | None = None) -> faust.App:
    """The worker's faust app with its topics, tables, agents, timer and web pages."""
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
    seeded: set[int] = set()
    deadletters = DeadLetters(app, settings.topic_deadletter, metrics)

    @app.agent(sources, name="route_by_user")
    async def route_by_user(stream: StreamT) -> None:
        """Validate each input message and forward it keyed by user id, or dead-letter it."""
        producer = app.producer
        target = settings.topic_events_by_user
        async for event in stream.events():
            msg = event.message
            try:
                ev = decoder.decode(msg.value, input_types.get(msg.topic))
            except RejectedInput as exc:
                await deadletters.send(msg, exc)
                continue
            await producer.send(
                target, ev.user_id.encode(), msg.value, None, msg.timestamp, msg.headers or None
            )
            metrics.events.labels(msg.topic, "ok").inc()

    @app.agent(by_user, name="score_event")
    async def score_event(stream: StreamT) -> None:
        """Fold each event into the user's state, learn the baseline, publish a recommendation."""
        async for event in stream.events():
            try:
                await _score(event)
            except Exception as exc:  # one bad event must not stop the partition
                log.exception("processing failed at %s", _where(event.message))
                await deadletters.send(event.message, RejectedInput(RejectReason.PROCESSING_ERROR, repr(exc)))

    async def _score(event: EventT) -> None:
        msg = event.message
        partition = msg.partition
        if partition not in seeded:  # first event of a newly assigned partition: one scan seeds all new ones
            fresh = [(k, v) for k, v in items.items() if partition_of_key(k) not in seeded]
            n = recommender.seed_popularity(fresh)
            seeded.update({partition_of_key(k) for k, _ in fresh} | {partition})
            log.info("popularity seeded from %d items (partitions now seeded: %s)", n, sorted(seeded))
        try:
            ev = event_adapter.validate_json(msg.value)
        except ValidationError as exc:
            raise RejectedInput(RejectReason.SCHEMA, str(exc)) from None
        key: bytes = msg.key
        raw = users.get(key)
        state = UserState.loads(raw) if raw else UserState()
        recent = state.recent_items(settings.covisit_window)
        tokens = state.apply(ev, int(time.time() * 1000), settings.sequence_length)
        if tokens is not None:
            users[key] = state.dumps()
            for item, kind, _t, _f in tokens:
                recommender.observe(partition, recent, item, kind)
                if item:  # keep ``recent`` equal to state.recent_items() without rescanning
                    recent = [item, *[r for r in recent if r != item]][: settings.covisit_window]
        else:
            metrics.duplicates.inc()  # state unchanged: ``recent`` is still the user's
        exclude = set(state.cart) | set(state.bought) | _items_of(ev)
        ranked = recommender.recommend(partition, recent, exclude, settings.recommendations)
        now = time.time()
        rec = {
            "schema_version": 1,
            "user_id": ev.user_id,
            "event_id": ev.event_id,
            "event_type": ev.type,
            "event_time": ev.event_time,
            "items": [{"item_id": i, "score": s} for i, s in ranked],
            "source": "baseline",
            "model_version": baseline.VERSION,
            "generated_at": datetime.fromtimestamp(now, UTC),
        }
        await app.producer.send(settings.topic_recommendations, key, orjson.dumps(rec), None, None, None)
        metrics.recommendations.labels("baseline").inc()
        if msg.timestamp:
            metrics.end_to_end.observe(max(0.0, now - msg.timestamp))

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

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    return app


def _items_of(ev: SearchEvent | ViewEvent | CartEvent | OrderEvent | ReviewEvent) -> set[str]:
    if isinstance(ev, OrderEvent):
        return {line.item_id for line in ev.lines}
    if isinstance(ev, SearchEvent):
        return {ev.clicked_item} if ev.clicked_item else set()
    return {ev.item_id}


def _where(msg: Any) -> str:
    return f"{msg.topic}[{msg.partition}]@{msg.offset}"
