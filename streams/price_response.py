"""Price sensitivity learned from the prices a user chooses among, not guessed from cart removals.

In: contract events with prices (views with ``category`` and ``price``, cart adds with
``category`` and ``unit_price``). Out: a ``PriceReference`` fitted on a training period (per
category, the sorted prices of its items; the prior; where training users' estimates fall), the
per-user evidence kept in ``UserState.promo`` and a 0..1 score for the promotion policy.

The estimate. Each priced event of a category the reference knows is one observation ``x = 1 -
q``, with ``q`` the item's mid-rank among its category's item prices (0: the cheapest item, 1: the
dearest): a user who looks at and picks the cheap end of each category scores near 1. The user's
estimate is the posterior mean of a Beta prior with mean ``prior`` (the training events' mean of
``x``) and ``strength`` pseudo-observations, updated with the fractional observations:
``(sum x + strength * prior) / (n + strength)``. A user with one cheap view is not yet as
price-driven as one with twenty. The score the policy reads is that estimate's mid-rank among the
training users' estimates, so 0.2 means "more price-driven than a fifth of the shop's users":
the bandit's buckets (below 0.2, below 0.5, above) and the rules' discount sizing read it on that
scale.

State: ``promo["px"] = [n, sum x]`` and ``promo["ps"]`` (the score, recomputed on every event the
reference is applied to, so a reloaded model rescales everyone on their next event). Without a
reference (no model, or a model trained on a log without prices, e.g. Taobao) the policy keeps
the removals-over-adds heuristic (``streams.promotions.heuristic_price_sensitivity``); a served
model without one drops a user's stored score on their next event, so the two never mix for long.

What it measures and what it does not: the price level a user chooses within categories (a
revealed preference), not a causal response to a discount; that is what the bandit's attributed
outcomes measure (``streams.bandit``). ``evaluate`` shows on a log with prices how well the score
ranks users by the price level of their *later* cart adds, against the heuristic and a plain
mean-price baseline (``shopstream evaluate-price-sensitivity``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from streams.records import CartEvent, ViewEvent, event_adapter
from streams.splits import split_bounds
from streams.state import UserState, event_tokens

FORMAT = 1
MIN_ITEMS = 3  # distinct items a category needs before its prices place an item
POINTS = 64  # prices kept per category (evenly spaced order statistics beyond that)
RANK_POINTS = 101  # quantiles of the training users' estimates kept
STRENGTH = 2.0  # pseudo-observations of the prior
BOOTSTRAP = 1000  # user resamples per interval
REFERENCE_FILE = "price_reference.json"  # its name in an exported artifact
EVIDENCE = "px"
SCORE = "ps"


def priced(event: Any) -> tuple[str, str, float] | None:
    """``(category, item, price)`` of an event that shows the user choosing among prices: a view
    or a cart add with both; None for anything else. On the hot path (``observe``): exact type
    checks, no pattern matching."""
    cls = type(event)
    if cls is ViewEvent:
        category, price = event.category, event.price
    elif cls is CartEvent and event.action == "add":
        category, price = event.category, event.unit_price
    else:
        return None
    return (category, event.item_id, float(price)) if category and price and price > 0 else None


def _thin(prices: Sequence[float], points: int = POINTS) -> list[float]:
    """At most ``points`` evenly spaced order statistics of sorted ``prices`` (ends kept)."""
    n = len(prices)
    if n <= points:
        return list(prices)
    return [prices[round(i * (n - 1) / (points - 1))] for i in range(points)]


def mid_rank(points: Sequence[float], value: float) -> float:
    """Where ``value`` falls among sorted ``points``: the share below it plus half the share equal
    to it (0: below all, 1: above all)."""
    lo, hi = bisect.bisect_left(points, value), bisect.bisect_right(points, value)
    return (lo + hi) / (2 * len(points))


@dataclass(frozen=True, slots=True)
class PriceReference:
    categories: Mapping[str, Sequence[float]]  # category -> sorted item prices (thinned)
    prior: float  # mean observation of the training events
    ranks: Sequence[float]  # sorted quantiles of the training users' estimates
    strength: float = STRENGTH
    fitted: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance, for people

    def observation(self, category: str, price: float) -> float | None:
        """``1 - q`` of an item at ``price`` in ``category`` (None: a category it does not know)."""
        points = self.categories.get(category)
        return None if points is None else round(1.0 - mid_rank(points, price), 6)

    def estimate(self, n: float, total: float) -> float:
        return (total + self.strength * self.prior) / (n + self.strength)

    def score(self, n: float, total: float) -> float:
        """The estimate's mid-rank among the training users' (0..1)."""
        return round(mid_rank(self.ranks, round(self.estimate(n, total), 6)), 4)  # ranks hold 6 places

    # --- the artifact's file -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "prior": self.prior,
            "strength": self.strength,
            "ranks": list(self.ranks),
            "categories": {c: list(p) for c, p in self.categories.items()},
            "fitted": self.fitted,
        }

    @classmethod
    def from_json(cls, doc: Any) -> PriceReference:
        """Checked: raises ValueError saying what is wrong."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"expected an object with format {FORMAT}")
        prior, strength, ranks, cats = (
            doc.get("prior"),
            doc.get("strength"),
            doc.get("ranks"),
            doc.get("categories"),
        )
        if not isinstance(prior, int | float) or not 0 <= prior <= 1:
            raise ValueError(f"prior {prior!r} is not a number in [0, 1]")
        if not isinstance(strength, int | float) or not 0 < strength < math.inf:
            raise ValueError(f"strength {strength!r} is not a positive number")
        if not isinstance(ranks, list) or not _sorted_numbers(ranks, 0.0, 1.0):
            raise ValueError("ranks must be a non-empty sorted list of numbers in [0, 1]")
        if not isinstance(cats, dict):
            raise ValueError("categories must be an object")
        for c, points in cats.items():
            if not _sorted_numbers(points, 0.0, math.inf):
                raise ValueError(f"category {c!r}: prices must be a non-empty sorted list of numbers >= 0")
        return cls(cats, float(prior), [float(r) for r in ranks], float(strength), doc.get("fitted") or {})


def _sorted_numbers(a: Any, lo: float, hi: float) -> bool:
    return (
        isinstance(a, list)
        and bool(a)
        and all(isinstance(x, int | float) and lo <= x <= hi for x in a)
        and all(x <= y for x, y in itertools.pairwise(a))
    )


def observe(state: UserState, event: Any, ref: PriceReference | None) -> None:
    """Fold ``event`` (already folded into ``state``, not a redelivery) into the user's evidence
    and store the score the policy reads. ``ref`` None (a served model without a reference):
    the stored score goes, so the policy falls back to the heuristic; the evidence stays for a
    later model with a reference (whose categories it was counted against)."""
    promo = state.promo
    if ref is None:
        promo.pop(SCORE, None)
        return
    n, total = promo.get(EVIDENCE, (0, 0.0))
    seen = priced(event)
    x = ref.observation(seen[0], seen[2]) if seen is not None else None
    if x is not None:
        n, total = n + 1, round(total + x, 6)
        promo[EVIDENCE] = [n, total]
    promo[SCORE] = ref.score(n, total)


def fit(events: Iterable[Any], until: float, strength: float = STRENGTH) -> PriceReference | None:
    """The reference from the priced events before ``until`` (unix s); None when no category has
    ``MIN_ITEMS`` priced items (a log without prices)."""
    seen: list[tuple[str, str, str, float]] = []
    latest: dict[str, dict[str, float]] = defaultdict(dict)  # category -> item -> latest price
    for ev in events:
        if ev.event_time.timestamp() >= until:
            continue
        p = priced(ev)
        if p is not None:
            seen.append((ev.user_id, *p))
            latest[p[0]][p[1]] = p[2]
    cats = {c: _thin(sorted(items.values())) for c, items in latest.items() if len(items) >= MIN_ITEMS}
    if not cats:
        return None
    provisional = PriceReference(cats, 0.5, [0.5], strength)
    per_user: dict[str, list[float]] = defaultdict(list)
    for user, cat, _, price in seen:
        x = provisional.observation(cat, price)
        if x is not None:
            per_user[user].append(x)
    xs = [x for v in per_user.values() for x in v]
    prior = round(float(np.mean(xs)), 6)
    estimates = np.sort([(sum(v) + strength * prior) / (len(v) + strength) for v in per_user.values()])
    ranks = np.quantile(estimates, np.linspace(0, 1, RANK_POINTS)).round(6).tolist()
    fitted = {
        "until": datetime.fromtimestamp(until, UTC).isoformat(),
        "categories": len(cats),
        "items": sum(len(items) for items in latest.values()),
        "users": len(per_user),
        "observations": len(xs),
    }
    return PriceReference(cats, prior, ranks, strength, fitted)


def from_log(name: str, raw: Iterable[dict[str, Any]], until: float | None = None) -> PriceReference | None:
    """The reference of data set ``name`` from its contract events (dicts): fitted before
    ``until``, by default its validation start (``streams.splits``), the period a model of it
    trained on."""
    events = sorted((event_adapter.validate_json(orjson.dumps(d)) for d in raw), key=lambda e: e.event_time)
    if until is None:
        until = split_bounds(name, [tok[2] for ev in events for tok in event_tokens(ev)])[0]
    return fit(events, until)


# --- how well it ranks users, on a log with prices ------------------------------------------------


def rank_average(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(len(a))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties; 0 when either side is constant (a
    score that ranks nobody)."""
    ra, rb = rank_average(np.asarray(a, float)), rank_average(np.asarray(b, float))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class Choice:
    user: str
    target: float  # 1 - q of the item added to the cart
    scores: dict[str, float]  # estimator -> its score just before the add


ESTIMATORS = {
    "learned": "the learned score (other items' events)",
    "learned_served": "the learned score as served (every earlier event, the item's own views too)",
    "mean_price": "minus the mean log price of the user's earlier priced events (other items)",
    "heuristic": "removals and abandoned carts over adds and orders (today's rule)",
}


def choices(
    events: Sequence[Any], ref: PriceReference, since: float, heuristic: Callable[[UserState], float]
) -> list[Choice]:
    """Every cart add from ``since`` on whose category the reference knows, with each estimator's
    score from the user's events before it (strictly earlier in the log)."""
    evidence: dict[str, list[tuple[str, float]]] = defaultdict(list)  # user -> (item, x)
    prices: dict[str, list[tuple[str, float]]] = defaultdict(list)  # user -> (item, log price)
    states: dict[str, UserState] = defaultdict(UserState)
    out: list[Choice] = []
    for ev in events:
        p = priced(ev)
        x = ref.observation(p[0], p[2]) if p is not None else None
        if isinstance(ev, CartEvent) and x is not None and ev.event_time.timestamp() >= since:
            user, item = ev.user_id, ev.item_id
            other = [v for i, v in evidence[user] if i != item]
            logs = [v for i, v in prices[user] if i != item]
            out.append(
                Choice(
                    user,
                    x,
                    {
                        "learned": ref.score(len(other), sum(other)),
                        "learned_served": ref.score(len(evidence[user]), sum(v for _, v in evidence[user])),
                        "mean_price": -float(np.mean(logs)) if logs else math.nan,
                        "heuristic": heuristic(states[ev.user_id]),
                    },
                )
            )
        if p is not None:
            prices[ev.user_id].append((p[1], math.log(p[2])))
            if x is not None:
                evidence[ev.user_id].append((p[1], x))
        states[ev.user_id].apply(ev, 0, 1)
    # a user without earlier prices gets the mean of those with them (the plain baseline's prior)
    known = [c.scores["mean_price"] for c in out if not math.isnan(c.scores["mean_price"])]
    fill = float(np.mean(known)) if known else 0.0
    for c in out:
        if math.isnan(c.scores["mean_price"]):
            c.scores["mean_price"] = fill
    return out


def compare(rows: list[Choice], seed: int = 0, resamples: int = BOOTSTRAP) -> dict[str, Any]:
    """Spearman of each estimator's score with the chosen price level over the choices, and of
    the learned score minus each other estimator, with 95 % intervals from resampling users (a
    user's choices move together)."""
    if not rows:
        return {"choices": 0, "users": 0, "spearman": {}, "learned_minus": {}}
    users = sorted({r.user for r in rows})
    index = {u: i for i, u in enumerate(users)}
    by_user: list[list[int]] = [[] for _ in users]
    for i, r in enumerate(rows):
        by_user[index[r.user]].append(i)
    target = np.array([r.target for r in rows])
    scores = {name: np.array([r.scores[name] for r in rows]) for name in ESTIMATORS}

    def stats(idx: np.ndarray) -> dict[str, float]:
        return {name: spearman(s[idx], target[idx]) for name, s in scores.items()}

    point = stats(np.arange(len(rows)))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for _ in range(resamples):
        pick = rng.integers(0, len(users), len(users))
        idx = np.fromiter((i for u in pick for i in by_user[u]), dtype=np.int64)
        for name, v in stats(idx).items():
            draws[name].append(v)

    def interval(a: Sequence[float] | np.ndarray) -> list[float]:
        return [round(float(x), 4) for x in np.quantile(a, [0.025, 0.975])]

    return {
        "choices": len(rows),
        "users": len(users),
        "spearman": {
            name: {"value": round(point[name], 4), "ci95": interval(draws[name])} for name in ESTIMATORS
        },
        "learned_minus": {
            name: {
                "value": round(point["learned"] - point[name], 4),
                "ci95": interval(np.subtract(draws["learned"], draws[name])),
            }
            for name in ESTIMATORS
            if name != "learned"
        },
    }


def evaluate(
    name: str, events: Iterable[Any], heuristic: Callable[[UserState], float], seed: int = 0
) -> dict[str, Any]:
    """Fit the reference on the training period of data set ``name`` (``streams.splits``: before
    the validation start, as ``shopstream train`` does for the artifact) and rank users' later
    cart adds by each estimator. Nothing is tuned on the evaluated period."""
    ordered = sorted(events, key=lambda e: e.event_time)
    times = [tok[2] for ev in ordered for tok in event_tokens(ev)]
    valid_start, _, end = split_bounds(name, times)
    ref = fit(ordered, valid_start)
    out: dict[str, Any] = {
        "data": name,
        "fitted_until": datetime.fromtimestamp(valid_start, UTC).isoformat(),
        "evaluated_until": datetime.fromtimestamp(end, UTC).isoformat(),
    }
    if ref is None:
        return {**out, "reference": None, "why": "no category with priced items before the split"}
    return {
        **out,
        "reference": ref.fitted,
        "prior": ref.prior,
        **compare(choices(ordered, ref, valid_start, heuristic), seed),
    }


def render(rep: dict[str, Any]) -> str:
    lines = [
        f"# Price sensitivity on {rep['data']}: learned vs heuristic",
        "",
        f"Reference fitted on the events before {rep['fitted_until']}; scored on the cart adds from then "
        f"to {rep['evaluated_until']}.",
    ]
    if rep.get("reference") is None:
        return "\n".join([*lines, "", f"No learned estimate: {rep['why']}. The heuristic stays.", ""])
    lines.append(
        f"Reference: {rep['reference']['categories']} categories, {rep['reference']['items']} items, "
        f"{rep['reference']['users']} users; prior {rep['prior']:.3f}."
    )
    if not rep["choices"]:
        return "\n".join([*lines, "", "No cart add with a known category and price to score.", ""])
    lines += [
        "",
        f"{rep['choices']} cart adds by {rep['users']} users. Spearman of each score with the price level "
        "chosen (1 - the item's place among its category's prices), [95 % interval, users resampled]:",
        "",
        "| estimator | Spearman | learned minus it |",
        "|---|---:|---:|",
    ]
    for name, what in ESTIMATORS.items():
        s = rep["spearman"][name]
        d = rep["learned_minus"].get(name)
        diff = f"{d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else ""
        lines.append(
            f"| {name}: {what} | {s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {diff} |"
        )
    lines += [
        "",
        "A constant score ranks nobody and counts as 0. This is the price level users choose, a revealed "
        "preference; what a discount does to them is what the bandit's attributed outcomes measure.",
        "",
    ]
    return "\n".join(lines)
