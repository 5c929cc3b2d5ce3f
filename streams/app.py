"""The faust application: topology on one screen.

    shop.searches ┐
    shop.views    │  route_by_user        shopstream.events-by-user     score_event (micro-batches)
    shop.carts    ├─ validate, key by ──▶ (keyed by user id, N parts) ──▶ fold into `users`, learn
    shop.orders   │  user id                                             `items`, score with the ONNX
    shop.reviews  │      │                                               model, promotion policy;
    shop.erasures │      │                                               erasures delete the user's
    shop.consents ┘      │                                               state, consents are kept
                         │                                                     │
                         └─▶ shop.deadletter (raw bytes + reason)              ├─▶ shop.recommendations
                                                                               └─▶ shop.promotions
    timers: cart_timers (event-time cart abandonment), reload_model (hot swap), expire_idle_users

Tables (rocksdb store, changelog topics ``<app_id>-<table>-changelog``):
- ``users``: user id -> ``UserState`` bytes, partitioned like the by-user topic (the producer's
  murmur2 partitioner on the raw key, so timers may write too); idle users are swept.
- ``items``: ``b"<partition>/<item>"`` -> co-visitation statistics of the baseline recommender;
  its changelog packs many keys per record (``streams.changelog``).
- ``budget``: ``b"<partition>/<day>"`` -> discount spend of that partition on that event-time day.

The per-batch work lives in ``streams.pipeline`` (no faust there); this module wires it to topics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import EventT, StreamT
from prometheus_client import CollectorRegistry, generate_latest

from streams.baseline import CovisitBaseline, partition_of_key
from streams.changelog import DirectChangelog, unpacked
from streams.checkpoint import Checkpoints
from streams.consumer import install as install_consumer
from streams.deadletter import DeadLetters
from streams.decode import EventDecoder
from streams.delivery import Deliveries, exit_fatally
from streams.errors import DeliveryFailed, RejectedInput
from streams.expiry import ExpiryIndex
from streams.metrics import Metrics
from streams.pipeline import Message, Pipeline
from streams.producer import install as install_producer
from streams.progress import Progress
from streams.promotions import Budget, CartTimers, Policy, expiry_residue
from streams.publish import Publisher
from streams.scoring import Artifact, ModelWatcher
from streams.settings import Settings
from streams.state import UserState, user_partition
from streams.writeback import WriteBack

log = logging.getLogger(__name__)

RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
TABLE_RAW = {"key_type": bytes, "value_type": bytes}  # bytes types select the raw codec in tables
EXPIRY_SLICE = 5000  # users deleted per sweep at most (the rest follow at the next tick)
# sends awaiting their acknowledgement that make a batch wait for them rather than leave them to
# the next checkpoint (bounds their memory should the broker lag)
CONFIRM_AT = 20_000


class ConfirmedTable(faust.Table):  # type: ignore[misc]
    """A table whose changelog writes through faust are confirmed before the next commit.

    faust sends changelog records from a buffer and reports a failed one only to a callback; the
    worker collects their futures in ``deliveries``, which a commit awaits before it commits any
    offset (``checkpoint``)."""

    deliveries: Deliveries | None = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        if self.deliveries is not None:
            self.deliveries.add(fut)
        return fut


class ItemTable(ConfirmedTable):
    """A table whose keys name their partition (``b"<partition>/..."``)."""

    def partition_for_key(self, key: Any) -> int:
        return partition_of_key(key)


class PackedItemTable(ItemTable):
    """An ``ItemTable`` whose changelog records may be packed (``streams.changelog``): recovery
    and standby replicas store each packed key."""

    def apply_changelog_batch(self, batch: Iterable[EventT]) -> None:
        super().apply_changelog_batch(unpacked(batch))


class UserTable(ConfirmedTable):
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


def build_app(settings: Settings, registry: CollectorRegistry | None = None) -> faust.App:
    """The worker's faust app with its topics, tables, agents, timers and web pages."""
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
        broker_commit_interval=settings.commit_interval_s,
        stream_buffer_maxsize=32768,
        broker_max_poll_records=10000,
        producer_linger=0.002,
        producer_max_batch_size=settings.producer_batch_bytes,
        logging_config=None,
    )
    install_consumer(
        app,
        on_jump=metrics.offset_jumped,
        checkpoint=lambda: checkpoints.checkpoint(),  # defined below, with the tables and the lock
        on_refetch=metrics.refetching,
    )
    install_producer(app)  # its metadata is never narrowed to the topics sent to (streams.producer)
    # faust's buffer of table writes sent through faust (``ConfirmedTable``): the worker's own
    # checkpoints bypass it (``streams.changelog``); room for a poll's worth should anything use it
    app.producer.buffer.max_messages = 10_000
    decoder = EventDecoder.from_settings(settings)
    # behaviour events and the requests about a user (erasure, consent) take the same by-user hop,
    # so each is applied in order with the user's events on the worker that owns the user's state
    input_types = {**settings.input_topics, **settings.control_topics}
    sources = app.topic(*input_types, internal=False, **RAW)
    by_user = app.topic(settings.topic_events_by_user, partitions=settings.partitions, internal=False, **RAW)

    deliveries = Deliveries(settings.delivery_timeout_s)  # the scorer's and the timers' records

    def table(cls: type[ConfirmedTable], name: str, about: str) -> Any:
        """A raw-bytes table of our own class, registered with the app like ``app.Table`` does;
        its changelog writes are confirmed with ``deliveries``."""
        t = cls(
            app, name=name, partitions=settings.partitions, beacon=app.tables.beacon, help=about, **TABLE_RAW
        )
        t.deliveries = deliveries
        return app.tables.add(t)

    users = table(UserTable, "users", "Per-user state.")
    items = table(PackedItemTable, "items", "Baseline co-visitation statistics, per partition.")
    budget = table(ItemTable, "budget", "Discount spend per partition and event-time day.")
    # batches and timers change the tables through write-back views; each commit writes the
    # changed keys once and waits for them before it commits offsets (``streams.writeback``)
    users_wb, items_wb, budget_wb = (WriteBack(t, t.partition_for_key) for t in (users, items, budget))
    # the items' records packed: a few per partition and checkpoint instead of one per item
    packed = DirectChangelog(
        items,
        app.producer._ensure_producer,
        deliveries,
        packed=True,
        packed_bytes=settings.producer_batch_bytes // 2,
    )
    changelogs = [
        (users_wb, DirectChangelog(users, app.producer._ensure_producer, deliveries)),
        (items_wb, packed),
        (budget_wb, DirectChangelog(budget, app.producer._ensure_producer, deliveries)),
    ]
    recommender = CovisitBaseline(
        items_wb, neighbors=settings.covisit_neighbors, window=settings.covisit_window
    )
    deadletters = DeadLetters(app, settings.topic_deadletter, metrics)
    by_user_name = by_user.get_topic_name()
    # One batch, timer or sweep at a time touches the tables and the pending deliveries: a cart
    # timer must not store a state while a batch holds a newer copy of it, and one task's
    # ``confirm()`` must not take another's futures (nor a checkpoint's: every ``confirm()`` of
    # ``deliveries`` runs under this lock, so none is half done when a checkpoint takes them).
    work = asyncio.Lock()

    publisher = Publisher(app.producer._ensure_producer, deliveries)

    async def publish(outputs: Iterable[tuple[str, bytes, bytes]]) -> None:
        """Hand outputs to the producer; their acknowledgements are awaited by the next
        ``confirm()``, at the latest the next checkpoint's, before any offset after them is
        committed."""
        await publisher.publish((topic, key, value, None, None) for topic, key, value in outputs)

    async def confirm() -> None:
        metrics.delivered.inc(await deliveries.confirm())

    async def run_batch(what: str, body: Any, events: list[EventT]) -> None:
        """Run ``body(events)`` (which publishes and confirms) to its end, whatever happens to
        the caller.

        No exception leaves an agent: faust would restart it on the same stream, ack the failed
        batch and strand the events its buffer held (faust-notes trap 7). A batch that fails
        beyond its per-event dead letters ends the process, unacked. A cancellation (shutdown)
        waits for the batch to finish, so a batch is never acked half done."""
        task = asyncio.ensure_future(body(events))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await asyncio.wait([task])
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                exit_fatally(what, exc)
            raise
        except Exception as exc:
            exit_fatally(what, exc)

    routed = Deliveries(settings.delivery_timeout_s)  # the router's own: it runs beside the scorer
    forwarder = Publisher(app.producer._ensure_producer, routed)

    # by-user partitions this worker may score input on directly: added when assigned, removed
    # (under ``work``) when revoked, so a batch never scores for a partition given up meanwhile
    direct_parts: set[int] = set()

    async def route(events: list[EventT]) -> None:
        """Validate input messages; score those already on their user's partition here (direct
        input), forward the rest keyed by user id, dead-letter the invalid ones."""
        ok: dict[str, int] = {}
        forwards = []
        candidates: list[tuple[Message, Any]] = []
        # direct input: a message on partition p of an input topic whose user's state lives in
        # partition p of ``users`` is scored here when this worker owns that partition. faust
        # assigns partition p of co-partitioned topics (same partition count) to one worker, so
        # with inputs of SHOPSTREAM_PARTITIONS partitions keyed by user id (murmur2) that is every
        # message; the ownership check keeps it right should an input's partition count differ
        for e in events:
            msg = e.message
            try:
                ev = decoder.decode_input(msg.value, input_types.get(msg.topic))
            except RejectedInput as exc:
                routed.add(await deadletters.send(msg, exc), deadletters.topic)
                continue
            key = ev.user_id.encode()
            ok[msg.topic] = ok.get(msg.topic, 0) + 1
            if settings.direct_input and user_partition(key, settings.partitions) == msg.partition:
                candidates.append((Message(msg.partition, key, msg.value, msg.timestamp, ev), msg))
            else:
                forwards.append((by_user_name, key, msg.value, msg.headers, msg.timestamp))
        if not candidates:
            await forward(forwards)
        else:
            async with work:
                local = [(m, src) for m, src in candidates if m.partition in direct_parts]
                for m, src in candidates:
                    if m.partition not in direct_parts:
                        forwards.append((by_user_name, m.key, m.value, src.headers, m.timestamp))
                await forward(forwards)
                if local:
                    metrics.routed.labels("direct").inc(len(local))
                    await score_locked([m for m, _ in local], [src for _, src in local])
        for topic, n in ok.items():
            metrics.events.labels(topic, "ok").inc(n)

    async def forward(forwards: list[Any]) -> None:
        """Hand the forwards to the producer; they are confirmed, with the batch's dead letters,
        by the next checkpoint, before any offset of their events is committed."""
        if forwards:
            metrics.routed.labels("hop").inc(len(forwards))
            await forwarder.publish(forwards)
        if len(routed) >= CONFIRM_AT:
            metrics.delivered.inc(await routed.confirm())  # bounds the records awaiting acknowledgement

    @app.agent(sources, name="route_by_user")
    async def route_by_user(stream: StreamT) -> None:
        """Validate input in micro-batches, score what is on its user's partition, re-key the rest
        by user id; a batch is acked once its records (outputs, forwards, dead letters) are
        handed to the producer, and its offsets are committed once the broker confirmed them
        (``checkpoint``)."""
        async for events in stream.take_events(settings.batch_max, within=settings.batch_wait_ms / 1000):
            await run_batch("routing a batch", route, list(events))

    models = ModelWatcher(
        settings.model_dir,
        settings.inference_provider,
        settings.inference_threads,
        on_change=lambda art, outcome: _model_changed(metrics, art, outcome),
    )
    metrics.watch_models(models)  # model age, last retrain decisions: read when it polls
    models.load_initial()  # a broken artifact stops the worker here, with the reason
    timers = CartTimers(settings.cart_abandon_after_s, settings.event_clock_tolerance_s)
    policy = Policy(settings, Budget(budget_wb, settings.discount_budget_per_day / settings.partitions))
    scope = PartitionScope(by_user_name)
    pipeline = Pipeline(settings, users_wb, recommender, models, policy, timers, metrics, scope=scope)

    checkpoints: Checkpoints = Checkpoints(
        changelogs, scope, work, [deliveries, routed], settings.delivery_timeout_s, metrics
    )
    write_pending = checkpoints.write_pending

    # buckets as fine as the sweep runs: a user goes at most one sweep interval after the TTL
    expiry = ExpiryIndex(int(settings.user_ttl_s * 1000), max(1, int(settings.expiry_interval_s * 1000)))
    seeded: set[int] = set()  # partitions whose popularity, timers, clocks and expiry were rebuilt

    async def seed(partitions: set[int]) -> None:
        """Rebuild the in-memory state of newly assigned partitions from the tables (one scan
        each): popularity, cart timers, event-time clocks and the expiry index."""
        fresh = partitions - seeded
        if not fresh:
            return
        await write_pending(fresh)  # nothing should be pending there; the scans below read the tables
        n = recommender.seed_popularity([(k, v) for k, v in items.items() if partition_of_key(k) in fresh])
        entries: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in fresh}
        for k, v in users.items():
            part = entries.get(user_partition(k, settings.partitions))
            if part is not None:
                part.append((k, v))
        for p, kv in entries.items():
            pipeline.seed_timers(p, kv)
            expiry.seed(p, kv)
        seeded.update(fresh)
        log.info(
            "partitions %s: popularity of %d items, %d cart timers and %d users' expiry restored",
            sorted(fresh),
            n,
            timers.pending(),
            expiry.pending(),
        )

    def forget(partitions: set[int]) -> None:
        for p in partitions:
            timers.drop(p)
            expiry.drop(p)
            recommender.popular.pop(p, None)
            seeded.discard(p)
        packed.forget(partitions)

    @app.on_partitions_revoked.connect
    async def forget_revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        """Write what is pending for the partitions this worker gives up (faust's commit during
        the revocation normally has), then drop their in-memory popularity, timers, clocks and
        expiry; if they come back they are rebuilt from the tables (another worker may have
        changed them)."""
        gone = {tp.partition for tp in revoked if tp.topic == by_user_name}
        async with work:
            try:
                await write_pending(gone)
                await confirm()
            except DeliveryFailed as exc:
                exit_fatally("writing the state of revoked partitions", exc)
            direct_parts.difference_update(gone)
        forget(gone)

    def assigned() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == by_user_name}

    def idle() -> bool:
        """No rebalance or table recovery under way: timers may touch the tables."""
        return not (app.rebalancing or app.tables.recovery.in_recovery)

    async def fire_due(partitions: set[int]) -> None:
        """Publish the cart promotions due on ``partitions``; store their states once confirmed."""
        outputs, changed = pipeline.due(partitions, time.time())
        if not outputs and not changed:
            return
        await publish(outputs)
        await confirm()  # the promotions are acknowledged before their states say they were sent
        if changed:
            pipeline.store_due(changed)
            await write_pending(keys={key for _, key, _ in changed})
            await confirm()  # their changelog writes

    async def handle(events: list[EventT]) -> None:
        """Score a batch of by-user events (forwarded by a router)."""
        batch = [
            Message(e.message.partition, e.message.key, e.message.value, e.message.timestamp) for e in events
        ]
        await score(batch, [e.message for e in events])

    async def score(batch: list[Message], sources: list[Any]) -> None:
        async with work:
            await score_locked(batch, sources)

    async def score_locked(batch: list[Message], sources: list[Any]) -> None:
        """Score a batch of events on their user's partitions, holding ``work``, and hand every
        output to the producer before returning (faust then acks the batch's events; their
        offsets are committed only once the next checkpoint confirmed those outputs).
        ``sources[i]``: the consumed message of ``batch[i]``, for its dead letter."""
        partitions = {m.partition for m in batch}
        await seed(partitions)
        result = pipeline.process(batch)
        for i, exc in result.failed:
            deliveries.add(await deadletters.send(sources[i], exc), deadletters.topic)
        await publish(result.outputs)
        now_ms = int(time.time() * 1000)
        erased = set(result.erased)
        for m in batch:
            if (m.partition, m.key) not in erased:
                expiry.touch(m.partition, m.key, now_ms)
        for p, key in erased:
            expiry.forget(p, key)
        if checkpoints.pending() >= settings.checkpoint_max_keys:
            await write_pending()  # early: bounds the memory; always safe (streams.writeback)
            await confirm()
        elif len(deliveries) >= CONFIRM_AT:
            await confirm()  # bounds the records awaiting their acknowledgement
        # otherwise the batch's records are confirmed by the next checkpoint, before any offset
        # of its events is committed (``checkpoint``): the next batch need not wait for them
        if settings.promotions:  # carts that came due in the event time this batch moved past
            await fire_due(partitions)

    @app.agent(by_user, name="score_event")
    async def score_event(stream: StreamT) -> None:
        """Fold events into user state, score them with the model in micro-batches, publish
        recommendations and promotions."""
        async for events in stream.take_events(settings.batch_max, within=settings.batch_wait_ms / 1000):
            await run_batch("scoring a batch", handle, list(events))

    def guarded(name: str) -> Any:
        """A periodic task whose exceptions are logged and counted: a timer that raises would
        stop the worker (mode's supervisor, faust-notes trap 11). Delivery failures still end
        the process, unacked, like in a batch."""

        def wrap(fn: Any) -> Any:
            async def body() -> None:
                try:
                    await fn()
                except DeliveryFailed as exc:
                    exit_fatally(f"timer {name}", exc)
                except Exception:
                    metrics.timer_errors.labels(name).inc()
                    log.exception("timer %s failed; it runs again at its next tick", name)

            body.__name__ = fn.__name__
            body.__doc__ = fn.__doc__
            return body

        return wrap

    @app.timer(interval=settings.promotion_tick_s)
    @guarded("cart_timers")
    async def cart_timers() -> None:
        """Fire cart-abandonment promotions whose event-time timers came due."""
        if not settings.promotions or not idle():
            return
        async with work:
            mine = assigned()
            forget(set(timers.heaps) - mine)  # revoked: the new owner rebuilds them from the table
            await seed(mine)
            await fire_due(mine)
        metrics.cart_timers.set(timers.pending())

    @app.timer(interval=settings.model_poll_s)
    @guarded("reload_model")
    async def reload_model() -> None:
        """Swap in a new model version exported into the model folder."""
        await models.poll()

    @app.timer(interval=settings.expiry_interval_s)
    @guarded("expire_idle_users")
    async def expire_idle_users() -> None:
        """Delete users idle longer than the TTL (worker clock) from this worker's partitions:
        only the users the index says are due, each re-read before it is deleted."""
        if not idle():
            return
        async with work:
            mine = assigned()
            await seed(mine)
            n = expiry.sweep(
                mine, int(time.time() * 1000), users_wb, scope, limit=EXPIRY_SLICE, keep=expiry_residue
            )
            await write_pending()
            await confirm()  # the tombstones
        if n:
            metrics.users_expired.inc(n)
            log.info("expired %d idle users", n)

    async def user_state(web: Any, request: Any, user_id: str) -> Any:
        """The user's state as JSON, answered by the worker that owns the user's partition; 404
        for a user it holds nothing for, 503 while a rebalance or table recovery is under way
        (the state may not be there yet: ask again)."""
        if app.rebalancing or app.tables.recovery.in_recovery:
            return web.json(
                {"error": "state is recovering, try again", "user_id": user_id},
                status=503,
                headers={"Retry-After": "1"},
            )
        raw = users_wb.get(user_id.encode())
        if raw is None:
            return web.json({"error": "no state for this user", "user_id": user_id}, status=404)
        return web.json(UserState.loads(raw).as_json())

    for path in ("/users/{user_id}", "/users/{user_id}/"):  # with or without the trailing slash
        app.page(path, name=f"user_state{len(path)}")(
            app.table_route(table=users, match_info="user_id")(user_state)
        )

    # --- health, readiness and the metrics that need the app -----------------------------------
    health = {"assigned": False, "recovery_started": 0.0, "stalled_s": 0.0}
    progress = Progress()

    @app.on_partitions_assigned.connect
    async def count_assignment(sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        health["assigned"] = True
        direct_parts.update(tp.partition for tp in assigned if tp.topic == by_user_name)
        metrics.rebalances.inc()

    def readiness() -> tuple[bool, dict[str, Any]]:
        recovering = bool(app.tables.recovery.in_recovery)
        checks = {
            "consuming": bool(health["assigned"]) and not app.rebalancing,
            "tables_recovered": not recovering,
            "model_loaded": settings.model_dir is None or models.current is not None,
            "progressing": float(health["stalled_s"]) < settings.wedged_after_s,
        }
        return all(checks.values()), checks

    consumed = {settings.topic_events_by_user, *input_types}

    @app.timer(interval=settings.metrics_interval_s)
    @guarded("refresh_metrics")
    async def refresh_metrics() -> None:
        """Gauges that are read rather than counted: lag, table sizes, readiness, recovery time,
        progress."""
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
        # users: exact, from the expiry index (every stored user of a seeded partition, one entry
        # each); RocksDB's estimate counts overwrites still in the memtable (72 for 11 users)
        metrics.table_keys.labels("users").set(sum(expiry.pending(p) for p in assigned()))
        for name, tbl in (("items", items), ("budget", budget)):
            metrics.table_keys.labels(name).set(estimate_keys(tbl))
        if app.rebalancing or recovering:
            progress.reset()
            health["stalled_s"] = 0.0
        else:
            health["stalled_s"] = progress.observe(
                (
                    (tp, consumer.highwater(tp), consumer._committed_offset.get(tp))
                    for tp in app.assignor.assigned_actives()
                    if tp.topic in consumed
                ),
                time.monotonic(),
            )
        metrics.progress_stalled.set(float(health["stalled_s"]))

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    @app.page("/debug/tasks")
    async def debug_tasks(web: Any, request: Any) -> Any:
        """Every asyncio task of the worker with where it waits: what to look at when it stalls."""
        out = []
        for task in asyncio.all_tasks():
            frames = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in awaiting(task)]
            out.append({"task": task.get_name(), "coro": repr(task.get_coro())[:200], "stack": frames})
        return web.json(out)

    @app.page("/debug/consumer")
    async def debug_consumer(web: Any, request: Any) -> Any:
        """Per assigned partition, where fetching stands in faust and in aiokafka: what to read
        when a partition stops moving."""
        return web.json(app.consumer.state())

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """The process is alive: its event loop answers and, when it has input waiting, its
        committed offsets moved within twice ``wedged_after_s`` (else 503: restart it)."""
        stalled = float(health["stalled_s"])
        if stalled >= 2 * settings.wedged_after_s:
            return web.json({"status": "wedged", "stalled_s": round(stalled)}, status=503)
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        """200 when consuming, tables recovered, the model (if configured) loaded and committed
        offsets moving where there is input lag; else 503."""
        ok, checks = readiness()
        return web.json({"ready": ok, **checks}, status=200 if ok else 503)

    return app


def awaiting(task: asyncio.Task[Any], limit: int = 40) -> list[Any]:
    """The frames a task waits in, outermost first: its coroutine, the one that awaits, and so on
    down the chain (``Task.get_stack`` gives one frame for a suspended coroutine)."""
    frames: list[Any] = []
    coro: Any = task.get_coro()
    step = ("cr_await", "gi_yieldfrom", "ag_await")
    while coro is not None and len(frames) < limit:
        frame = next((f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(coro, a, None))), None)
        if frame is not None:
            frames.append(frame)
        coro = next((c for a in step if (c := getattr(coro, a, None))), None)
    return frames or list(task.get_stack(limit=limit))


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
