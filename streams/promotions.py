"""Promotion triggers and the marketing policy around them, free of Kafka and faust.

In: a user's ``UserState`` after an event was folded in (and the model's propensity and
recommendations when a model serves), or a cart timer that came due. Out: ``Promotion`` records
(as dicts) for ``shop.promotions``. The worker and ``shopstream evaluate-promotions`` run this same
code, so the offline report describes what the service does.

Triggers:
- cart abandonment: the cart holds items and has not changed for ``cart_abandon_after_s`` of event
  time, with no order since (an event-time timer per cart, ``CartTimers``);
- browse abandonment: ``browse_views`` views of one item within ``browse_window_s`` without adding
  it to the cart or buying it;
- review recovery: a rating at or below 2, or a 3 with negative words in the text;
- high intent: the model's purchase propensity crosses the high-intent threshold upwards;
- price sensitivity: a cart removal by a user whose price-sensitivity score is high.

Policy, applied to every trigger in this order: the user's marketing opt-out, suppression after
an order (review recovery excepted), frequency cap per user per window, quiet hours in the user's
time zone (the UTC offset of their events, else ``default_timezone``): a due cart and a review
recovery wait for the end of the quiet hours (kept in the user's state, so a restart does not lose
them), other triggers are dropped. Users in the holdout group (a hash of the id) get the same
decision logged with ``holdout=true``, not meant to be sent. Offers: a user likely to buy anyway
(propensity >= the reminder threshold) gets a reminder; otherwise a discount growing with price
sensitivity, while the day's discount budget lasts. Without a model (propensity unknown) the
policy is the rule-only baseline: every abandoned cart is offered a discount.

Thresholds: ``high_intent_propensity`` and ``reminder_propensity`` when set; unset, those of the
model version that produced the propensity (its manifest's ``propensity_thresholds``: versions
calibrate differently, and a hot reload can swap them between two events of a user), else 0.7 and
0.5. The reminder threshold is kept in the user's state beside the propensity (``promo["pr"]``)
for the cart timer that reads them later. Records carry the thresholds used in ``scores``.

Promotion ids are a hash of (user, kind, anchor event id): the same input never yields two ids,
and recent ids are remembered per user so a redelivered event does not publish one twice.

Marketing consent (``shop.consents``): the latest consent change of a user, by event time, is kept
in the state (``promo["consent"]``). While it says no, every trigger is suppressed (reason
``opt_out``, all kinds: a review recovery is a contact too); opting out also cancels what was
waiting (the cart's timer, triggers deferred by quiet hours), so nothing decided before the opt-out
comes out after an opt-in. An opt-out outlives the idle-user expiry (``expiry_residue``).
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from streams.attribution import next_end
from streams.bandit import Bandit, arms, context
from streams.price_response import SCORE as PRICE_SCORE
from streams.records import CartEvent, ConsentEvent, ReviewEvent, ViewEvent
from streams.settings import Settings
from streams.state import TokenKind, UserState, word_pieces

if TYPE_CHECKING:
    from streams.scoring import PropensityThresholds

VERSION_RULES = "rules-1"
KEEP_IDS = 20  # promotion ids remembered per user
NEGATIVE_WORDS = frozenset(
    {
        *("bad", "broken", "poor", "terrible", "awful", "worst", "disappointed", "disappointing"),
        *("defective", "refund", "return", "returned", "useless", "cheap", "damaged", "fake"),
        *("wrong", "late", "never", "missing", "rude", "scam", "waste", "horrible", "unhappy", "faulty"),
    }
)
MARKETING = ("cart_abandonment", "browse_abandonment", "high_intent", "price_sensitivity")
DEFERRED_KINDS = ("review_recovery",)  # event triggers that wait for the end of quiet hours
DEFERRED = "deferred"  # promo key: triggers waiting for the end of quiet hours
KEEP_DEFERRED = 4
BUDGET_SPENT = "discount budget spent"  # said in the reason of a discount delivered as a reminder
DEFAULT_HIGH_INTENT = 0.7  # thresholds for a propensity of a model whose manifest has none
DEFAULT_REMINDER = 0.5
MODEL_REMINDER = "pr"  # promo key: the reminder threshold of the model that produced promo["p"]
CONSENT = "consent"  # promo key: [marketing allowed, event time ms, event id] of the latest change


def promotion_id(user_id: str, kind: str, anchor: str) -> str:
    return hashlib.blake2b(f"{user_id}\x1f{kind}\x1f{anchor}".encode(), digest_size=12).hexdigest()


def in_holdout(user_id: str, percent: float) -> bool:
    """Deterministic holdout membership: a stable hash of the user id against ``percent``."""
    if percent <= 0:
        return False
    bucket = int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=4).digest(), "big") % 10_000
    return bucket < percent * 100


def price_sensitivity(state: UserState) -> float:
    """0..1: how price-driven the user is. The learned score (``streams.price_response``: where
    the user's chosen prices sit within their categories, ranked among the shop's users) when the
    serving model carries a price reference, else the heuristic."""
    learned = state.promo.get(PRICE_SCORE)
    return float(learned) if learned is not None else heuristic_price_sensitivity(state)


def heuristic_price_sensitivity(state: UserState) -> float:
    """0..1: removals and abandoned carts over cart adds and orders: the rule for models without
    a price reference (and logs without prices)."""
    c = state.counts
    removes = c.get("cart_remove", 0) + state.promo.get("abandoned", 0)
    adds = c.get("cart_add", 0) + c.get("order", 0)
    return round(min(1.0, float(removes) / (adds + 1.0)), 4)


def discount_percent(sensitivity: float, max_discount_percent: float) -> float:
    """The rule-based discount: 5 % growing with price sensitivity up to the maximum (0: none)."""
    top = max_discount_percent
    return float(round(min(top, 5.0 + (top - 5.0) * sensitivity)) if top >= 5 else top)


def opted_out(state: UserState) -> bool:
    """The user's latest marketing consent says no."""
    held = state.promo.get(CONSENT)
    return held is not None and not held[0]


def expiry_residue(raw: bytes, now_ms: int) -> bytes | None:
    """What of an idle user's stored state outlives the expiry: an opt-out, as a state holding
    nothing else (stamped ``now_ms``, so it is swept again one TTL later), else nothing (None)."""
    state = UserState.loads(raw)
    if not opted_out(state):
        return None
    return UserState(promo={CONSENT: state.promo[CONSENT]}, seen_ms=now_ms).dumps()


def cart_value(state: UserState) -> float:
    return round(float(sum(q * (price or 0.0) for q, price in state.cart.values())), 2)


@dataclass
class Budget:
    """Discount spend per partition and event-time day, in a table (``b"<partition>/<day>"``)."""

    table: MutableMapping[bytes, bytes]
    per_partition: float

    def try_spend(self, partition: int, t: float, amount: float) -> bool:
        key = b"%d/%s" % (partition, datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d").encode())
        spent = float(self.table.get(key) or b"0")
        if spent + amount > self.per_partition:
            return False
        self.table[key] = repr(spent + amount).encode()
        return True


@dataclass
class Decision:
    """Outcome of one trigger: a promotion record, or why there is none."""

    record: dict[str, Any] | None
    suppressed: str | None = None  # opt_out, order, frequency_cap, quiet_hours, duplicate
    retry_at: float | None = None  # cart abandonment or review recovery deferred by quiet hours
    t: float | None = None  # event time of the decision (a record's attribution window starts here)
    learn: list[Any] | None = None  # [bandit context, percent delivered] when the bandit chose the offer


@dataclass
class Trigger:
    """A candidate promotion before the policy decides on it."""

    kind: str
    anchor: str  # event id the promotion answers (part of its id)
    t: float  # event time (unix s) of the decision
    items: list[str]
    reason: str
    scores: dict[str, float]
    offer: dict[str, Any]


class Policy:
    """Evaluates triggers for one user state; the caller stores the state afterwards."""

    def __init__(self, settings: Settings, budget: Budget) -> None:
        self.s = settings
        self.budget = budget
        self.default_tz = ZoneInfo(settings.default_timezone)
        start, _, end = settings.quiet_hours.partition("-")
        self.quiet = (int(start), int(end)) if start else None
        self.bandit = (
            Bandit(budget.table, arms(settings.max_discount_percent), settings.bandit_exploration)
            if settings.offer_policy == "bandit"
            else None
        )

    # --- triggers ----------------------------------------------------------------------------
    def on_event(
        self,
        state: UserState,
        event: Any,
        partition: int,
        propensity: float | None,
        recommended: list[str],
        model_version: str,
        latest: float | None = None,
        thresholds: PropensityThresholds | None = None,
    ) -> list[Decision]:
        """Event-driven triggers after ``event`` was folded into ``state``. ``latest``: the
        latest plausible time now (the worker's wall clock plus the tolerance); a future-dated
        event decides as of then, so it cannot move the budget day or the quiet hours.
        ``thresholds``: those of the model version that returned ``propensity`` (None: it has none)."""
        s, t, eid = self.s, event.event_time.timestamp(), event.event_id
        if latest is not None:
            t = min(t, latest)
        scores: dict[str, float] = {"price_sensitivity": price_sensitivity(state)}
        triggers: list[Trigger] = []
        if propensity is not None:
            high = self.high_intent_threshold(thresholds)
            prev = state.promo.get("p")
            state.promo["p"] = scores["propensity"] = round(propensity, 4)
            if thresholds is not None:
                state.promo[MODEL_REMINDER] = thresholds.reminder
            else:
                state.promo.pop(MODEL_REMINDER, None)
            if propensity >= high and (prev is None or prev < high):
                why = f"purchase propensity {propensity:.2f} crossed {high:.2f}"
                sc = {**scores, "high_intent_threshold": high}
                triggers.append(
                    Trigger("high_intent", eid, t, recommended[:5], why, sc, {"kind": "reminder"})
                )
        match event:
            case ViewEvent():
                views = self._recent_views(state, event.item_id, t)
                if views == s.browse_views:
                    items = [event.item_id, *[i for i in recommended if i != event.item_id][:3]]
                    why = f"{views} views of {event.item_id} within {s.browse_window_s:.0f}s, not in the cart"
                    sc = {**scores, "views": float(views)}
                    triggers.append(
                        Trigger("browse_abandonment", eid, t, items, why, sc, {"kind": "reminder"})
                    )
            case ReviewEvent():
                negative = sorted(NEGATIVE_WORDS.intersection(word_pieces(event.text, 200)))
                if event.rating <= 2 or (event.rating == 3 and negative):
                    why = f"rating {event.rating}" + (
                        f"; negative words: {', '.join(negative[:5])}" * bool(negative)
                    )
                    sc = {**scores, "rating": float(event.rating)}
                    offer = {"kind": "service_recovery"}
                    triggers.append(Trigger("review_recovery", eid, t, [event.item_id], why, sc, offer))
            case CartEvent(action="remove") if scores["price_sensitivity"] >= s.price_sensitive:
                sensitivity = scores["price_sensitivity"]
                why = f"removed {event.item_id} from the cart; price sensitivity {sensitivity:.2f}"
                sc = dict(scores)
                offer = self._discount(sensitivity)
                if self.bandit is not None:
                    reminder = self.reminder_threshold(thresholds.reminder if thresholds else None)
                    ctx = context("price_sensitivity", propensity, reminder, sensitivity)
                    pid = promotion_id(event.user_id, "price_sensitivity", eid)
                    offer = self._bandit_offer(partition, ctx, pid, sc)
                triggers.append(Trigger("price_sensitivity", eid, t, [event.item_id], why, sc, offer))
        out = []
        for trig in triggers:
            deferrable = trig.kind in DEFERRED_KINDS
            decision = self._decide(state, event.user_id, trig, model_version, defer=deferrable)
            if decision.retry_at is not None:
                deferred = state.promo.setdefault(DEFERRED, [])
                deferred.append({"at": decision.retry_at, **asdict(trig)})
                del deferred[:-KEEP_DEFERRED]
            value = (event.unit_price or 0.0) * event.quantity if isinstance(event, CartEvent) else 0.0
            out.append(self._spend(decision, partition, t, value))
        return out

    def on_deferred_due(
        self, state: UserState, user: str, now: float, partition: int, model_version: str
    ) -> list[Decision]:
        """Triggers held back by quiet hours (review recovery) whose morning came: decide them
        now, with the same ids they would have had."""
        waiting = state.promo.get(DEFERRED)
        if not waiting:
            return []
        due = [d for d in waiting if d["at"] <= now]
        if not due:
            return []
        rest = [d for d in waiting if d["at"] > now]
        out = []
        for d in due:
            trig = Trigger(**{k: v for k, v in d.items() if k != "at"})
            trig.t = now
            decision = self._decide(state, user, trig, model_version, defer=True)
            if decision.retry_at is not None:  # quiet again (a clock that jumped): wait again
                rest.append({**d, "at": decision.retry_at})
            out.append(decision)
        if rest:
            state.promo[DEFERRED] = rest
        else:
            state.promo.pop(DEFERRED, None)
        return out

    def on_cart_due(
        self, state: UserState, user: str, now: float, partition: int, model_version: str
    ) -> Decision | None:
        """A cart timer came due at event time ``now``: trigger, defer, or nothing (cart changed)."""
        cart = state.promo.get("cart")
        if not cart or not state.cart or state.promo.get("done") == cart[1]:
            return None
        since, anchor = cart
        if now - since < self.s.cart_abandon_after_s:
            return None  # the cart changed after the timer was set; a later timer covers it
        if state.promo.get("order", 0) >= since:
            return None
        p = state.promo.get("p")
        value = cart_value(state)
        scores = {
            "price_sensitivity": price_sensitivity(state),
            "cart_value": value,
            "idle_s": round(now - since),
        }
        likely_buyer = False
        if p is not None:
            reminder = self.reminder_threshold(state.promo.get(MODEL_REMINDER))
            scores["propensity"], scores["reminder_threshold"] = p, reminder
            likely_buyer = p >= reminder
        offer = {"kind": "reminder"} if likely_buyer else self._discount(scores["price_sensitivity"])
        if self.bandit is not None:
            reminder = self.reminder_threshold(state.promo.get(MODEL_REMINDER))
            ctx = context("cart_abandonment", p, reminder, scores["price_sensitivity"])
            offer = self._bandit_offer(partition, ctx, promotion_id(user, "cart_abandonment", anchor), scores)
        why = f"cart of {len(state.cart)} item(s) idle for {(now - since) / 60:.0f} min without an order"
        trig = Trigger("cart_abandonment", anchor, now, list(state.cart)[:10], why, scores, offer)
        decision = self._decide(state, user, trig, model_version, defer=True)
        if decision.retry_at is None:
            state.promo["done"] = anchor
            state.promo["abandoned"] = state.promo.get("abandoned", 0) + 1
        return self._spend(decision, partition, now, value)

    def on_consent(self, state: UserState, event: ConsentEvent) -> bool:
        """Record a marketing consent change; False (nothing changed) for one older, by event
        time then event id, than the change already held. Opting out cancels what was waiting:
        the cart's abandonment timer and the triggers deferred by quiet hours."""
        t = event.event_time
        ms = int(t.timestamp()) * 1000 + t.microsecond // 1000
        held = state.promo.get(CONSENT)
        if held is not None and (held[1], held[2]) > (ms, event.event_id):
            return False
        state.promo[CONSENT] = [event.marketing, ms, event.event_id]
        if not event.marketing:
            cart = state.promo.get("cart")
            if cart:
                state.promo["done"] = cart[1]  # this cart is never promoted, even after an opt-in
            state.promo.pop(DEFERRED, None)
        return True

    # --- thresholds --------------------------------------------------------------------------
    def high_intent_threshold(self, model: PropensityThresholds | None) -> float:
        """The setting when set, else the model's threshold, else the default."""
        if self.s.high_intent_propensity is not None:
            return self.s.high_intent_propensity
        return model.high_intent if model is not None else DEFAULT_HIGH_INTENT

    def reminder_threshold(self, model_reminder: float | None) -> float:
        """The setting when set, else the threshold of the model that produced the propensity,
        else the default."""
        if self.s.reminder_propensity is not None:
            return self.s.reminder_propensity
        return float(model_reminder) if model_reminder is not None else DEFAULT_REMINDER

    # --- policy ------------------------------------------------------------------------------
    def _decide(
        self, state: UserState, user: str, trig: Trigger, model_version: str, defer: bool = False
    ) -> Decision:
        """Apply the opt-out, suppression, frequency cap, quiet hours and holdout; build the record."""
        if opted_out(state):
            return Decision(None, "opt_out")
        pid = promotion_id(user, trig.kind, trig.anchor)
        promo = state.promo
        ids: list[str] = promo.setdefault("ids", [])
        if pid in ids:
            return Decision(None, "duplicate")
        if trig.kind in MARKETING and trig.t - promo.get("order", -1e18) < self.s.suppress_after_order_s:
            return Decision(None, "order")
        fired = [f for f in promo.get("fired", []) if trig.t - f < self.s.frequency_window_s]
        promo["fired"] = fired
        if len(fired) >= self.s.frequency_cap:
            return Decision(None, "frequency_cap")
        quiet_end = self._quiet_until(state, trig.t)
        if quiet_end is not None:
            return Decision(None, "quiet_hours", retry_at=quiet_end if defer else None)
        fired.append(trig.t)
        ids.append(pid)
        del ids[:-KEEP_IDS]
        created = datetime.now(UTC)
        record = {
            "schema_version": 1,
            "user_id": user,
            "promotion_id": pid,
            "kind": trig.kind,
            "reason": trig.reason[:512],
            "trigger_event_id": trig.anchor,
            "items": trig.items,
            "offer": {"kind": trig.offer["kind"], "value": float(trig.offer.get("value", 0.0))},
            "scores": trig.scores,
            "holdout": in_holdout(user, self.s.holdout_percent),
            "created_at": created,
            "expires_at": created + timedelta(seconds=self.s.promotion_ttl_s),
            "model_version": model_version,
        }
        learn = trig.offer.get("bandit")
        return Decision(record, t=trig.t, learn=list(learn) if learn is not None else None)

    def _bandit_offer(self, partition: int, ctx: str, pid: str, scores: dict[str, float]) -> dict[str, Any]:
        """The bandit's offer for a promotion id; its probability goes into ``scores``."""
        assert self.bandit is not None
        choice = self.bandit.choose(partition, ctx, pid)
        scores["offer_probability"] = round(choice.probability, 6)
        scores["offer_arm"] = choice.percent  # what was chosen, whatever the budget delivers
        if choice.percent <= 0:
            return {"kind": "reminder", "bandit": [ctx, 0.0]}
        return {"kind": "percent_off", "value": choice.percent, "bandit": [ctx, choice.percent]}

    def _discount(self, sensitivity: float) -> dict[str, Any]:
        """A percent-off offer sized by price sensitivity (5 % up to ``max_discount_percent``)."""
        pct = discount_percent(sensitivity, self.s.max_discount_percent)
        return {"kind": "percent_off", "value": pct} if pct > 0 else {"kind": "reminder"}

    def _spend(self, decision: Decision, partition: int, t: float, value: float) -> Decision:
        """Charge a discount to the day's budget; once it is spent the offer becomes a reminder.
        Holdout records spend nothing (they are not sent)."""
        rec = decision.record
        discount = rec is not None and rec["offer"]["kind"] == "percent_off" and not rec["holdout"]
        if rec and discount and not self.budget.try_spend(partition, t, value * rec["offer"]["value"] / 100):
            rec["offer"] = {"kind": "reminder", "value": 0.0}
            rec["reason"] = (rec["reason"] + f"; {BUDGET_SPENT}")[:512]
            if decision.learn is not None:  # the bandit learns what was delivered: a reminder
                decision.learn = [decision.learn[0], 0.0]
        return decision

    def _recent_views(self, state: UserState, item: str, t: float) -> int:
        """Views of ``item`` within the browse window, or 0 once it was carted or bought."""
        n = 0
        for tok in reversed(state.seq):
            if t - tok[2] > self.s.browse_window_s:
                break
            if tok[0] == item:
                if tok[1] in (TokenKind.CART_ADD, TokenKind.PURCHASE):
                    return 0
                if tok[1] == TokenKind.VIEW:
                    n += 1
        return n

    def _quiet_until(self, state: UserState, t: float) -> float | None:
        """End of the quiet hours (unix s) when ``t`` falls inside them in the user's zone, else None."""
        if self.quiet is None:
            return None
        start, end = self.quiet
        tz = state.promo.get("tz")
        local = datetime.fromtimestamp(t, UTC).astimezone(
            self.default_tz if tz is None else timezone(timedelta(minutes=tz))
        )
        h = local.hour
        inside = (start <= h or h < end) if start > end else (start <= h < end)
        if not inside:
            return None
        wake = local.replace(hour=end, minute=0, second=0, microsecond=0)
        if wake <= local:
            wake += timedelta(days=1)
        return wake.timestamp()


class CartTimers:
    """Event-time timers for carts, per partition.

    Each partition's clock is the newest event time seen on it, advanced by the wall-clock time
    since that event (so carts come due during quiet traffic as well as during a fast replay).
    With ``tolerance_s`` set (the worker), the clock never runs ahead of the wall clock by more
    than that: one event stamped hours ahead cannot fire every pending cart of its partition.
    ``tolerance_s=None`` (offline replays of old logs): event time alone drives the clock.
    Timers and clocks live in memory and are rebuilt from the ``users`` table when a partition is
    assigned (``Pipeline.seed_timers``).
    """

    def __init__(self, after_s: float, tolerance_s: float | None = None) -> None:
        self.after_s = after_s
        self.tolerance_s = tolerance_s
        # (due time, user key) tuples: a tuple of a float and bytes holds no reference the cyclic
        # garbage collector follows, so it stops tracking it, and a worker holding a timer for
        # every user with a cart (tens of thousands) does not pay for them in each full
        # collection (streams.gctune)
        self.heaps: dict[int, list[tuple[float, bytes]]] = {}
        self.clock: dict[int, tuple[float, float]] = {}  # partition -> (max event time, wall time then)

    def latest(self, wall: float) -> float | None:
        """The latest event time that is plausible at ``wall`` (None: no limit, offline)."""
        return None if self.tolerance_s is None else wall + self.tolerance_s

    def cap(self, t: float, wall: float) -> float:
        """``t``, or the latest plausible time if that is earlier."""
        latest = self.latest(wall)
        return t if latest is None else min(t, latest)

    def observe(self, partition: int, event_t: float, wall: float) -> None:
        event_t = self.cap(event_t, wall)
        cur = self.clock.get(partition)
        if cur is None or event_t > cur[0] + max(0.0, wall - cur[1]):
            self.clock[partition] = (event_t, wall)

    def now(self, partition: int, wall: float) -> float | None:
        cur = self.clock.get(partition)
        return None if cur is None else self.cap(cur[0] + max(0.0, wall - cur[1]), wall)

    def schedule(self, partition: int, key: bytes, at: float) -> None:
        heapq.heappush(self.heaps.setdefault(partition, []), (at, key))

    def track(self, partition: int, key: bytes, state: UserState) -> None:
        """Set the timers of a user whose cart changed, who has a trigger waiting for the end of
        quiet hours or a promotion's attribution window open (or seed them from stored state)."""
        cart = state.promo.get("cart")
        if cart and state.promo.get("done") != cart[1]:
            self.schedule(partition, key, cart[0] + self.after_s)
        for d in state.promo.get(DEFERRED, ()):
            self.schedule(partition, key, d["at"])
        end = next_end(state)
        if end is not None:
            self.schedule(partition, key, end)

    def due(self, partition: int, now: float) -> list[bytes]:
        heap = self.heaps.get(partition)
        out: list[bytes] = []
        while heap and heap[0][0] <= now:
            key = heapq.heappop(heap)[1]
            if key not in out:
                out.append(key)
        return out

    def cancel(self, partition: int, key: bytes) -> None:
        """Forget every timer of one user (an erasure); O(timers of the partition)."""
        heap = self.heaps.get(partition)
        if heap:
            heap[:] = [d for d in heap if d[1] != key]
            heapq.heapify(heap)

    def drop(self, partition: int) -> None:
        self.heaps.pop(partition, None)
        self.clock.pop(partition, None)

    def pending(self) -> int:
        return sum(len(h) for h in self.heaps.values())

    def next_due(self) -> float:
        """The earliest due time of any partition's timers (infinity when none)."""
        return min((h[0][0] for h in self.heaps.values() if h), default=float("inf"))
