"""Purchase propensity backtest: the training pipeline's protocol replayed on earlier days.

``shopstream train --data taobao-users`` trains before 12-02, chooses on 12-02 and tests on 12-03:
one test day of about 800 users, where day-to-day differences between the models are as large as
the differences between them. This replays the same protocol with the origin moved back a day at
a time (train before D-1, choose on D-1, test on D, the horizon censored at each period's end as
``time_split`` does), and reports, for every test day, the test ROC-AUC (with the expected
calibration error, 10 bins) of:

- the model's propensity branch, fitted exactly as ``train`` fits it (``modeling.heads
  .fit_propensity``: epoch chosen on the validation day's ROC-AUC, the residual kept only when its
  validation gain over the regression is more than noise, then Platt-scaled there), one row per
  seed;
- logistic regression and gradient-boosted trees on the same window features, tuned on the same
  validation day (``modeling.propensity``).

The model's difference from logistic regression is reported per day with a 95 % interval that
resamples users (paired: the same users' cases for both). The branch reads no item ids, so the
sequence model itself is not trained here (minutes, not the 45 of ``train``).

    python bench/propensity_backtest.py [--data taobao-users] [--days 4] [--seeds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.cli import HORIZON_S
from modeling.heads import fit_propensity
from modeling.metrics import bootstrap_ci, expected_calibration_error
from modeling.model import BehaviourModel, ModelConfig
from modeling.propensity import GBTPropensity, LogisticPropensity, paired_auc_diff, roc_auc, rows_auc
from modeling.sequences import Split, sequences_from_events, time_split
from modeling.train import PRESETS, TrainConfig, calibrate_propensity, labelled_rate, propensity_scores
from streams.features import N_CONTEXT
from streams.sources.datasets import load
from streams.splits import split_bounds
from streams.state import N_GAPS

DAY_S = 86400.0


def branch_scores(split: Split, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Test scores of a propensity branch fitted as ``train`` fits it (the events preset's sizes;
    the item table is a placeholder, the branch never reads it)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=2, n_gaps=N_GAPS, n_context=N_CONTEXT, **PRESETS["events"].model)
    model = BehaviourModel(cfg)
    tcfg = TrainConfig(seed=seed)
    fitted = fit_propensity(model, split, torch.device("cpu"), tcfg, progress=False)
    assert split.train_cases is not None
    calibrate_propensity(
        model, split.valid, torch.device("cpu"), prior=labelled_rate(split.train_cases, split.valid)
    )
    return propensity_scores(model, split.test, torch.device("cpu")), fitted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="taobao-users", help="an event data set with a day split")
    ap.add_argument("--days", type=int, default=4, help="test days, the newest (the pipeline's own) first")
    ap.add_argument("--seeds", type=int, default=1, help="branch fits per day (every one is reported)")
    ap.add_argument("--datasets-dir", default=os.environ.get("SHOPSTREAM_DATASETS_DIR", "../shared/data"))
    args = ap.parse_args()
    if args.data != "taobao-users":
        raise SystemExit("only taobao-users has the calendar-day split this backtest shifts")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    seqs = sequences_from_events(load(args.data, Path(args.datasets_dir)))
    valid_start, test_start, test_end = split_bounds(args.data, [])
    print(
        f"{args.data}: {len(seqs)} users; train before D-1, choose on D-1, test on D; purchase within "
        f"{HORIZON_S / 3600:g} h; ROC-AUC on D's labelled cases, [95 % interval, users resampled]"
    )
    header = (
        f"{'test day':10} {'cases':>6} {'pos':>6}  {'scorer':28} {'ROC-AUC':>7} {'interval':>16} {'ECE':>6}"
    )
    print(header)
    diffs: list[float] = []
    for back in range(args.days):
        shift = back * DAY_S
        started = time.time()
        split = time_split(
            seqs, valid_start - shift, test_start - shift, test_end - shift, 50, HORIZON_S, args.data
        )
        assert split.train_cases is not None and split.test.users is not None
        known = split.test.bought >= 0
        y, users = split.test.bought[known], split.test.users[known]
        day = time.strftime("%Y-%m-%d", time.gmtime(test_start - shift + 8 * 3600))
        scores: dict[str, np.ndarray] = {}
        for seed in range(args.seeds):
            p, fitted = branch_scores(split, seed)
            g = fitted.get("residual_valid_gain") or {}
            if g:
                print(
                    f"{day:10} seed {seed}: best validation epoch {fitted['best_epoch']}, gain over the "
                    f"regression {g['value']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]: "
                    + ("kept" if fitted["kept_residual"] else "not more than noise, the regression alone")
                )
            scores[f"model branch (seed {seed}, epoch {fitted['epoch']})"] = p[known]
        for baseline in (LogisticPropensity(), GBTPropensity()):
            baseline.fit(split.train_cases, split.valid)
            scores[baseline.name] = baseline.predict(split.test)[known]
        for name, p in scores.items():
            lo, hi = bootstrap_ci(np.stack([p, y], axis=1), rows_auc, groups=users)
            auc = roc_auc(y, p)
            ece = expected_calibration_error(p, y)
            print(
                f"{day:10} {len(y):6d} {y.mean():6.3f}  {name:28} {auc:7.4f} [{lo:.4f}, {hi:.4f}] {ece:6.4f}"
            )
        model_p = next(iter(scores.values()))
        pairs = np.stack([model_p, scores[LogisticPropensity.name], y], axis=1)
        diff = paired_auc_diff(pairs)
        lo, hi = bootstrap_ci(pairs, paired_auc_diff, groups=users)
        diffs.append(diff)
        print(
            f"{day:10} model (seed 0) minus logistic regression: {diff:+.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
    mean = float(np.mean(diffs))
    print(f"mean over {len(diffs)} test days, model (seed 0) minus logistic regression: {mean:+.4f}")


if __name__ == "__main__":
    main()
