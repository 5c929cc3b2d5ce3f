"""What the worker does with a micro-batch of by-user events, without faust in the way.

In: messages of the by-user topic (partition, key = user id, value = contract JSON, timestamp).
Out: the records to publish (recommendations, promotions), in input order; state written to the
``users`` table, baseline statistics to the ``items`` table.

Per event: validate, fold into the user's state (redeliveries are recognised by event id and
not folded twice), teach the baseline, then - for the whole batch at once - score the users the
model can serve with one onnxruntime call, filter, and run the promotion policy. Requests about a
user travel the same topic and are applied at their place among the user's events, with no output:
an erasure deletes the user's state (a changelog tombstone at the batch's end) and cancels their
timers, so later events of the user start afresh; a consent change is kept in the state. A batch
runs in waves (every user's first event, then every user's second, ...), so each event sees exactly
the state its own predecessors left: batching changes the speed, not a user's answers. Outputs of
different users in one batch may come out in another order than their inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any, NamedTuple

import orjson
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from streams import attribution, baseline, price_response
from streams.baseline import CovisitBaseline
from streams.decode import AnyEvent, AnyInput, ControlEvent, rejection
from streams.errors import RejectedInput, RejectReason
from streams.metrics import Metrics
from streams.promotions import DEFERRED, VERSION_RULES, Budget, CartTimers, Decision, Policy, opted_out
from streams.records import CartEvent, ConsentEvent, ErasureEvent, OrderEvent, SearchEvent, input_adapter
from streams.scoring import ModelWatcher, Prediction
from streams.settings import Settings
from streams.state import UserState

log = logging.getLogger(__name__)


class Message(NamedTuple):
    partition: int
    key: bytes  # the user id
    value: bytes
    timestamp: float | None  # Kafka timestamp (s) of the input, for the latency metric
    event: AnyInput | None = None  # already validated by the caller (else validated here)


class Output(NamedTuple):
    topic: str
    key: bytes
    value: bytes


Changed = tuple[int, bytes, UserState]  # (partition, user key, state to store)


@dataclass
class _Ctx:
    index: int
    msg: Message
    event: AnyEvent
    state: UserState  # after this event; untouched until the wave is answered (one event per user)
    recent: list[str]  # the user's recent distinct items after this event, newest first
    folded: bool  # False for a redelivered event (state unchanged)
    exclude: set[str]
    use_model: bool  # the model recommends for this event (it knows the items involved)
    score: bool  # the model scores this user: where it recommends, and for the propensity alone
    due: list[Decision]  # timers of this user that came due before this event (in event time)
    closed: list[dict[str, Any]]  # outcomes of attribution windows that ended before this event


@dataclass
class Result:
    outputs: list[Output] = field(default_factory=list)
    failed: list[tuple[int, RejectedInput]] = field(default_factory=list)  # (batch index, why)
    # batch index -> the propensity the model returned for that event (the events it scored), for
    # offline evaluation; the published records do not carry it
    propensity: dict[int, float] = field(default_factory=dict)
    # (partition, user key) of users an erasure deleted (and no later event of the batch brought back)
    erased: list[tuple[int, bytes]] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        users: MutableMapping[bytes, bytes],
        recommender: CovisitBaseline,
        models: ModelWatcher,
        policy: Policy,
        timers: CartTimers,
        metrics: Metrics,
        scope: Callable[[int], AbstractContextManager[Any]] = lambda _p: nullcontext(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``scope(partition)`` wraps every table access of that partition (faust's RocksDB store
        picks the partition's database from the "current event", which a batch or a timer lacks)."""
        self.scope = scope
        self.clock = clock
        self.s = settings
        self.users = users
        self.recommender = recommender
        self.models = models
        self.policy = policy
        self.timers = timers
        self.metrics = metrics
        # users changed in the running batch, stored once at its end (a user's later events in
        # the batch start from the state object, not a stored copy); None: erased, to delete
        self._dirty: dict[bytes, tuple[int, UserState | None]] = {}

    # --- events ------------------------------------------------------------------------------
    def process(self, batch: list[Message]) -> Result:
        """Process a batch in waves: wave k holds every user's k-th event of the batch, so each
        event sees the state its predecessors left while most of the batch scores in one call."""
        result = Result()
        seen: dict[bytes, int] = {}
        waves: list[list[int]] = []
        for i, msg in enumerate(batch):
            k = seen.get(msg.key, 0)
            seen[msg.key] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(i)
        wall = self.clock()
        self.recommender.begin()
        try:
            for wave in waves:
                ctxs: list[_Ctx] = []
                for i in wave:
                    msg = batch[i]
                    try:
                        with self.scope(msg.partition):
                            ev = self._validate(msg)
                            if isinstance(ev, ErasureEvent | ConsentEvent):
                                self._request(msg, ev, wall)
                            else:
                                ctxs.append(self._fold(i, msg, ev, wall))
                    except RejectedInput as exc:
                        result.failed.append((i, exc))
                    except Exception as exc:  # one bad event must not stop the partition
                        log.exception("processing failed at partition %d, batch index %d", msg.partition, i)
                        result.failed.append((i, RejectedInput(RejectReason.PROCESSING_ERROR, repr(exc))))
                self._flush(ctxs, result, wall)
        finally:
            self._store(result)
        return result

    def _store(self, result: Result) -> None:
        """Write the batch's changed users and baseline statistics, each key once; delete the
        erased users (``del`` on a faust table sends the changelog tombstone that keeps a
        recovery from bringing them back)."""
        dirty, self._dirty = self._dirty, {}
        for key, (partition, state) in dirty.items():
            with self.scope(partition):
                if state is not None:
                    self.users[key] = state.dumps()
                    continue
                if key in self.users:
                    del self.users[key]
                result.erased.append((partition, key))
        self.recommender.commit(self.scope)

    def _validate(self, msg: Message) -> AnyInput:
        if msg.event is not None:
            return msg.event
        try:
            return input_adapter.validate_json(msg.value)
        except ValidationError as exc:  # the reason without the input's values (personal data)
            raise rejection(exc) from None

    def _state(self, key: bytes) -> UserState:
        """The user's state as the batch has left it so far (a new one after an erasure)."""
        pending = self._dirty.get(key)
        if pending is not None:
            return UserState() if pending[1] is None else pending[1]
        raw = self.users.get(key)
        return UserState.loads(raw) if raw else UserState()

    def _request(self, msg: Message, ev: ControlEvent, wall: float) -> None:
        """Apply an erasure or a consent change at its place among the user's events; neither
        is answered (a request is no behaviour to recommend for)."""
        key, partition = msg.key, msg.partition
        if isinstance(ev, ErasureEvent):
            self._dirty[key] = (partition, None)
            self.timers.cancel(partition, key)
            self.metrics.erasures.inc()
            return
        state = self._state(key)
        if self.policy.on_consent(state, ev):
            if not ev.marketing:
                state.promo.pop(OUTBOX, None)  # what was decided before is not sent again
            state.seen_ms = int(wall * 1000)
            self._dirty[key] = (partition, state)
            self.metrics.consents.labels("true" if ev.marketing else "false").inc()

    def _fold(self, i: int, msg: Message, ev: AnyEvent, wall: float) -> _Ctx:
        state = self._state(msg.key)
        recent = state.recent_items(self.s.covisit_window)
        fresh = ev.event_id not in state.recent_ids
        due, closed = self._due_before(state, ev, msg, wall) if fresh else ([], [])
        tokens = state.apply(ev, int(wall * 1000), self.s.sequence_length, window_s=self.s.reorder_window_s)
        if tokens is None:
            self.metrics.duplicates.inc()
        else:
            for item, kind, _t, _f in tokens:
                self.recommender.observe(msg.partition, recent, item, kind)
                if item:  # keep ``recent`` equal to state.recent_items() without rescanning
                    recent = [item, *[r for r in recent if r != item]][: self.s.covisit_window]
            self.timers.observe(msg.partition, ev.event_time.timestamp(), wall)
        model = self.models.current
        touched = _items_of(ev)
        use_model = (
            model is not None
            and (
                all(model.knows(i) for i in touched)  # an unknown item: the baseline has learned it live
                if touched
                else any(model.knows(tok[0]) for tok in state.seq[-model.max_len :])
            )
        )
        # a propensity branch reads kinds, times and window features, not items: it scores every
        # user with a history, also where the baseline recommends (unknown items)
        score = use_model or (model is not None and model.with_context and bool(state.seq))
        horizon = ev.event_time.timestamp() - self.s.exclude_bought_s
        exclude = set(state.cart) | {i for i, t in state.bought.items() if t >= horizon} | touched
        return _Ctx(i, msg, ev, state, recent, tokens is not None, exclude, use_model, score, due, closed)

    def _due_before(
        self, state: UserState, ev: AnyEvent, msg: Message, wall: float
    ) -> tuple[list[Decision], list[dict[str, Any]]]:
        """The user's cart (or deferred) timer and attribution windows that came due before this
        event's time fire first, as they would have live: whether a cart was abandoned or a
        promotion converted depends on the user's own event times, not on how events were batched
        or when the timer task ran."""
        if not self.s.promotions:
            return [], []
        t = self.timers.cap(ev.event_time.timestamp(), wall)  # a future-dated event fires nothing early
        cart = state.promo.get("cart")
        cart_at = None
        if cart and state.promo.get("done") != cart[1] and cart[0] + self.s.cart_abandon_after_s <= t:
            cart_at = cart[0] + self.s.cart_abandon_after_s
        deferred = any(d["at"] <= t for d in state.promo.get(DEFERRED, ()))
        end = attribution.next_end(state)
        if cart_at is None and not deferred and (end is None or end > t):
            return [], []
        return self._timers_due(state, msg.key, msg.partition, cart_at, t)

    def _timers_due(
        self, state: UserState, key: bytes, p: int, cart_at: float | None, now: float
    ) -> tuple[list[Decision], list[dict[str, Any]]]:
        """Decide the user's cart timer (as of ``cart_at``; None: not due) and the triggers
        deferred to ``now``, then close the attribution windows that ended by ``now``; a decision
        deferred again (quiet hours) and the next window end get their timers."""
        model = self.models.current
        version = model.version if model is not None else VERSION_RULES
        user = key.decode()
        cart = self.policy.on_cart_due(state, user, cart_at, p, version) if cart_at is not None else None
        decisions = [cart] if cart is not None else []
        decisions += self.policy.on_deferred_due(state, user, now, p, version)
        for d in decisions:
            if d.retry_at is not None:
                self.timers.schedule(p, key, d.retry_at)
        closed = self._open_windows(state, key, p, decisions)
        closed += attribution.settle(state, user, now, self._learner(p))
        end = attribution.next_end(state)
        if closed and end is not None:
            self.timers.schedule(p, key, end)
        return decisions, closed

    def _open_windows(
        self, state: UserState, key: bytes, p: int, decisions: list[Decision]
    ) -> list[dict[str, Any]]:
        """Open the attribution window of every promotion decided (sent or holdout), with its
        timer; returns the outcomes of windows closed early to make room."""
        evicted: list[dict[str, Any]] = []
        for d in decisions:
            if d.record is not None and d.t is not None:
                window = self.s.attribution_window_s
                evicted += attribution.open_window(
                    state, key.decode(), d.record, d.t, window, d.learn, self._learner(p)
                )
                self.timers.schedule(p, key, d.t + window)
        return evicted

    def _learner(self, p: int) -> attribution.OnClose | None:
        """What teaches the bandit (when offers come from it): the net revenue of each treated
        promotion's outcome, for the context and the offer delivered."""
        bandit = self.policy.bandit
        if bandit is None:
            return None

        def learn(entry: dict[str, Any], record: dict[str, Any]) -> None:
            arm = entry.get("b")
            if arm is not None and not record["holdout"] and record["closed_by"] != "capacity":
                bandit.learn(p, arm[0], arm[1], attribution.reward(record))

        return learn

    def _flush(self, segment: list[_Ctx], result: Result, wall: float) -> None:
        if not segment:
            return
        model = self.models.current  # one version for the whole segment
        preds: dict[int, Prediction] = {}
        scored = [c for c in segment if c.score]
        if model is not None and scored:
            started = time.perf_counter()
            predictions = self.models.score_safely(model, [c.state.seq for c in scored])
            if predictions is None:  # a model that loads but fails on real input: baseline answers
                self.metrics.inference_failures.labels(model.version).inc()
                predictions, model = [], None
            for c, p in zip(scored, predictions, strict=False):
                preds[c.index] = p
            if model is not None:
                self.metrics.inference_seconds.observe(time.perf_counter() - started)
                self.metrics.batch_size.observe(len(scored))
        now = self.clock()
        for c in segment:
            with self.scope(c.msg.partition):
                self._answer(c, preds.get(c.index), model, now, result)

    def _answer(self, c: _Ctx, pred: Prediction | None, model: Any, now: float, result: Result) -> None:
        """Publish the recommendation and promotions of one event and store the user's state."""
        n = self.s.recommendations
        key, partition = c.msg.key, c.msg.partition
        if pred is not None and model is not None:
            result.propensity[c.index] = pred.propensity
        if pred is not None and model is not None and c.use_model:
            ranked = _diverse(pred.ranked(c.exclude), model.category, self.s.max_per_category, n)
            if len(ranked) < n:  # a long exclusion list: top up from the baseline
                have = c.exclude | {i for i, _ in ranked}
                floor = min((s for _, s in ranked), default=0.0)
                extra = self.recommender.recommend(partition, c.recent, have, n - len(ranked))
                ranked += [(i, floor - 1.0 - k) for k, (i, _) in enumerate(extra)]
            source, version = "model", model.version
        else:
            ranked = self.recommender.recommend(partition, c.recent, c.exclude, n)
            source, version = "baseline", baseline.VERSION
        rec = {
            "schema_version": 1,
            "user_id": c.event.user_id,
            "event_id": c.event.event_id,
            "event_type": c.event.type,
            "event_time": c.event.event_time,
            "items": [{"item_id": i, "score": round(float(s), 6)} for i, s in ranked],
            "source": source,
            "model_version": version,
            "generated_at": datetime.fromtimestamp(now, UTC),
        }
        result.outputs.append(Output(self.s.topic_recommendations, key, orjson.dumps(rec)))
        self.metrics.recommendations.labels(source).inc()
        if not c.folded and self.s.promotions:
            # A redelivered event: its promotions and outcomes were decided when it was first
            # folded, but whether they reached the broker is unknown (its offset was not
            # committed). Send them again from the outbox, with the same ids (promotions not to a
            # user who opted out since; an outcome is no contact).
            quiet = opted_out(c.state)
            for entry in c.state.promo.get(OUTBOX, ()):
                if entry["by"] != c.event.event_id:
                    continue
                if entry.get("outcome"):
                    value = orjson.dumps(entry["record"])
                    result.outputs.append(Output(self.s.topic_promotion_outcomes, key, value))
                elif not quiet:
                    result.outputs.append(Output(self.s.topic_promotions, key, orjson.dumps(entry["record"])))
                    self.metrics.promotions_resent.inc()
        if c.folded and (c.due or c.closed):
            self.emit(c.due, key, result.outputs)
            self.emit_outcomes(c.closed, key, result.outputs)
            keep_in_outbox(c.state, c.event.event_id, c.due, c.closed)
        if c.folded:
            if self.s.promotions:
                # an order converts the windows open at its time, before this event's own
                # promotions open theirs
                learner = self._learner(partition)
                won = (
                    attribution.on_order(c.state, c.event, learner) if isinstance(c.event, OrderEvent) else []
                )
                self.emit_outcomes(won, key, result.outputs)
                served = self.models.current  # its price reference, even when scoring failed
                if served is not None:
                    price_response.observe(c.state, c.event, served.prices)
                # a propensity that ranks no better than chance on validation decides nothing
                ranks = pred is not None and model is not None and model.propensity_ranks
                decisions = self.policy.on_event(
                    c.state,
                    c.event,
                    partition,
                    pred.propensity if ranks and pred else None,
                    [i for i, _ in ranked],
                    model.version if model is not None and pred else VERSION_RULES,
                    latest=self.timers.latest(now),
                    thresholds=model.thresholds if ranks and model else None,
                )
                self.emit(decisions, key, result.outputs)
                evicted = self._open_windows(c.state, key, partition, decisions)
                self.emit_outcomes(evicted, key, result.outputs)
                keep_in_outbox(c.state, c.event.event_id, decisions, won + evicted)
                if isinstance(c.event, CartEvent) or any(d.retry_at is not None for d in decisions):
                    self.timers.track(partition, key, c.state)
            self._dirty[key] = (partition, c.state)
        if c.msg.timestamp:
            self.metrics.end_to_end.observe(max(0.0, now - c.msg.timestamp))
        self.metrics.event_age.observe(max(0.0, now - c.event.event_time.timestamp()))

    def emit(self, decisions: list[Decision], key: bytes, outputs: list[Output]) -> None:
        for d in decisions:
            if d.record is not None:
                outputs.append(Output(self.s.topic_promotions, key, orjson.dumps(d.record)))
                self.metrics.promotions.labels(d.record["kind"], str(d.record["holdout"]).lower()).inc()
            elif d.suppressed:
                self.metrics.promotions_suppressed.labels(d.suppressed).inc()

    def emit_outcomes(self, outcomes: list[dict[str, Any]], key: bytes, outputs: list[Output]) -> None:
        for o in outcomes:
            outputs.append(Output(self.s.topic_promotion_outcomes, key, orjson.dumps(o)))
            kind, offer, holdout = o["kind"], attribution.offer_label(o["offer"]), str(o["holdout"]).lower()
            converted = str(o["converted"]).lower()
            self.metrics.outcomes.labels(kind, offer, holdout, converted, o["closed_by"]).inc()
            if o["converted"]:
                self.metrics.outcome_revenue.labels(kind, offer, holdout, "items").inc(o["revenue_items"])
                self.metrics.outcome_revenue.labels(kind, offer, holdout, "order").inc(o["revenue_order"])
                if o["discount_cost"]:
                    self.metrics.outcome_discount.labels(kind, offer).inc(o["discount_cost"])

    # --- cart timers ----------------------------------------------------------------------------
    def due(self, partitions: set[int], wall: float) -> tuple[list[Output], list[Changed]]:
        """Check the cart timers of ``partitions`` against their event-time clocks.

        Returns the promotions to publish and the states they changed. The caller stores the
        states (``store_due``) only once the promotions are confirmed by the broker: a state that
        says "cart promoted" before the promotion is out would lose it in a crash."""
        outputs: list[Output] = []
        changed: list[Changed] = []
        for p in partitions:
            now = self.timers.now(p, wall)
            if now is None:
                continue
            with self.scope(p):
                for key in self.timers.due(p, now):
                    raw = self.users.get(key)
                    if not raw:
                        continue  # expired meanwhile
                    state = UserState.loads(raw)
                    decisions, closed = self._timers_due(state, key, p, now, now)
                    if not decisions and not closed:
                        continue
                    self.emit(decisions, key, outputs)
                    self.emit_outcomes(closed, key, outputs)
                    changed.append((p, key, state))
        return outputs, changed

    def store_due(self, changed: list[Changed]) -> None:
        for p, key, state in changed:
            with self.scope(p):
                self.users[key] = state.dumps()

    def due_carts(self, partitions: set[int], wall: float) -> list[Output]:
        """``due`` and ``store_due`` at once, for offline replays (nothing to confirm there)."""
        outputs, changed = self.due(partitions, wall)
        self.store_due(changed)
        return outputs

    def seed_timers(self, partition: int, entries: list[tuple[bytes, bytes]]) -> int:
        """Rebuild a partition's cart timers and clock from its stored states (after an
        assignment); returns timers set. A state says which event time it had reached at which
        worker time (``last_event_s`` at ``seen_ms``), so a quiet partition's clock runs on after a
        restart."""
        before = self.timers.pending()
        for key, raw in entries:
            state = UserState.loads(raw)
            self.timers.track(partition, key, state)
            if state.last_event_s:
                self.timers.observe(partition, float(state.last_event_s), state.seen_ms / 1000)
        return self.timers.pending() - before


OUTBOX = "outbox"
KEEP_OUTBOX = 4  # event-driven promotion records kept per user for re-sending on redelivery


def keep_in_outbox(
    state: UserState,
    event_id: str,
    decisions: list[Decision],
    outcomes: Sequence[dict[str, Any]] = (),
) -> None:
    """Remember the promotions and outcomes an event decided, until that event can no longer be
    redelivered unnoticed (it left the user's window of recent event ids). Every entry of the
    newest event is kept (an order can close several windows), older events' up to ``KEEP_OUTBOX``
    entries in all."""
    new: list[dict[str, Any]] = [{"by": event_id, "record": d.record} for d in decisions if d.record]
    new += [{"by": event_id, "record": o, "outcome": True} for o in outcomes]
    box = state.promo.get(OUTBOX, [])
    if not new and not box:
        return
    recent = set(state.recent_ids)
    mine = [e for e in [*box, *new] if e["by"] == event_id]
    older = [e for e in box if e["by"] != event_id and e["by"] in recent]
    room = max(0, KEEP_OUTBOX - len(mine))
    box = older[len(older) - room :] + mine if room else mine
    if box:
        state.promo[OUTBOX] = box
    else:
        state.promo.pop(OUTBOX, None)


def _items_of(ev: AnyEvent) -> set[str]:
    if isinstance(ev, OrderEvent):
        return {line.item_id for line in ev.lines}
    if isinstance(ev, SearchEvent):
        return {ev.clicked_item} if ev.clicked_item else set()
    return {ev.item_id}


def _diverse(
    ranked: Iterable[tuple[str, float]], category: dict[str, int], cap: int, n: int
) -> list[tuple[str, float]]:
    """The best ``n`` items with at most ``cap`` per category (0 = no cap; items without a known
    category are not capped). ``ranked`` is read only as far as it takes."""
    if not cap or not category:
        return list(islice(ranked, n))
    out: list[tuple[str, float]] = []
    per: dict[int, int] = {}
    for item, score in ranked:
        c = category.get(item)
        if c is not None:
            if per.get(c, 0) >= cap:
                continue
            per[c] = per.get(c, 0) + 1
        out.append((item, score))
        if len(out) == n:
            break
    return out


def local_pipeline(
    settings: Settings, budget_per_partition: float, clock: Callable[[], float] = time.time
) -> Pipeline:
    """The worker's pipeline on in-memory tables, for offline evaluation, benchmarks and tests:
    the model from ``settings.model_dir`` (none: baseline only)."""
    models = ModelWatcher(settings.model_dir, settings.inference_provider, settings.inference_threads)
    models.load_initial()
    return Pipeline(
        settings,
        {},
        CovisitBaseline({}, neighbors=settings.covisit_neighbors, window=settings.covisit_window),
        models,
        Policy(settings, Budget({}, budget_per_partition)),
        CartTimers(settings.cart_abandon_after_s),
        Metrics(CollectorRegistry()),
        clock=clock,
    )
