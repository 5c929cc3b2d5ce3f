"""Uplift of promotions against the holdout group, from their outcome records.

In: ``shop.promotion-outcomes`` records (``streams.records.PromotionOutcome``), read from the topic
up to its end offsets as of the start of the report, from the archive (``shopstream archive`` keeps
them past the topic's retention, erased users dropped; optionally only the promotions decided in
``[since, until)``), or from a JSON-lines file. Out: per promotion
kind and offer, for treated (sent) and holdout (logged, not sent) promotions: outcomes, users,
conversion rate and order revenue per promotion; the incremental conversion (treated minus
holdout) and the incremental revenue net of the discount cost, each with a 95 % interval that
resamples users (a user's promotions are not independent), and a plot of the incremental
conversion by kind and offer.

Outcomes closed early for capacity (``closed_by="capacity"``) are left out: their windows did not
run their course. Duplicates (a re-sent outcome after a redelivery) count once, by promotion id.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streams.archive_read import read_events
from streams.attribution import dedupe, offer_label
from streams.errors import ConfigurationError
from streams.offpolicy import evaluate, join
from streams.offpolicy import render as render_off_policy
from streams.settings import Settings
from streams.tail import read_to_end

BOOTSTRAP = 1000  # user resamples per interval


def _per_user(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per user: promotions, conversions, order revenue and discount cost (sums)."""
    users: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for o in rows:
        u = users[o["user_id"]]
        u[0] += 1
        u[1] += 1.0 if o["converted"] else 0.0
        u[2] += float(o["revenue_order"])
        u[3] += float(o["discount_cost"])
    a = np.array(list(users.values()), dtype=np.float64).reshape(-1, 4)
    return a[:, 0], a[:, 1], a[:, 2], a[:, 3]


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    total = float(den.sum())
    return float(num.sum()) / total if total else math.nan


def lift(treated: list[dict[str, Any]], holdout: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Conversion and revenue per promotion of both groups, their differences and 95 % intervals
    from ``BOOTSTRAP`` resamples of the users of each group (ratio estimates: a resample's sums)."""
    t, h = _per_user(treated), _per_user(holdout)
    out: dict[str, Any] = {
        "treated": _side(*t),
        "holdout": _side(*h),
    }
    if not len(t[0]) or not len(h[0]):
        out["note"] = "no outcomes on one side: no lift"
        return out

    def stats(tt: tuple[np.ndarray, ...], hh: tuple[np.ndarray, ...]) -> tuple[float, float]:
        conv = _ratio(tt[1], tt[0]) - _ratio(hh[1], hh[0])
        net = _ratio(tt[2] - tt[3], tt[0]) - _ratio(hh[2], hh[0])
        return conv, net

    conv, net = stats(t, h)
    rng = np.random.default_rng(seed)
    draws = np.empty((BOOTSTRAP, 2))
    for b in range(BOOTSTRAP):
        it = rng.integers(0, len(t[0]), len(t[0]))
        ih = rng.integers(0, len(h[0]), len(h[0]))
        draws[b] = stats(tuple(x[it] for x in t), tuple(x[ih] for x in h))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    out["incremental_conversion"] = {"value": conv, "ci95": [float(lo[0]), float(hi[0])]}
    out["incremental_net_revenue_per_promotion"] = {"value": net, "ci95": [float(lo[1]), float(hi[1])]}
    return out


def _side(promos: np.ndarray, conv: np.ndarray, revenue: np.ndarray, cost: np.ndarray) -> dict[str, Any]:
    return {
        "promotions": int(promos.sum()),
        "users": len(promos),
        "conversion": _ratio(conv, promos),
        "revenue_per_promotion": _ratio(revenue, promos),
        "discount_cost_per_promotion": _ratio(cost, promos),
    }


def report(outcomes: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The uplift report of ``outcomes``: per kind and offer (``streams.attribution.offer_label``)."""
    rows = dedupe(outcomes)
    groups: dict[tuple[str, str], dict[bool, list[dict[str, Any]]]] = defaultdict(
        lambda: {True: [], False: []}
    )
    for o in rows:
        groups[(o["kind"], offer_label(o["offer"]))][bool(o["holdout"])].append(o)
    return {
        "outcomes": len(rows),
        "by_kind_offer": {
            f"{kind} {offer}": lift(g[False], g[True]) for (kind, offer), g in sorted(groups.items())
        },
    }


def render(rep: dict[str, Any]) -> str:
    """The report as a text table."""
    lines = [
        f"{rep['outcomes']} outcomes (one per promotion; capacity closures left out); "
        "[95 % interval, users resampled]",
        f"{'kind offer':38} {'treated':>16} {'holdout':>16} {'incremental conversion':>34} "
        f"{'net revenue / promo':>32}",
    ]

    def side(s: dict[str, Any]) -> str:
        return f"{s['conversion']:.3f} of {s['promotions']:5d}"

    for name, r in rep["by_kind_offer"].items():
        t, h = r["treated"], r["holdout"]
        if "note" in r:
            lines.append(f"{name:38} {side(t):>16} {side(h):>16} {r['note']:>34}")
            continue
        c, n = r["incremental_conversion"], r["incremental_net_revenue_per_promotion"]
        conv = f"{c['value']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        net = f"{n['value']:+.2f} [{n['ci95'][0]:+.2f}, {n['ci95'][1]:+.2f}]"
        lines.append(f"{name:38} {side(t):>16} {side(h):>16} {conv:>34} {net:>32}")
    if rep.get("off_policy") or rep.get("off_policy_left_out"):
        lines += ["", render_off_policy(rep["off_policy"], rep.get("off_policy_left_out"))]
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> bool:
    """Incremental conversion with its interval by kind and offer, to ``path`` (PNG); False when
    matplotlib is not installed (the serving install has no plotting)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [(k, r["incremental_conversion"]) for k, r in rep["by_kind_offer"].items() if "note" not in r]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(len(rows), 1)))
    for i, (_name, c) in enumerate(rows):
        ax.errorbar(
            c["value"],
            i,
            xerr=[[c["value"] - c["ci95"][0]], [c["ci95"][1] - c["value"]]],
            fmt="o",
            color="C0",
        )
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows])
    ax.set_xlabel("incremental conversion (treated - holdout), 95 % interval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def read_file(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


async def read_topic(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every record of ``topic`` up to its end offsets as of now."""
    return [orjson.loads(r.value) for r in await read_to_end(settings, [topic]) if r.value]


def run(
    settings: Settings,
    source: str | None,
    out_dir: Path,
    archive: str | None = None,
    since: str | None = None,
    until: str | None = None,
    promotions: str | None = None,
) -> dict[str, Any]:
    """``shopstream uplift-report``: the report of a file (``source``), of the archive's outcomes
    (``archive``: its root; the promotions decided in ``[since, until)``) or of the outcomes topic.
    The promotion records, for the off-policy estimates of the bandit's offers
    (``streams.offpolicy``), come from the same place (the archive, the promotions topic) or, with
    a file of outcomes, from the file ``promotions`` (none: no off-policy estimates)."""
    if source and archive is not None:
        raise ConfigurationError("uplift-report reads a file or the archive, not both")
    if (since or until) and archive is None:
        raise ConfigurationError("--since and --until select from the archive: add --archive")
    if promotions and not source:
        raise ConfigurationError("--promotions goes with --file (else they are read with the outcomes)")
    promos: list[dict[str, Any]]
    if source:
        outcomes = read_file(Path(source))
        promos = read_file(Path(promotions)) if promotions else []
    elif archive is not None:
        root = archive or settings.archive_dir
        outcomes = read_events(root, since, until, stream="outcomes")
        # archived by created_at (the wall clock at the decision, at or after its event time):
        # from ``since`` on, whatever ``until``; the join keeps those of the outcomes read
        promos = read_events(root, since, None, stream="promotions")
    else:
        outcomes = asyncio.run(read_topic(settings, settings.topic_promotion_outcomes))
        promos = asyncio.run(read_topic(settings, settings.topic_promotions))
    rep = report(outcomes)
    rows, skipped = join(promos, outcomes)
    rep["off_policy"] = evaluate(rows, settings.max_discount_percent)
    rep["off_policy_left_out"] = skipped
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "uplift.json").write_text(orjson.dumps(rep, option=orjson.OPT_INDENT_2).decode())
    rep["plot"] = str(out_dir / "uplift.png") if plot(rep, out_dir / "uplift.png") else None
    return rep
