"""Off-policy estimates of offer policies from the bandit's logged decisions.

In: promotion records whose offer the bandit chose (``scores["offer_probability"]``: the
probability of the chosen offer under the policy that chose it; ``scores["offer_arm"]``: the offer
chosen, a percent, 0 for a reminder; records written before ``offer_arm`` existed take it from the
offer, unless the discount budget turned the chosen discount into a reminder) and their outcome
records (``streams.attribution``), joined by promotion id. Treated promotions only: the holdout
group was not contacted, and the bandit does not learn from it either. Capacity closures are left
out (their windows did not run their course), as are promotions without an outcome yet.

A target policy names an offer for each logged decision. Its value is estimated by inverse
propensity scoring: with ``w = 1[target offer == chosen offer] / probability``,
``IPS = sum(w * r) / n`` and the self-normalised ``SNIPS = sum(w * r) / sum(w)`` (less variance, a
small bias), for the reward ``r`` the bandit learns (the order's revenue less the discount cost,
0 without an order: ``streams.attribution.reward``) and for conversion. Each has a 95 % interval
from ``BOOTSTRAP`` resamples of users (a user's promotions move together). The targets: every
fixed offer (always a reminder, always 5 %, ...), the rule-based policy (a reminder for a likely
buyer, else the discount sized by price sensitivity, rounded to the nearest offer the bandit has),
and the logging policy itself (the plain mean: on-policy, no weights), all per trigger kind.

Why it holds: the bandit keeps every offer at a probability of at least ``exploration / offers``,
so every weight is at most ``offers / exploration`` and every fixed offer is estimable. The
estimate is that of the offer chosen; the daily discount budget still applies to whatever a
policy chooses (a chosen discount delivered as a reminder earned what the reminder earned).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streams.attribution import dedupe, reward
from streams.bandit import arms as bandit_arms
from streams.promotions import BUDGET_SPENT, discount_percent

BOOTSTRAP = 1000  # user resamples per interval


@dataclass(frozen=True, slots=True)
class Decision:
    """One logged bandit decision with its outcome."""

    user: str
    kind: str
    arm: float  # the offer chosen: percent off, 0 a reminder
    probability: float  # of ``arm`` under the logging policy
    reward: float  # net revenue (``streams.attribution.reward``)
    converted: bool
    scores: dict[str, float]


def chosen_arm(promotion: dict[str, Any]) -> float | None:
    """The offer the bandit chose for ``promotion`` (None: not known)."""
    scores = promotion.get("scores") or {}
    if "offer_arm" in scores:
        return float(scores["offer_arm"])
    if BUDGET_SPENT in promotion.get("reason", ""):
        return None  # delivered as a reminder; what was chosen is not in the record
    offer = promotion["offer"]
    return float(offer.get("value", 0.0)) if offer["kind"] == "percent_off" else 0.0


def join(
    promotions: Iterable[dict[str, Any]], outcomes: Iterable[dict[str, Any]]
) -> tuple[list[Decision], dict[str, int]]:
    """The logged bandit decisions that have an outcome, and counts of what was left out."""
    closed = {o["promotion_id"]: o for o in dedupe(outcomes)}
    skipped: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    rows = []
    for p in promotions:
        pid = p["promotion_id"]
        if pid in seen:
            continue  # a re-sent promotion counts once
        seen.add(pid)
        scores = p.get("scores") or {}
        probability = scores.get("offer_probability")
        if p.get("holdout"):
            skipped["holdout"] += 1
            continue
        if probability is None:
            skipped["not chosen by the bandit"] += 1
            continue
        arm = chosen_arm(p)
        out = closed.get(pid)
        if arm is None:
            skipped["offer chosen unknown (budget spent)"] += 1
        elif out is None:
            skipped["no outcome yet"] += 1
        elif not 0 < probability <= 1:
            skipped["probability out of (0, 1]"] += 1
        else:
            converted = bool(out["converted"])
            rows.append(
                Decision(p["user_id"], p["kind"], arm, float(probability), reward(out), converted, scores)
            )
    return rows, dict(skipped)


def rules_arm(kind: str, scores: dict[str, float], offers: list[float], max_discount_percent: float) -> float:
    """The rule-based policy's offer for a logged decision (``streams.promotions``), rounded to the
    nearest of ``offers``: a reminder for a cart of a likely buyer, else the discount sized by
    price sensitivity."""
    p, reminder = scores.get("propensity"), scores.get("reminder_threshold")
    if kind == "cart_abandonment" and p is not None and reminder is not None and p >= reminder:
        return 0.0
    pct = discount_percent(scores.get("price_sensitivity", 0.0), max_discount_percent)
    return min(offers, key=lambda a: (abs(a - pct), a))


def _always(offer: float) -> Callable[[Decision], float]:
    return lambda _d: offer


def _per_user(rows: list[Decision], match: np.ndarray) -> np.ndarray:
    """Per user: decisions, sum of w*r, sum of w*converted, sum of w, sum of r, conversions."""
    users: dict[str, list[float]] = defaultdict(lambda: [0.0] * 6)
    for d, m in zip(rows, match, strict=True):
        u = users[d.user]
        w = 1.0 / d.probability if m else 0.0
        u[0] += 1
        u[1] += w * d.reward
        u[2] += w * d.converted
        u[3] += w
        u[4] += d.reward
        u[5] += d.converted
    return np.array(list(users.values()), dtype=np.float64).reshape(-1, 6)


def _stats(a: np.ndarray) -> np.ndarray:
    """IPS and SNIPS of net revenue and conversion, and the logging policy's means."""
    n, w = a[:, 0].sum(), a[:, 3].sum()
    nan = math.nan
    return np.array(
        [
            a[:, 1].sum() / n if n else nan,
            a[:, 1].sum() / w if w else nan,
            a[:, 2].sum() / w if w else nan,
            a[:, 4].sum() / n if n else nan,
            a[:, 5].sum() / n if n else nan,
        ]
    )


def estimate(rows: list[Decision], match: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The estimates of the target that chooses the logged offer where ``match``, with intervals."""
    a = _per_user(rows, match)
    point = _stats(a)
    rng = np.random.default_rng(seed)
    draws = np.array([_stats(a[rng.integers(0, len(a), len(a))]) for _ in range(BOOTSTRAP if len(a) else 0)])
    names = ["ips_net_revenue", "snips_net_revenue", "snips_conversion", "net_revenue", "conversion"]
    out: dict[str, Any] = {"matched": int(np.sum(match))}
    for i, name in enumerate(names):
        # a resample without a matched decision has no SNIPS: the interval is over those with one
        kept = draws[:, i][np.isfinite(draws[:, i])] if len(draws) else draws
        lo, hi = np.percentile(kept, [2.5, 97.5]) if len(kept) else (math.nan, math.nan)
        out[name] = {"value": _finite(point[i]), "ci95": [_finite(lo), _finite(hi)]}
    return out


def _finite(x: float) -> float | None:
    """None for an estimate that does not exist (no matched decision), as JSON writes it."""
    return float(x) if math.isfinite(x) else None


def evaluate(rows: list[Decision], max_discount_percent: float, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per trigger kind: the logging policy's mean reward and every target's estimates."""
    offers = bandit_arms(max_discount_percent)
    by_kind: dict[str, list[Decision]] = defaultdict(list)
    for d in rows:
        by_kind[d.kind].append(d)
    out: dict[str, dict[str, Any]] = {}
    for kind, ds in sorted(by_kind.items()):
        logged = estimate(ds, np.ones(len(ds), dtype=bool), seed)
        targets: dict[str, Callable[[Decision], float]] = {
            ("reminder" if a == 0 else f"percent_off:{a:g}"): _always(a) for a in offers
        }
        targets["rules"] = lambda d: rules_arm(d.kind, d.scores, offers, max_discount_percent)
        out[kind] = {
            "decisions": len(ds),
            "users": len({d.user for d in ds}),
            "logged": {k: logged[k] for k in ("net_revenue", "conversion")},
            "targets": {
                name: {
                    k: v
                    for k, v in estimate(ds, np.array([pick(d) == d.arm for d in ds]), seed).items()
                    if k in ("matched", "ips_net_revenue", "snips_net_revenue", "snips_conversion")
                }
                for name, pick in targets.items()
            },
        }
    return out


def render(rep: dict[str, dict[str, Any]], skipped: dict[str, int] | None = None) -> str:
    """The estimates as a text table."""

    def cell(e: dict[str, Any], fmt: str) -> str:
        if e["value"] is None:
            return "- (nothing matched)"
        lo, hi = e["ci95"]
        return f"{e['value']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

    lines = [
        "Off-policy estimates from the bandit's logged decisions (inverse propensity; "
        "[95 % interval, users resampled]):"
    ]
    if not rep:
        lines.append("  no logged bandit decision with an outcome")
    for kind, r in rep.items():
        lg = r["logged"]
        lines.append(
            f"{kind}: {r['decisions']} decisions of {r['users']} users; logging policy "
            f"net revenue {cell(lg['net_revenue'], '.2f')}, conversion {cell(lg['conversion'], '.3f')}"
        )
        lines.append(
            f"  {'target':16} {'matched':>7} {'IPS net revenue':>28} {'SNIPS net revenue':>28} "
            f"{'SNIPS conversion':>26}"
        )
        for name, t in r["targets"].items():
            lines.append(
                f"  {name:16} {t['matched']:7d} {cell(t['ips_net_revenue'], '.2f'):>28} "
                f"{cell(t['snips_net_revenue'], '.2f'):>28} {cell(t['snips_conversion'], '.3f'):>26}"
            )
    if skipped:
        lines.append("left out: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    return "\n".join(lines)
