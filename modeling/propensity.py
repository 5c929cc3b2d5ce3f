"""Purchase propensity baselines: logistic regression and gradient-boosted trees.

In: evaluation ``Cases`` with their window features (``Cases.context``, computed by
``streams.features.context_features``: the recency, frequency and clock features the worker has in
state). Out: scores for the test cases from models fitted on the training period's cases, with
every tuning choice (regularisation strength, number of boosting rounds) made on the validation
period, never on random rows of the training users (their cases are near-duplicates of each other,
so a random hold-out never stops an overfitting model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modeling.sequences import Cases


def labelled(cases: Cases) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the cases whose horizon was observed."""
    if cases.context is None:
        raise ValueError("these cases have no window features (event logs only)")
    known = cases.bought >= 0
    return cases.context[known].astype(np.float64), cases.bought[known]


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC; NaN where the labels hold one class only."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def rows_auc(rows: np.ndarray) -> float:
    """ROC-AUC of column 0 (scores) against the labels in column 1 (NaN where they hold one class
    only): the statistic of a user-resampled interval."""
    return roc_auc(rows[:, 1], rows[:, 0])


def paired_auc_diff(rows: np.ndarray) -> float:
    """ROC-AUC of column 0 minus that of column 1 against the labels in column 2 (NaN where the
    labels hold one class only): the statistic of a paired, user-resampled interval."""
    y = rows[:, 2]
    if not 0 < y.sum() < len(y):
        return float("nan")
    return roc_auc(y, rows[:, 0]) - roc_auc(y, rows[:, 1])


class LogisticPropensity:
    """Standardised features, L2-regularised logistic regression; C chosen on validation AUC."""

    name = "logistic regression"
    GRID = (0.001, 0.01, 0.1, 1.0, 10.0)

    def __init__(self) -> None:
        self.model: Any = None
        self.chosen: dict[str, float] = {}

    def fit(self, train: Cases, valid: Cases) -> LogisticPropensity:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = labelled(train)
        xv, yv = labelled(valid)
        best = -1.0
        for c in self.GRID:
            m = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x, y)
            auc = roc_auc(yv, m.predict_proba(xv)[:, 1]) if len(yv) else float("nan")
            if np.isnan(auc) and c == 1.0:  # nothing to choose on: the default strength
                self.model, self.chosen = m, {"C": c, "valid_ROC-AUC": auc}
            elif auc > best:
                best, self.model, self.chosen = auc, m, {"C": c, "valid_ROC-AUC": auc}
        return self

    def predict(self, cases: Cases) -> np.ndarray:
        assert cases.context is not None
        return np.asarray(self.model.predict_proba(cases.context.astype(np.float64))[:, 1])


class GBTPropensity:
    """Regularised gradient-boosted trees; the number of rounds stops early on validation AUC."""

    name = "gradient-boosted trees"
    MAX_ROUNDS = 400
    STEP = 10

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.model: Any = None
        self.chosen: dict[str, float] = {}

    def fit(self, train: Cases, valid: Cases) -> GBTPropensity:
        from sklearn.ensemble import HistGradientBoostingClassifier

        x, y = labelled(train)
        xv, yv = labelled(valid)
        clf = HistGradientBoostingClassifier(
            learning_rate=0.05,
            max_iter=self.STEP,
            max_leaf_nodes=15,
            min_samples_leaf=100,
            l2_regularization=1.0,
            early_stopping=False,
            warm_start=True,
            random_state=self.seed,
        )
        best, best_rounds, stale = -1.0, self.STEP, 0
        for rounds in range(self.STEP, self.MAX_ROUNDS + 1, self.STEP):
            clf.set_params(max_iter=rounds)
            clf.fit(x, y)
            if len(yv) == 0 or yv.min() == yv.max():  # nothing to stop on: a fixed, modest number
                best, best_rounds = float("nan"), 100
                break
            auc = roc_auc(yv, clf.predict_proba(xv)[:, 1])
            if auc > best:
                best, best_rounds, stale = auc, rounds, 0
            else:
                stale += 1
                if stale >= 5:
                    break
        final = HistGradientBoostingClassifier(
            **{**clf.get_params(), "warm_start": False, "max_iter": best_rounds}
        )
        self.model = final.fit(x, y)
        self.chosen = {"rounds": best_rounds, "valid_ROC-AUC": best}
        return self

    def predict(self, cases: Cases) -> np.ndarray:
        assert cases.context is not None
        return np.asarray(self.model.predict_proba(cases.context.astype(np.float64))[:, 1])
