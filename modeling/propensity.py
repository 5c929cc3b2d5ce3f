"""Purchase propensity: the gradient-boosted-trees baseline and its features.

In: evaluation ``Cases`` (left-padded token windows). Out: recency / frequency / cart features per
case and a ``HistGradientBoostingClassifier`` trained on the training period's cases, evaluated
beside the model's propensity head on the same test cases.
"""

from __future__ import annotations

import numpy as np

from modeling.model import PAD
from modeling.sequences import Cases
from streams.state import TokenKind

KINDS = [int(k) for k in TokenKind]


def features(cases: Cases) -> np.ndarray:
    """Recency, frequency and cart features of each case's window, (n, f) float32."""
    items, kinds, gaps = cases.items, cases.kinds, cases.gaps
    valid = items != PAD
    last10 = np.zeros_like(valid)
    last10[:, -10:] = True
    cols = [valid.sum(1)]
    for k in KINDS:
        is_k = kinds == k
        cols += [is_k.sum(1), (is_k & last10).sum(1)]
    purchase = kinds == TokenKind.PURCHASE
    width = items.shape[1]
    # tokens since the last purchase in the window (width when there is none)
    idx = np.where(purchase, np.arange(width)[None, :], -1).max(1)
    since = np.where(idx >= 0, width - 1 - idx, width)
    after_purchase = np.arange(width)[None, :] > idx[:, None]
    cols += [since, ((kinds == TokenKind.CART_ADD) & after_purchase).sum(1)]
    cols += [
        kinds[:, -1],
        gaps[:, -1],
        np.where(valid & last10, gaps, 0).sum(1) / np.maximum((valid & last10).sum(1), 1),
    ]
    distinct = np.array([len(set(row[row != PAD].tolist())) for row in items])
    cols += [distinct]
    return np.stack(cols, axis=1).astype(np.float32)


class GBTPropensity:
    """Gradient-boosted trees on recency / frequency / cart features."""

    name = "gradient-boosted trees"

    def __init__(self, seed: int = 0) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.clf = HistGradientBoostingClassifier(
            max_iter=300, learning_rate=0.05, early_stopping=True, validation_fraction=0.15, random_state=seed
        )

    def fit(self, cases: Cases) -> GBTPropensity:
        known = cases.bought >= 0
        self.clf.fit(features(cases)[known], cases.bought[known])
        return self

    def predict(self, cases: Cases) -> np.ndarray:
        return np.asarray(self.clf.predict_proba(features(cases))[:, 1])
