"""Evaluation of a trained run against baselines on the same split, with a report.

In: a run folder (``modeling.train``) and the ``Split`` it was trained on. Out: ``eval.json`` and
``report.md`` plus PNG plots in the run folder. Next item is ranked over the full catalogue; for
the benchmark files the headline excludes the user's history (the S3-Rec / ICLRec protocol) and the
no-exclusion numbers stand beside it; sampled-99-negatives numbers are a footnote.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling.baselines import ItemKNN, MostPopular, RecentItems
from modeling.metrics import (
    batches,
    bootstrap_ci,
    ndcg10,
    propensity_metrics,
    ranking_metrics,
    ranks_from_scores,
    sampled_ranks,
)
from modeling.model import BehaviourModel
from modeling.propensity import GBTPropensity, LogisticPropensity, rows_auc
from modeling.sequences import Cases, Split
from modeling.train import last_position, predict


@torch.no_grad()
def model_scores(model: BehaviourModel, cases: Cases, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranking scores (what top-K serves) and calibrated scores (perplexity) of the cases."""
    _, calibrated, ranking = last_position(model, cases, sl, next(model.parameters()).device)
    return ranking.float().cpu(), calibrated.float().cpu()


def evaluate(
    model: BehaviourModel, split: Split, run_dir: Path, *, sampled: bool = True, batch: int = 512
) -> dict[str, Any]:
    model.eval()
    cases = split.test
    n_items = len(split.vocab)
    popular = MostPopular(split.train_histories, n_items)
    knn = ItemKNN(split.train_histories, n_items)

    def hist(sl: slice) -> list[list[int]]:
        return cases.history[sl]

    calibrated: dict[int, torch.Tensor] = {}

    def ranked_by_model(sl: slice) -> torch.Tensor:
        ranking, calibrated[sl.start] = model_scores(model, cases, sl)
        return ranking

    scorers: dict[str, Callable[[slice], torch.Tensor]] = {
        "model": ranked_by_model,
        "most-popular": lambda sl: popular.score(hist(sl)),
        "item-kNN": lambda sl: knn.score(hist(sl)),
    }
    if split.train_cases is not None:  # event logs: users come back to items they saw
        recent = RecentItems(split.train_histories, n_items)
        scorers["recent-items"] = lambda sl: recent.score(hist(sl))
    gen = torch.Generator().manual_seed(0)
    targets = torch.from_numpy(cases.targets)
    # benchmark files: the published protocol excludes history; event logs revisit items on purpose
    headline = "no_exclusion" if split.train_cases is not None else "history_excluded"
    # the sampled protocol ranks a target among unseen items: it only means something for benchmark files
    sampled = sampled and headline == "history_excluded"
    # event logs: also what serving can show (the event's own items, the cart and recent purchases
    # are never recommended), since predicting the item being viewed right now is easy and useless
    serving = headline == "no_exclusion" and len(cases.serving_exclude) == len(cases)
    results: dict[str, Any] = {
        "data": split.name,
        "test_cases": len(cases),
        "items": n_items - 2,
        "headline": headline,
        "models": {},
    }
    for name, score in scorers.items():
        excl, full, serv, samp, nll, top1 = [], [], [], [], [], []
        for sl in batches(len(cases), batch):
            s = score(sl)
            t = targets[sl]
            if name == "model":  # likelihood of the calibrated distribution, top-1 of the ranking
                logp = torch.log_softmax(calibrated.pop(sl.start)[:, 2:], dim=1)
                known = t >= 2
                nll.append(-logp[known].gather(1, (t[known] - 2)[:, None])[:, 0].numpy())
                top1.append((s[:, 2:].argmax(dim=1) + 2 == t).numpy())
            if sampled:
                samp.append(sampled_ranks(s.clone(), t, cases.history[sl], 99, gen).numpy())
            full.append(ranks_from_scores(s.clone(), t, None).numpy())
            if serving:
                serv.append(ranks_from_scores(s.clone(), t, cases.serving_exclude[sl]).numpy())
            excl.append(ranks_from_scores(s, t, cases.history[sl]).numpy())
        r_ex, r_full = np.concatenate(excl), np.concatenate(full)
        entry: dict[str, Any] = {
            "history_excluded": ranking_metrics(r_ex),
            "no_exclusion": ranking_metrics(r_full),
            "NDCG@10_ci95": bootstrap_ci(
                r_ex if headline == "history_excluded" else r_full, ndcg10, groups=cases.users
            ),
        }
        if serving:
            r_serv = np.concatenate(serv)
            entry["serving_excluded"] = ranking_metrics(r_serv)
            entry["serving_excluded"]["NDCG@10_ci95"] = bootstrap_ci(r_serv, ndcg10, groups=cases.users)
        if sampled:
            entry["sampled_99"] = ranking_metrics(np.concatenate(samp))
        if nll:
            entry["perplexity"] = float(np.exp(np.concatenate(nll).mean()))
            entry["next_token_accuracy"] = float(np.concatenate(top1).mean())
        results["models"][name] = entry
    if split.train_cases is not None:
        results["propensity"] = evaluate_propensity(model, split, run_dir)
    if split.daily and model.prop is not None:
        results["daily"] = evaluate_daily(model, split)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    write_report(results, run_dir)
    return results


def evaluate_propensity(model: BehaviourModel, split: Split, run_dir: Path) -> dict[str, Any]:
    """Purchase within the horizon: the model against logistic regression and gradient-boosted
    trees on the window features, all chosen on the validation period, on the same test cases."""
    assert split.train_cases is not None
    known = split.test.bought >= 0  # cases whose horizon ends inside the data
    y = split.test.bought[known]
    hours = split.horizon_s / 3600
    trained = split.train_cases.bought[split.train_cases.bought >= 0]
    if len(np.unique(y)) < 2 or len(np.unique(trained)) < 2:
        # a log shorter than the horizon: nothing to score (the report says so)
        return {
            "horizon": f"{hours:g}h",
            "positives": float(y.mean()) if len(y) else float("nan"),
            "censored_cases": int((~known).sum()),
            "note": "no test or training labels of both kinds",
        }
    dev = next(model.parameters()).device
    _, _, p_model = predict(model, split.test, dev, exclude=False)
    baselines: list[LogisticPropensity | GBTPropensity] = [
        LogisticPropensity().fit(split.train_cases, split.valid),
        GBTPropensity().fit(split.train_cases, split.valid),
    ]
    users = split.test.users[known] if split.test.users is not None else None
    preds = {"model": p_model[known], **{b.name: b.predict(split.test)[known] for b in baselines}}
    out: dict[str, Any] = {
        "horizon": f"{hours:g}h",
        "positives": float(y.mean()),
        "censored_cases": int((~known).sum()),
        "chosen": {b.name: b.chosen for b in baselines},
    }
    out.update(_compare(preds, y, users))
    plot_reliability(preds, y, run_dir / "reliability.png")
    return out


def _compare(preds: dict[str, np.ndarray], y: np.ndarray, users: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, p in preds.items():
        pairs = np.stack([p, y], axis=1)
        out[name] = {**propensity_metrics(p, y), "ROC-AUC_ci95": bootstrap_ci(pairs, rows_auc, groups=users)}
    return out


def evaluate_daily(model: BehaviourModel, split: Split) -> dict[str, Any]:
    """Daily targeting: does a user buy during the day, scored at the day's start. A propensity
    branch of the same design is trained on the training period's user-days (its epoch chosen on
    the validation day's, then Platt-scaled there) beside the two baselines on the same features;
    the served graph keeps the per-event branch."""
    from modeling.heads import fit_propensity
    from modeling.model import PropensityBranch
    from modeling.train import TrainConfig, calibrate_propensity, labelled_rate, propensity_scores

    d = split.daily
    if any(len(np.unique(d[k].bought)) < 2 for k in ("train", "valid", "test")):
        return {"note": "no user-days of both kinds in every period"}
    dev = next(model.parameters()).device
    daily_model = copy.deepcopy(model)
    torch.manual_seed(0)
    daily_model.prop = PropensityBranch(model.cfg).to(dev)
    daily_model.prop.apply(BehaviourModel._init)
    sub = replace(split, train_cases=d["train"], valid=d["valid"])
    fitted = fit_propensity(daily_model, sub, dev, TrainConfig(), progress=False)
    fitted["calibration"] = calibrate_propensity(
        daily_model, d["valid"], dev, prior=labelled_rate(d["train"], d["valid"])
    )
    baselines: list[LogisticPropensity | GBTPropensity] = [
        LogisticPropensity().fit(d["train"], d["valid"]),
        GBTPropensity().fit(d["train"], d["valid"]),
    ]
    test = d["test"]
    preds = {
        "model": propensity_scores(daily_model, test, dev),
        **{b.name: b.predict(test) for b in baselines},
    }
    return {
        "cases": {k: len(c) for k, c in d.items()},
        "positives": float(test.bought.mean()),
        "chosen": {"model": fitted, **{b.name: b.chosen for b in baselines}},
        **_compare(preds, test.bought, test.users),
    }


def plot_reliability(preds: dict[str, np.ndarray], y: np.ndarray, path: Path, bins: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for name, p in preds.items():
        idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        xs = [p[idx == b].mean() for b in range(bins) if (idx == b).any()]
        ys = [y[idx == b].mean() for b in range(bins) if (idx == b).any()]
        ax.plot(xs, ys, "o-", label=name)
    ax.set_xlabel("predicted purchase probability")
    ax.set_ylabel("observed purchase rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, Any], run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    head = results["headline"]
    names = list(models)
    vals = [models[n][head]["NDCG@10"] for n in names]
    lo = [v - models[n]["NDCG@10_ci95"][0] for v, n in zip(vals, names, strict=True)]
    hi = [models[n]["NDCG@10_ci95"][1] - v for v, n in zip(vals, names, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        names,
        vals,
        yerr=[lo, hi],
        capsize=6,
        color=["tab:orange", "tab:gray", "tab:blue", "tab:green"][: len(names)],
    )
    ax.set_ylabel(f"test NDCG@10 ({head.replace('_', ' ')})")
    ax.set_title(f"{results['data']}: next item, full ranking")
    fig.tight_layout()
    fig.savefig(run_dir / "ndcg10.png", dpi=100)
    plt.close(fig)

    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    lines = [
        f"# Evaluation: {results['data']}",
        "",
        f"Test cases: {results['test_cases']}, items: {results['items']}. Next item ranked over the whole "
        f"catalogue; headline: {head.replace('_', ' ')} (benchmark files exclude the user's history as the "
        "S3-Rec / ICLRec code does; event logs do not), 95% bootstrap interval of NDCG@10 in brackets "
        "(users resampled with all their cases). Items tied with the target count as half above it.",
        "",
        "| model | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | MRR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, e in models.items():
        m = e[head]
        ci = e["NDCG@10_ci95"]
        lines.append(
            f"| {n} | {m['HR@5']:.4f} | {m['HR@10']:.4f} | {m['HR@20']:.4f} | {m['NDCG@5']:.4f} | "
            f"{m['NDCG@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {m['NDCG@20']:.4f} | {m['MRR']:.4f} |"
        )
    other = "no_exclusion" if head == "history_excluded" else "history_excluded"
    lines += [
        "",
        f"{other.replace('_', ' ').capitalize()}:",
        "",
        "| model | HR@10 | NDCG@10 | MRR |",
        "|---|---|---|---|",
    ]
    for n, e in models.items():
        m = e[other]
        lines.append(f"| {n} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {m['MRR']:.4f} |")
    if all("serving_excluded" in e for e in models.values()):
        lines += [
            "",
            "Under serving's exclusions (the event's own items, the cart, items bought in the last 30 days "
            "are never recommended; a target among them is a miss):",
            "",
            "| model | HR@10 | NDCG@10 | MRR |",
            "|---|---|---|---|",
        ]
        for n, e in models.items():
            m = e["serving_excluded"]
            ci = m["NDCG@10_ci95"]
            lines.append(
                f"| {n} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {m['MRR']:.4f} |"
            )
    me = models.get("model", {})
    if "perplexity" in me:
        lines += [
            "",
            f"Model perplexity over the catalogue: {me['perplexity']:.1f}; next-token accuracy: "
            f"{me['next_token_accuracy']:.4f}.",
        ]
    if all("sampled_99" in e for e in models.values()):
        lines += [
            "",
            "Footnote, for comparison with older papers only: sampled protocol (target among 99 "
            "random items outside the history), HR@10 / NDCG@10: "
            + "; ".join(
                f"{n} {e['sampled_99']['HR@10']:.4f} / {e['sampled_99']['NDCG@10']:.4f}"
                for n, e in models.items()
            )
            + ".",
        ]
    prop = results.get("propensity")
    if prop and "note" in prop:
        lines += ["", f"Purchase within {prop['horizon']}: {prop['note']}."]
    elif prop:
        lines += [
            "",
            f"Purchase within {prop['horizon']} (positives {prop['positives']:.3f}), same test cases:",
            "",
            "| model | ROC-AUC | PR-AUC | log-loss | ECE |",
            "|---|---|---|---|---|",
        ]
        for n in ("model", "logistic regression", "gradient-boosted trees"):
            m = prop[n]
            ci = m["ROC-AUC_ci95"]
            lines.append(
                f"| {n} | {m['ROC-AUC']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {m['PR-AUC']:.4f} | "
                f"{m['log-loss']:.4f} | {m['ECE']:.4f} |"
            )
        lines += ["", "![reliability](reliability.png)"]
    daily = results.get("daily")
    if daily and "note" not in daily:
        lines += [
            "",
            f"Daily targeting: buys during the test day, scored at its start ({daily['cases']['test']} "
            f"users, positives {daily['positives']:.3f}; a branch of the same design trained on "
            f"{daily['cases']['train']} training user-days):",
            "",
            "| model | ROC-AUC | PR-AUC | log-loss | ECE |",
            "|---|---|---|---|---|",
        ]
        for n in ("model", "logistic regression", "gradient-boosted trees"):
            m = daily[n]
            ci = m["ROC-AUC_ci95"]
            lines.append(
                f"| {n} | {m['ROC-AUC']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {m['PR-AUC']:.4f} | "
                f"{m['log-loss']:.4f} | {m['ECE']:.4f} |"
            )
    if cfg:
        lines += ["", "Configuration:", "", "```json", json.dumps(cfg, indent=2), "```"]
    lines += ["", "![NDCG@10](ndcg10.png)", "", "![learning curve](learning_curve.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
