"""Is there more purchase signal than the window features carry? Candidates against the baseline.

``bench/propensity_backtest.py`` found the propensity branch no better than logistic regression on
the window features (``streams.features``) on four Taobao test days. This asks the question behind
that: does any information the worker could keep, or any non-linear form of the features, rank the
test day's cases better than that regression? Same protocol (train before D-1, choose on D-1, test
on D, purchase within 6 h, censored at each period's end), with the regularisation of every
candidate chosen on D-1 as the baseline's is. Candidates:

- ``+ item identity``: the newest event's item(s) against the window: views of the same item
  before, carted before, bought before, in the cart now; the share of distinct items in the window
  (a model that reads item ids sees these relations; the window features do not);
- ``+ cart``: items in the cart (added in the window, not removed or bought), those added within
  24 h, time since the last cart add;
- ``+ lifetime``: the user's whole history before the event, beyond the 50-token window the
  worker keeps (events, orders, days since the first event, orders per day, cart adds, orders per
  cart add): what the worker would have to add to its per-user state;
- ``splines`` and ``pairwise``: the window features through cubic splines (an additive non-linear
  model) and with every pairwise product (interactions).

For every test day and candidate: validation and test ROC-AUC, and the test ROC-AUC minus the
baseline's with a 95 % interval that resamples users (paired); then the mean over days.

    python bench/propensity_features.py [--days 4]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.cli import HORIZON_S
from modeling.metrics import bootstrap_ci
from modeling.propensity import LogisticPropensity, paired_auc_diff, roc_auc
from modeling.sequences import UserSeq, case_positions, first_at, sequences_from_events, time_split
from streams.sources.datasets import load
from streams.splits import split_bounds
from streams.state import TokenKind

DAY_S = 86400.0
WINDOW = 50  # the model's context: the window features' tokens


def _log(x: float) -> float:
    return math.log1p(max(x, 0.0))


def candidate_features(seq: UserSeq) -> dict[int, list[float]]:
    """The candidate features of every case position j of one user (history = tokens before j)."""
    out: dict[int, list[float]] = {}
    orders: set[int] = set()
    carts = 0
    done = 0  # tokens folded into the lifetime counters
    for j in case_positions(seq, 1, len(seq.items)):
        for k in range(done, j):
            if seq.kinds[k] == TokenKind.PURCHASE:
                orders.add(seq.event_of(k))
            elif seq.kinds[k] == TokenKind.CART_ADD:
                carts += 1
        done = j
        start = max(0, j - WINDOW)
        now = seq.times[j - 1]
        newest = seq.event_of(j - 1)
        own = {seq.items[k] for k in range(start, j) if seq.event_of(k) == newest and seq.items[k]}
        views = carted = bought = 0
        cart: dict[str, float] = {}
        last_add: float | None = None
        for k in range(start, j):
            item, kind = seq.items[k], seq.kinds[k]
            if kind == TokenKind.CART_ADD:
                cart[item], last_add = seq.times[k], seq.times[k]
            elif kind in (TokenKind.CART_REMOVE, TokenKind.PURCHASE):
                cart.pop(item, None)
            if seq.event_of(k) != newest and item in own:
                views += kind == TokenKind.VIEW
                carted |= kind == TokenKind.CART_ADD
                bought |= kind == TokenKind.PURCHASE
        span = now - seq.times[start]
        since_add = now - last_add if last_add is not None else span + DAY_S
        days = (now - seq.times[0]) / DAY_S
        out[j] = [
            _log(views),
            float(carted),
            float(bought),
            1.0 if own & cart.keys() else 0.0,
            len(set(seq.items[start:j])) / (j - start),
            _log(len(cart)),
            _log(sum(1 for t in cart.values() if now - t <= DAY_S)),
            _log(since_add) / _log(DAY_S),
            1.0 if last_add is None else 0.0,
            _log(j),
            _log(len(orders)),
            _log(days),
            len(orders) / (days + 1.0),
            _log(carts),
            len(orders) / (carts + 1.0),
        ]
    return out


GROUPS = {"identity": slice(0, 5), "cart": slice(5, 9), "lifetime": slice(9, 15)}  # columns of the above
Period = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # window features, candidates, labels, users


def features(period: Period, groups: tuple[str, ...]) -> np.ndarray:
    """The window features with the candidate columns of ``groups`` beside them."""
    return np.hstack([period[0], *(period[1][:, GROUPS[g]] for g in groups)])


def fit_logistic(
    x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, form: str
) -> tuple[float, Callable[[np.ndarray], np.ndarray]]:
    """Logistic regression on ``form`` of the features, its strength chosen on validation ROC-AUC
    over the baseline's grid (``LogisticPropensity.GRID``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, SplineTransformer, StandardScaler

    best: tuple[float, Any] = (-1.0, None)
    for c in LogisticPropensity.GRID:
        steps: list[Any] = [StandardScaler()]
        if form == "splines":
            steps.append(SplineTransformer(n_knots=5, degree=3))
        elif form == "pairwise":
            steps += [PolynomialFeatures(2, interaction_only=True, include_bias=False), StandardScaler()]
        m = make_pipeline(*steps, LogisticRegression(C=c, max_iter=2000)).fit(x, y)
        auc = roc_auc(yv, m.predict_proba(xv)[:, 1])
        if auc > best[0]:
            best = (auc, m)
    model = best[1]
    return best[0], lambda z: np.asarray(model.predict_proba(z)[:, 1])


CANDIDATES: dict[str, tuple[tuple[str, ...], str]] = {
    "window features (baseline)": ((), "linear"),
    "+ item identity": (("identity",), "linear"),
    "+ cart": (("cart",), "linear"),
    "+ lifetime": (("lifetime",), "linear"),
    "+ all three": (("identity", "cart", "lifetime"), "linear"),
    "splines": ((), "splines"),
    "pairwise": ((), "pairwise"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=4, help="test days, the newest (the pipeline's own) first")
    ap.add_argument("--datasets-dir", default=os.environ.get("SHOPSTREAM_DATASETS_DIR", "../shared/data"))
    args = ap.parse_args()
    seqs = [s for s in sequences_from_events(load("taobao-users", Path(args.datasets_dir))) if s.items]
    extra = [candidate_features(s) for s in seqs]
    valid_start, test_start, test_end = split_bounds("taobao-users", [])
    print(
        f"taobao-users: {len(seqs)} users; train before D-1, choose on D-1, test on D; purchase within "
        f"{HORIZON_S / 3600:g} h; test ROC-AUC minus the baseline's [95 % interval, users resampled]"
    )

    gains: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for back in range(args.days):
        shift, started = back * DAY_S, time.time()
        bounds = (valid_start - shift, test_start - shift, test_end - shift)
        split = time_split(seqs, *bounds, WINDOW, HORIZON_S, "taobao-users")
        assert split.train_cases is not None
        edges = [[first_at(s, b) for b in bounds] for s in seqs]
        ranges = {
            "train": [(1, e[0]) for e in edges],
            "valid": [(e[0], e[1]) for e in edges],
            "test": [(e[1], e[2]) for e in edges],
        }
        data: dict[str, Period] = {}
        for period, cases in (("train", split.train_cases), ("valid", split.valid), ("test", split.test)):
            rows = [extra[u][j] for u, s in enumerate(seqs) for j in case_positions(s, *ranges[period][u])]
            assert cases.context is not None and cases.users is not None and len(rows) == len(cases)
            known = cases.bought >= 0
            more = np.array(rows, dtype=np.float64).reshape(len(cases), -1)
            data[period] = (
                cases.context[known].astype(np.float64),
                more[known],
                cases.bought[known],
                cases.users[known],
            )
        day = time.strftime("%Y-%m-%d", time.gmtime(bounds[1] + 8 * 3600))
        y_test, users = data["test"][2], data["test"][3]
        print(f"{day}: {len(y_test)} test cases, {y_test.mean():.3f} positive")
        base: np.ndarray | None = None
        for name, (groups, form) in CANDIDATES.items():
            x, xv = features(data["train"], groups), features(data["valid"], groups)
            valid_auc, predict = fit_logistic(x, data["train"][2], xv, data["valid"][2], form)
            p = predict(features(data["test"], groups))
            if base is None:
                base = p
            pairs = np.stack([p, base, y_test], axis=1)
            gain = paired_auc_diff(pairs)
            lo, hi = bootstrap_ci(pairs, paired_auc_diff, groups=users)
            gains[name].append(gain)
            print(
                f"  {name:28} valid {valid_auc:.4f}  test {roc_auc(y_test, p):.4f}  "
                f"{gain:+.4f} [{lo:+.4f}, {hi:+.4f}]",
                flush=True,
            )
        print(f"  ({time.time() - started:.0f} s)")
    print(f"mean over {args.days} test days, test ROC-AUC minus the baseline's:")
    for name, g in gains.items():
        print(f"  {name:28} {np.mean(g):+.4f}  (per day: {', '.join(f'{x:+.4f}' for x in g)})")


if __name__ == "__main__":
    main()
