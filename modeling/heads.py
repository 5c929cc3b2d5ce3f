"""Second-stage fits on an event log, after the sequence model has been chosen on validation.

In: a trained ``BehaviourModel`` and its ``Split``. Out: the model with refitted parameters and a
``calibration.json`` in the run folder (what was fitted, on which cases, with which result, the
propensity thresholds for the promotion policy and the split's time bounds).

- ``fit_repeat``: the repeat bonus (per distance back and per event kind) and the scale of the
  catalogue logits, refitted by next-item cross-entropy on the validation cases with everything
  else frozen. On the training windows the catalogue logits have memorised the next item, so the
  bonus learned there is too small to matter; refitted out of sample, the few dozen parameters
  learn how much a user's own recent items are worth against the catalogue, and the fit is the
  temperature calibration of the next-item distribution at the same time (the perplexity that is
  reported is that of a calibrated model). Then the weight of the bonus in the ranking
  (``repeat_rank``, what top-K serves) is chosen on the same cases by NDCG@10 under serving's
  exclusions: the likelihood spreads probability over the whole catalogue, while the top ten are
  mostly a question of own items against the catalogue's best, where a larger weight wins (Taobao
  validation: NDCG@10 0.0462 at weight 1, 0.0502 at 4).
- ``fit_propensity``: the propensity branch (``modeling.model.PropensityBranch``) set to the
  logistic regression of ``modeling.propensity`` (fitted on the training period, its strength
  chosen on validation), then its residual (token kinds and gaps, the MLP over the features)
  trained on the training period's cases with the regression frozen, the epoch (0: none)
  chosen by validation ROC-AUC. The residual is kept only when its validation gain over the
  regression is more than noise: the lower end of the 95 % interval of the paired ROC-AUC
  difference, users resampled, above 0; otherwise the branch is the regression (``kept_residual``
  in ``calibration.json`` says which, with the interval). One validation day picks among 40 epochs
  by noise as much as by signal: on the Taobao test day the epoch chosen there lost 0.022 to the
  regression (``bench/propensity_backtest.py``). Platt scaling follows
  (``modeling.train.calibrate_propensity``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from modeling.metrics import batches, bootstrap_ci, ranking_metrics, ranks_from_scores
from modeling.model import UNK, BehaviourModel, PropensityBranch
from modeling.propensity import LogisticPropensity, paired_auc_diff, roc_auc, rows_auc
from modeling.sequences import Cases, Split
from modeling.train import TrainConfig, as_tensor, propensity_scores, token_tensors, used_width

REPEAT_RANK_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0)  # weights of the repeat bonus when ranking
HIGH_INTENT_QUANTILE = 0.90  # high-intent nudges go to the top decile of validation scores
REMINDER_QUANTILE = 0.75  # abandoned carts of the top quarter get a reminder, not a discount


@torch.no_grad()
def _last_hidden(
    model: BehaviourModel, cases: Cases, device: torch.device
) -> list[tuple[slice, torch.Tensor]]:
    model.eval()
    table = model.item_table()
    out = []
    for sl in batches(len(cases), 512):
        w = used_width(cases.items[sl])
        items, kinds, gaps, feats = token_tensors(model, cases, sl, w, device)
        out.append((sl, model(items, kinds, gaps, feats, table)[:, -1]))
    return out


def _scores(
    model: BehaviourModel, cases: Cases, sl: slice, h: torch.Tensor, table: torch.Tensor, device: torch.device
) -> torch.Tensor:
    w = used_width(cases.items[sl])
    items, kinds = (as_tensor(a[sl, -w:], device) for a in (cases.items, cases.kinds))
    return model.next_item_scores(h, items, kinds, torch.full_like(items[:, 0], w - 1), table)


def _next_item_fit(
    model: BehaviourModel, cases: Cases, hidden: list[tuple[slice, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Validation NLL (over known targets) and NDCG@10 (no exclusion) of the current parameters."""
    table = model.item_table().detach()
    nll, n, ranks = 0.0, 0, []
    with torch.no_grad():
        for sl, h in hidden:
            s = _scores(model, cases, sl, h, table, device)
            t = as_tensor(cases.targets[sl], device)
            known = t > UNK
            if bool(known.any()):
                logp = torch.log_softmax(s[known][:, 2:], dim=1)
                nll -= float(logp.gather(1, (t[known] - 2)[:, None]).sum())
                n += int(known.sum())
            ranks.append(ranks_from_scores(s.float().cpu(), t.cpu(), None).numpy())
    return {"nll": nll / max(n, 1), "NDCG@10": ranking_metrics(np.concatenate(ranks))["NDCG@10"]}


def fit_repeat(
    model: BehaviourModel, valid: Cases, device: torch.device, progress: bool, epochs: int = 30
) -> dict[str, Any]:
    """Refit the repeat bonus and the logit scale on the validation cases (module docstring)."""
    hidden = _last_hidden(model, valid, device)
    before = _next_item_fit(model, valid, hidden, device)
    params: list[torch.Tensor] = [model.logit_scale, model.repeat_dist.weight, model.repeat_kind.weight]
    saved = [p.detach().clone() for p in params]
    for frozen in model.parameters():
        frozen.requires_grad_(False)
    for tensor in params:
        tensor.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.05)
    table = model.item_table().detach()
    for _ in range(epochs):
        for sl, h in hidden:
            t = as_tensor(valid.targets[sl], device)
            known = t > UNK
            if not bool(known.any()):
                continue
            s = _scores(model, valid, sl, h, table, device)
            loss = F.cross_entropy(s[known][:, 2:], t[known] - 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    for frozen in model.parameters():
        frozen.requires_grad_(True)
    model.logit_scale.requires_grad_(False)
    after = _next_item_fit(model, valid, hidden, device)
    if after["nll"] > before["nll"]:  # never worse than what training left
        with torch.no_grad():
            for tensor, old in zip(params, saved, strict=True):
                tensor.copy_(old)
        after = before
    ranking = choose_repeat_rank(model, valid, hidden, device)
    if progress:
        print(
            f"repeat bonus refitted on validation: NLL {before['nll']:.3f} -> {after['nll']:.3f}, "
            f"NDCG@10 {before['NDCG@10']:.4f} -> {after['NDCG@10']:.4f}, logit scale "
            f"{float(model.logit_scale.detach()):.3f}; ranking weight {ranking['repeat_rank']:g} "
            f"(NDCG@10 {ranking['criterion']} {ranking['by_weight'][str(ranking['repeat_rank'])]:.4f})",
            flush=True,
        )
    return {
        "fitted_on": "validation",
        "before": before,
        "after": after,
        "logit_scale": float(model.logit_scale.detach()),
        "ranking": ranking,
    }


def choose_repeat_rank(
    model: BehaviourModel,
    valid: Cases,
    hidden: list[tuple[slice, torch.Tensor]],
    device: torch.device,
    grid: tuple[float, ...] = REPEAT_RANK_GRID,
) -> dict[str, Any]:
    """Set ``model.repeat_rank`` to the weight of ``grid`` with the best validation NDCG@10 (under
    serving's exclusions where the cases carry them, else none; the smaller weight on a tie)."""
    serving = len(valid.serving_exclude) == len(valid)
    table = model.item_table().detach()
    ranks: dict[float, list[np.ndarray]] = {a: [] for a in grid}
    with torch.no_grad():
        for sl, h in hidden:
            catalogue = model.item_logits(h, table) * model.logit_scale
            bonus = _scores(model, valid, sl, h, table, device) - catalogue
            t = as_tensor(valid.targets[sl], device).cpu()
            exclude = valid.serving_exclude[sl] if serving else None
            for a in grid:
                s = (catalogue + a * bonus).float().cpu()
                ranks[a].append(ranks_from_scores(s, t, exclude).numpy())
    by_weight = {a: ranking_metrics(np.concatenate(r))["NDCG@10"] for a, r in ranks.items()}
    best = grid[0]
    for a in grid[1:]:
        if by_weight[a] > by_weight[best]:
            best = a
    model.repeat_rank.fill_(best)
    return {
        "repeat_rank": best,
        "criterion": "serving's exclusions" if serving else "no exclusion",
        "by_weight": {str(a): v for a, v in by_weight.items()},
    }


def fit_propensity(
    model: BehaviourModel, split: Split, device: torch.device, tcfg: TrainConfig, progress: bool
) -> dict[str, Any]:
    """Train the propensity branch on the training period as logistic regression plus a learned
    residual; the epoch with the best validation ROC-AUC is kept, epoch 0 (the regression alone)
    included (module docstring)."""
    assert model.prop is not None and split.train_cases is not None
    train, valid = split.train_cases, split.valid
    assert train.context is not None and valid.context is not None
    branch = model.prop
    known = np.flatnonzero(train.bought >= 0)
    if len(np.unique(train.bought[known])) < 2:  # nothing to learn: the branch stays as initialised
        return {"fitted_on": "nothing", "note": "no training cases of both kinds", "epoch": 0}
    regression = start_from_regression(branch, train, valid)
    vy = valid.bought
    residual = [p for name, p in branch.named_parameters() if not name.startswith("linear.")]
    opt = torch.optim.AdamW(residual, lr=3e-3, weight_decay=1e-2)
    best, best_epoch, best_state = -1.0, 0, copy.deepcopy(branch.state_dict())
    regression_state, p0 = best_state, None
    if len(np.unique(vy[vy >= 0])) == 2:
        p0 = p = propensity_scores(model, valid, device)
        best = roc_auc(vy[vy >= 0], p[vy >= 0])
        if progress:
            print(f"propensity epoch  0 (logistic regression) valid ROC-AUC {best:.4f}", flush=True)
    rng = np.random.default_rng(tcfg.seed)
    labels = as_tensor(train.bought.astype(np.float32), device)
    for epoch in range(1, tcfg.propensity_epochs + 1):
        branch.train()
        order = known[rng.permutation(len(known))]
        for start in range(0, len(order), 512):
            rows = order[start : start + 512]
            w = used_width(train.items[rows])
            kinds = as_tensor(train.kinds[rows, -w:], device)
            gaps = as_tensor(train.gaps[rows, -w:], device)
            logit = branch(kinds, gaps, as_tensor(train.context[rows], device))
            loss = F.binary_cross_entropy_with_logits(logit, labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        p = propensity_scores(model, valid, device)
        auc = roc_auc(vy[vy >= 0], p[vy >= 0])
        if progress:
            print(f"propensity epoch {epoch:2d} valid ROC-AUC {auc:.4f}", flush=True)
        if np.isnan(auc):  # no validation labels of both kinds (a log shorter than the horizon)
            best_state = copy.deepcopy(branch.state_dict())
            if epoch >= tcfg.propensity_patience:
                best_epoch = epoch
                break
            continue
        if auc > best:
            best, best_epoch, best_state = auc, epoch, copy.deepcopy(branch.state_dict())
        elif epoch - best_epoch >= tcfg.propensity_patience:
            break
    branch.load_state_dict(best_state)
    branch.eval()
    gain: dict[str, Any] = {}
    kept = best_epoch > 0
    if p0 is not None and kept:
        gain = residual_gain(vy, propensity_scores(model, valid, device), p0, valid.users)
        kept = gain["ci95"][0] > 0
        if not kept:  # not more than noise: the regression alone
            branch.load_state_dict(regression_state)
            branch.eval()
    for param in branch.linear.parameters():
        param.requires_grad_(True)
    chosen = "validation ROC-AUC" if best >= 0 else "fixed epochs (no validation labels of both kinds)"
    return {
        "fitted_on": "training period",
        "chosen_on": chosen,
        "epoch": best_epoch if kept else 0,
        "best_epoch": best_epoch,
        "kept_residual": kept,
        "residual_valid_gain": gain,
        "valid_ROC-AUC": best,
        "regression": regression,
    }


def residual_gain(
    labels: np.ndarray, scores: np.ndarray, regression: np.ndarray, users: np.ndarray | None
) -> dict[str, Any]:
    """Validation ROC-AUC of ``scores`` minus that of ``regression`` on the labelled cases, with
    a 95 % interval that resamples users (paired: the same cases for both)."""
    known = labels >= 0
    rows = np.column_stack([scores[known], regression[known], labels[known]])
    lo, hi = bootstrap_ci(rows, paired_auc_diff, groups=users[known] if users is not None else None)
    return {"value": paired_auc_diff(rows), "ci95": [float(lo), float(hi)]}


def start_from_regression(branch: PropensityBranch, train: Cases, valid: Cases) -> dict[str, float]:
    """Set the branch to the logistic regression of ``modeling.propensity`` (its standardisation,
    weights and strength chosen on validation) with a residual of zero, and freeze that part.

    Trained from scratch, the branch's epoch is chosen on one validation day, where it overfits:
    replayed on four test days (``bench/propensity_backtest.py``), it scored 0.025 ROC-AUC below the
    regression on average, below it on three of the four. Started from the regression, training
    only adds what the token kinds, gaps and feature interactions explain beyond it, and epoch 0
    is the regression itself."""
    regression = LogisticPropensity().fit(train, valid)
    scaler, logistic = regression.model[0], regression.model[-1]
    with torch.no_grad():
        branch.ctx_mean.copy_(torch.from_numpy(scaler.mean_))
        branch.ctx_std.copy_(torch.from_numpy(scaler.scale_))
        branch.linear.weight.copy_(torch.from_numpy(logistic.coef_))
        branch.linear.bias.copy_(torch.from_numpy(logistic.intercept_))
        last = branch.mlp[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight.zero_()
        last.bias.zero_()
    for param in branch.linear.parameters():
        param.requires_grad_(False)
    return regression.chosen


def propensity_ranks(scores: np.ndarray, labels: np.ndarray, users: np.ndarray | None) -> dict[str, Any]:
    """Whether calibrated propensities rank the labelled validation cases better than chance: the
    lower end of ROC-AUC's 95 % interval (users resampled) above 0.5. A model that does not is
    exported with ``propensity_ranks: false``, and the worker decides its promotions by the rules
    alone: its top decile is no more likely to buy than anyone, so a high-intent threshold taken
    there would nudge users at random (the 2-hour Taobao time slice's model, validation ROC-AUC
    0.35 on a 16-minute validation period, sent 20,262 high-intent nudges over the slice's first
    30,000 events)."""
    known = labels >= 0
    y, s = labels[known], scores[known]
    if not 0 < y.sum() < len(y):
        return {"ranks": False, "reason": f"{len(y)} labelled validation cases, {int(y.sum())} positive"}
    rows = np.column_stack([s, y])
    lo, hi = bootstrap_ci(rows, rows_auc, groups=users[known] if users is not None else None)
    auc = roc_auc(y, s)
    return {
        "ranks": bool(lo > 0.5),
        "valid_ROC-AUC": auc,
        "ci95": [float(lo), float(hi)],
        "reason": f"validation ROC-AUC {auc:.3f} [{lo:.3f}, {hi:.3f}], users resampled",
    }


def write_calibration(
    model: BehaviourModel, split: Split, device: torch.device, calibration: dict[str, Any], out_dir: Path
) -> dict[str, Any]:
    """Propensity thresholds as quantiles of the calibrated validation scores, where those scores
    rank the validation cases better than chance (``propensity_ranks``), with the split's bounds
    and what the fits did, to ``calibration.json`` (the exporter puts them in the manifest)."""
    p = propensity_scores(model, split.valid, device)
    check = calibration["propensity_ranks"] = propensity_ranks(p, split.valid.bought, split.valid.users)
    if check["ranks"]:
        calibration["propensity_thresholds"] = {
            "high_intent": float(np.quantile(p, HIGH_INTENT_QUANTILE)) if len(p) else 0.7,
            "reminder": float(np.quantile(p, REMINDER_QUANTILE)) if len(p) else 0.5,
            "high_intent_quantile": HIGH_INTENT_QUANTILE,
            "reminder_quantile": REMINDER_QUANTILE,
        }
    else:
        calibration.pop("propensity_thresholds", None)
    calibration["split"] = split.bounds
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2))
    return calibration
