"""Evaluation of a trained run against baselines on the same split, with a report.

In: a run folder (``modeling.train``) and the ``Split`` it was trained on. Out: ``eval.json`` and
``report.md`` plus PNG plots in the run folder. Next item is ranked over the full catalogue; for
the benchmark files the headline excludes the user's history (the S3-Rec / ICLRec protocol) and the
no-exclusion numbers stand beside it; sampled-99-negatives numbers are a footnote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling.baselines import ItemKNN, MostPopular
from modeling.metrics import (
    batches,
    bootstrap_ci,
    ndcg10,
    ranking_metrics,
    ranks_from_scores,
    sampled_ranks,
)
from modeling.model import BehaviourModel
from modeling.sequences import Cases, Split
from modeling.train import _t, _width


@torch.no_grad()
def model_scores(model: BehaviourModel, cases: Cases, sl: slice) -> torch.Tensor:
    w = _width(cases.items[sl])
    dev = next(model.parameters()).device
    h = model(*(_t(a[sl, -w:], dev) for a in (cases.items, cases.kinds, cases.gaps)))[:, -1]
    return model.item_logits(h).float().cpu()


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

    scorers: dict[str, Callable[[slice], torch.Tensor]] = {
        "model": lambda sl: model_scores(model, cases, sl),
        "most-popular": lambda sl: popular.score(hist(sl)),
        "item-kNN": lambda sl: knn.score(hist(sl)),
    }
    gen = torch.Generator().manual_seed(0)
    targets = torch.from_numpy(cases.targets)
    results: dict[str, Any] = {
        "data": split.name,
        "test_cases": len(cases),
        "items": n_items - 2,
        "models": {},
    }
    for name, score in scorers.items():
        excl, full, samp, nll, top1 = [], [], [], [], []
        for sl in batches(len(cases), batch):
            s = score(sl)
            t = targets[sl]
            if name == "model":
                logp = torch.log_softmax(s[:, 2:], dim=1)
                known = t >= 2
                nll.append(-logp[known].gather(1, (t[known] - 2)[:, None])[:, 0].numpy())
                top1.append((s[:, 2:].argmax(dim=1) + 2 == t).numpy())
            if sampled:
                samp.append(sampled_ranks(s.clone(), t, cases.history[sl], 99, gen).numpy())
            full.append(ranks_from_scores(s.clone(), t, None).numpy())
            excl.append(ranks_from_scores(s, t, cases.history[sl]).numpy())
        r_ex, r_full = np.concatenate(excl), np.concatenate(full)
        entry: dict[str, Any] = {
            "history_excluded": ranking_metrics(r_ex),
            "no_exclusion": ranking_metrics(r_full),
            "NDCG@10_ci95_history_excluded": bootstrap_ci(r_ex, ndcg10),
        }
        if sampled:
            entry["sampled_99"] = ranking_metrics(np.concatenate(samp))
        if nll:
            entry["perplexity"] = float(np.exp(np.concatenate(nll).mean()))
            entry["next_token_accuracy"] = float(np.concatenate(top1).mean())
        results["models"][name] = entry
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    write_report(results, run_dir)
    return results


def write_report(results: dict[str, Any], run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    names = list(models)
    vals = [models[n]["history_excluded"]["NDCG@10"] for n in names]
    lo = [v - models[n]["NDCG@10_ci95_history_excluded"][0] for v, n in zip(vals, names, strict=True)]
    hi = [models[n]["NDCG@10_ci95_history_excluded"][1] - v for v, n in zip(vals, names, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, vals, yerr=[lo, hi], capsize=6, color=["tab:orange", "tab:gray", "tab:blue"][: len(names)])
    ax.set_ylabel("test NDCG@10 (history excluded)")
    ax.set_title(f"{results['data']}: next item, full ranking")
    fig.tight_layout()
    fig.savefig(run_dir / "ndcg10.png", dpi=100)
    plt.close(fig)

    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    lines = [
        f"# Evaluation: {results['data']}",
        "",
        f"Test cases: {results['test_cases']}, items: {results['items']}. Next item ranked over the whole "
        "catalogue; headline with the user's history excluded (S3-Rec / ICLRec protocol), 95% bootstrap "
        "interval of NDCG@10 in brackets.",
        "",
        "| model | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | MRR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, e in models.items():
        m = e["history_excluded"]
        ci = e["NDCG@10_ci95_history_excluded"]
        lines.append(
            f"| {n} | {m['HR@5']:.4f} | {m['HR@10']:.4f} | {m['HR@20']:.4f} | {m['NDCG@5']:.4f} | "
            f"{m['NDCG@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {m['NDCG@20']:.4f} | {m['MRR']:.4f} |"
        )
    lines += ["", "Without history exclusion:", "", "| model | HR@10 | NDCG@10 | MRR |", "|---|---|---|---|"]
    for n, e in models.items():
        m = e["no_exclusion"]
        lines.append(f"| {n} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {m['MRR']:.4f} |")
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
    if cfg:
        lines += ["", "Configuration:", "", "```json", json.dumps(cfg, indent=2), "```"]
    lines += ["", "![NDCG@10](ndcg10.png)", "", "![learning curve](learning_curve.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
