"""Ranking and propensity metrics, and bootstrap confidence intervals.

In: per-case target ranks (0 = best; ``inf`` = the target can never be ranked, e.g. an unknown
item or a target hidden by history exclusion) and propensity scores with labels. Out: plain dicts
of floats, ready for JSON and the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

KS = (5, 10, 20)


def ranks_from_scores(scores: Tensor, targets: Tensor, exclude: list[list[int]] | None) -> Tensor:
    """Rank of each target among all items (0-based), with PAD/UNK and optionally history excluded.

    ``scores`` (b, n_items) is modified in place. A target that is excluded gets rank ``inf``,
    as in the S3-Rec / ICLRec evaluation code (a repeated item hidden by its history is a miss).
    Items that tie with the target count as half above it (its expected rank when ties are broken
    at random): breaking ties in the target's favour flatters scorers with many equal scores
    (popularity counts, sparse neighbourhoods).
    """
    scores[:, :2] = -torch.inf
    if exclude is not None:
        rows = [r for r, h in enumerate(exclude) for _ in h]
        cols = [c for h in exclude for c in h]
        if rows:
            scores[torch.tensor(rows), torch.tensor(cols)] = -torch.inf
    target_scores = scores.gather(1, targets[:, None])  # (b, 1)
    above = (scores > target_scores).sum(dim=1).to(torch.float64)
    ties = (scores == target_scores).sum(dim=1).to(torch.float64) - 1.0  # the target itself
    ranks = above + 0.5 * ties.clamp(min=0.0)
    ranks[torch.isinf(target_scores[:, 0])] = torch.inf
    return ranks


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in KS:
        hit = r < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(np.where(hit, r, 0) + 2.0), 0.0).mean())
    out["MRR"] = float(np.where(np.isinf(r), 0.0, 1.0 / (np.where(np.isinf(r), 0, r) + 1.0)).mean())
    out["cases"] = float(len(r))
    return out


def sampled_ranks(
    scores: Tensor, targets: Tensor, exclude: list[list[int]], n_neg: int, gen: torch.Generator
) -> Tensor:
    """Rank among the target and ``n_neg`` random items outside the history (older papers' protocol)."""
    b, n = scores.shape
    out = torch.empty(b, dtype=torch.float64)
    for r in range(b):
        banned = set(exclude[r]) | {0, 1, int(targets[r])}
        negs: list[int] = []
        while len(negs) < n_neg:
            cand = torch.randint(2, n, (n_neg * 2,), generator=gen).tolist()
            negs.extend(c for c in cand if c not in banned)
        neg_scores = scores[r, torch.tensor(negs[:n_neg])]
        target = scores[r, targets[r]]
        out[r] = float((neg_scores > target).sum()) + 0.5 * float((neg_scores == target).sum())
    return out


def bootstrap_ci(
    values: np.ndarray,
    stat: Callable[[np.ndarray], float],
    n: int = 500,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """95% percentile interval of ``stat`` over resampled cases.

    With ``groups`` (one id per case, e.g. the user), whole groups are resampled with all their
    cases: a user's cases are not independent, and resampling cases alone gives intervals several
    times too narrow on event logs."""
    rng = np.random.default_rng(seed)
    m = len(values)
    if m == 0:
        return (float("nan"), float("nan"))
    if groups is None:
        draws = (rng.integers(0, m, m) for _ in range(n))
    else:
        order = np.argsort(groups, kind="stable")
        _, starts = np.unique(groups[order], return_index=True)
        members = np.split(order, starts[1:])
        g = len(members)
        draws = (np.concatenate([members[i] for i in rng.integers(0, g, g)]) for _ in range(n))
    stats = np.array([stat(values[idx]) for idx in draws])
    stats = stats[~np.isnan(stats)]  # resamples where the statistic is undefined
    if len(stats) == 0:
        return (float("nan"), float("nan"))
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def ndcg10(ranks: np.ndarray) -> float:
    return ranking_metrics(ranks)["NDCG@10"]


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def propensity_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y)
    both = len(np.unique(y)) == 2
    return {
        "ROC-AUC": float(roc_auc_score(y, p)) if both else float("nan"),
        "PR-AUC": float(average_precision_score(y, p)) if both else float("nan"),
        "log-loss": float(log_loss(y, p, labels=[0, 1])),
        "ECE": expected_calibration_error(p, y),
        "positives": float(y.mean()),
        "cases": float(len(y)),
    }


def batches(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))
