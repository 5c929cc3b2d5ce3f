"""Training: next-token prediction with full softmax cross-entropy, validation each epoch.

In: a ``Split`` and a preset. Out: a run folder with ``config.json``, ``vocab.json``,
``model.pt`` (the best state dict by validation NDCG@10; load with ``weights_only=True``),
``metrics.jsonl`` (one line per epoch) and ``learning_curve.png``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from modeling.metrics import batches, ranking_metrics, ranks_from_scores
from modeling.model import PAD, UNK, BehaviourModel, ModelConfig
from modeling.sequences import Cases, Split
from streams.features import N_CONTEXT
from streams.state import FEATURE_BUCKETS, MAX_FEATURES, N_GAPS


@dataclass
class TrainConfig:
    epochs: int = 200  # upper bound; early stopping usually ends sooner
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    patience: int = 10  # epochs without validation NDCG@10 improvement before stopping
    propensity_epochs: int = 40  # upper bound for the propensity branch (event logs)
    propensity_patience: int = 5  # its epochs without validation ROC-AUC improvement before stopping
    refit_repeat: bool = True  # event logs: refit the repeat bonus and logit scale on validation cases
    repeat_epochs: int = 30  # passes over the validation cases for that refit
    kind_weight: float = 0.0  # weight of the next-event-kind loss (event logs)
    eval_exclude_history: bool = True  # validation protocol (benchmark files: exclude history)
    seed: int = 42
    device: str = "auto"  # auto: CUDA when present, else CPU
    max_minutes: float = 60.0  # wall-clock budget
    threads: int = 0  # CPU threads for torch (0: torch's default, all cores)
    features: bool = True  # use the data's token features (category, brand, price, text) when it has them


@dataclass
class Preset:
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # trains in well under a minute on CPU: tests and the demo
    "tiny": Preset(
        model={"d_model": 32, "n_layers": 1, "n_heads": 1, "max_len": 20, "dropout": 0.2},
        train={"epochs": 3, "batch_size": 128, "patience": 3, "max_minutes": 1.0},
    ),
    # the S3-Rec / ICLRec benchmark files (Beauty, Sports_and_Outdoors, ...)
    "seqrec": Preset(
        model={"d_model": 64, "n_layers": 2, "n_heads": 2, "max_len": 50, "dropout": 0.5},
        train={"epochs": 300, "batch_size": 256, "lr": 1e-3, "patience": 15},
    ),
    # multi-event logs (Taobao, REES46): kinds, time gaps, propensity and next-kind heads
    "events": Preset(
        model={"d_model": 64, "n_layers": 2, "n_heads": 2, "max_len": 50, "dropout": 0.3, "repeat": True},
        train={
            "epochs": 100,
            "batch_size": 64,
            "lr": 2e-3,
            "patience": 8,
            "kind_weight": 0.2,
            "eval_exclude_history": False,
        },
    ),
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def used_width(items: np.ndarray) -> int:
    """Columns that hold tokens in a left-padded batch: the rest is padding and can be cut."""
    used = (items != PAD).any(axis=0)
    return int(len(used) - used.argmax()) if used.any() else 1


def token_tensors(
    model: BehaviourModel, cases: Cases, rows: slice | np.ndarray, w: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The last ``w`` columns of items, kinds, gaps (b, w) and, for a model with features, feats."""
    items, kinds, gaps = (as_tensor(a[rows, -w:], device) for a in (cases.items, cases.kinds, cases.gaps))
    feats = None
    if model.cfg.n_feats and cases.feats is not None:
        feats = as_tensor(cases.feats[rows, -w:], device).long()
    return items, kinds, gaps, feats


def last_position(
    model: BehaviourModel, cases: Cases, sl: slice, device: torch.device, table: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden state at each case's newest token (b, d), its calibrated next-item scores (b, n_items)
    (likelihood, perplexity) and its ranking scores (top-K, NDCG; ``repeat_rank`` applied)."""
    w = used_width(cases.items[sl])
    items, kinds, gaps, feats = token_tensors(model, cases, sl, w, device)
    table = model.item_table() if table is None else table
    h = model(items, kinds, gaps, feats, table)[:, -1]
    at = torch.full_like(items[:, 0], w - 1)
    calibrated = model.next_item_scores(h, items, kinds, at, table)
    if float(model.repeat_rank) == 1.0 or not model.cfg.repeat:
        return h, calibrated, calibrated
    return h, calibrated, model.next_item_scores(h, items, kinds, at, table, ranking=True)


@torch.no_grad()
def propensity_scores(
    model: BehaviourModel, cases: Cases, device: torch.device, batch: int = 1024
) -> np.ndarray:
    """Calibrated purchase probability of every case, (n,)."""
    model.eval()
    out = []
    table = model.item_table()
    for sl in batches(len(cases), batch):
        out.append(_propensity(model, cases, sl, device, table, calibrated=True).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _propensity(
    model: BehaviourModel,
    cases: Cases,
    rows: slice | np.ndarray,
    device: torch.device,
    table: torch.Tensor | None = None,
    *,
    calibrated: bool,
) -> torch.Tensor:
    w = used_width(cases.items[rows])
    items, kinds, gaps, feats = token_tensors(model, cases, rows, w, device)
    context = None
    h = kinds.new_zeros(())  # the branch does not read the hidden state
    if model.prop is not None:
        assert cases.context is not None
        context = as_tensor(cases.context[rows], device)
    else:
        h = model(items, kinds, gaps, feats, table)[:, -1]
    return model.propensity(h, kinds, gaps, context, calibrated=calibrated)


@torch.no_grad()
def predict(
    model: BehaviourModel, cases: Cases, device: torch.device, exclude: bool, batch: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-case target rank, next-item log-likelihood, and propensity."""
    model.eval()
    ranks, loglik, prop = [], [], []
    table = model.item_table()
    for sl in batches(len(cases), batch):
        _, logits, ranking = last_position(model, cases, sl, device, table)
        targets = as_tensor(cases.targets[sl], device)
        logp = torch.log_softmax(logits[:, 2:], dim=1)  # over real items only
        tl = logp.gather(1, (targets - 2).clamp(min=0)[:, None])[:, 0]
        loglik.append(torch.where(targets >= 2, tl, torch.full_like(tl, float("nan"))).cpu().numpy())
        prop.append(_propensity(model, cases, sl, device, table, calibrated=True).cpu().numpy())
        hist = cases.history[sl] if exclude else None
        ranks.append(ranks_from_scores(ranking.float().cpu(), targets.cpu(), hist).numpy())
    return np.concatenate(ranks), np.concatenate(loglik), np.concatenate(prop)


def length_buckets(lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Batches of windows of similar length (so padding can be cut), in random order."""
    order = np.argsort(lengths + np.random.rand(len(lengths)) * 3, kind="stable")
    out = [order[i : i + size] for i in range(0, len(order), size)]
    random.shuffle(out)
    return out


def train(
    split: Split, preset: str, out_dir: Path, overrides: dict[str, Any] | None = None, progress: bool = True
) -> tuple[BehaviourModel, list[dict[str, Any]]]:
    p = PRESETS[preset]
    overrides = overrides or {}
    tcfg = replace(
        TrainConfig(),
        **{**p.train, **{k: v for k, v in overrides.items() if k in TrainConfig.__annotations__}},
    )
    with_feats = tcfg.features and split.item_feats is not None and split.train.feats is not None
    event_log = split.train_cases is not None and split.train_cases.context is not None
    mcfg = ModelConfig(
        n_items=len(split.vocab),
        n_gaps=N_GAPS,
        n_feats=FEATURE_BUCKETS if with_feats else 0,
        feat_width=MAX_FEATURES,
        n_context=N_CONTEXT if event_log else 0,
        **{**p.model, **{k: v for k, v in overrides.items() if k in ModelConfig.__annotations__}},
    )
    if split.train.items.shape[1] != mcfg.max_len:
        raise ValueError(f"split built with max_len {split.train.items.shape[1]}, model wants {mcfg.max_len}")
    seed_everything(tcfg.seed)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = pick_device(tcfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(
        json.dumps(
            {"preset": preset, "data": split.name, "model": mcfg.to_dict(), "train": asdict(tcfg)}, indent=2
        )
    )
    split.vocab.save(out_dir / "vocab.json")
    model = BehaviourModel(mcfg).to(device)
    if with_feats:
        assert split.item_feats is not None
        model.item_feats.copy_(torch.from_numpy(split.item_feats).long())
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.98))
    tr = split.train
    lengths = (tr.items != PAD).sum(axis=1)
    history: list[dict[str, Any]] = []
    best, best_epoch, started = -1.0, -1, time.time()
    metrics_file = (out_dir / "metrics.jsonl").open("w")
    for epoch in range(1, tcfg.epochs + 1):
        model.train()
        total, count = 0.0, 0
        bar = tqdm(
            length_buckets(lengths, tcfg.batch_size), desc=f"epoch {epoch}", disable=not progress, leave=False
        )
        for idx in bar:
            w = used_width(tr.items[idx])
            items, kinds, gaps, feats = token_tensors(model, tr, idx, w, device)
            targets = as_tensor(tr.targets[idx, -w:], device)
            table = model.item_table()
            h = model(items, kinds, gaps, feats, table)  # (b, L, d)
            valid = (targets != PAD) & (items != PAD)
            hv = h[valid]  # (positions, d)
            rows, at = valid.nonzero(as_tuple=True)
            scores = model.next_item_scores(hv, items[rows], kinds[rows], at, table)
            # an unknown next item cannot be recommended: it does not teach the item head
            known = targets[valid] != UNK
            # every term is skipped when its selection is empty (cross-entropy of nothing is NaN):
            # a length-bucketed batch of one-token windows has no next kind, for example
            loss = scores.new_zeros(())
            if bool(known.any()):
                loss = F.cross_entropy(
                    scores[known], targets[valid][known], label_smoothing=tcfg.label_smoothing
                )
            inside = at < w - 1  # the next token's kind is known inside the window only
            if tcfg.kind_weight and bool(inside.any()):
                next_kinds = torch.roll(kinds, -1, dims=1)[valid][inside]
                loss = loss + tcfg.kind_weight * F.cross_entropy(model.kind_head(hv[inside]), next_kinds)
            if not loss.requires_grad:
                continue  # nothing to learn from this batch
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4f}")
        ranks, loglik, _ = predict(model, split.valid, device, tcfg.eval_exclude_history)
        val = ranking_metrics(ranks)
        row = {
            "epoch": epoch,
            "train_loss": total / max(count, 1),
            "valid_NDCG@10": val["NDCG@10"],
            "valid_HR@10": val["HR@10"],
            "valid_ppl": float(np.exp(-np.nanmean(loglik))),
            "seconds": round(time.time() - started, 1),
        }
        history.append(row)
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if progress:
            print(
                f"epoch {epoch:3d} loss {row['train_loss']:.4f} valid NDCG@10 {val['NDCG@10']:.4f} "
                f"HR@10 {val['HR@10']:.4f} ({row['seconds']}s)",
                flush=True,
            )
        if val["NDCG@10"] > best:
            best, best_epoch = val["NDCG@10"], epoch
            torch.save(model.state_dict(), out_dir / "model.pt")
        elif epoch - best_epoch >= tcfg.patience:
            break
        if time.time() - started > tcfg.max_minutes * 60:
            break
    metrics_file.close()
    model.load_state_dict(torch.load(out_dir / "model.pt", weights_only=True, map_location=device))
    if event_log:
        from modeling.heads import fit_propensity, fit_repeat, write_calibration

        calibration: dict[str, Any] = {}
        if tcfg.refit_repeat and mcfg.repeat:
            calibration["next_item"] = fit_repeat(model, split.valid, device, progress, tcfg.repeat_epochs)
        calibration["propensity"] = fit_propensity(model, split, device, tcfg, progress)
        assert split.train_cases is not None
        calibration["propensity"]["calibration"] = calibrate_propensity(
            model, split.valid, device, prior=labelled_rate(split.train_cases, split.valid)
        )
        write_calibration(model, split, device, calibration, out_dir)
        torch.save(model.state_dict(), out_dir / "model.pt")
    plot_learning_curve(history, out_dir / "learning_curve.png")
    return model, history


@torch.no_grad()
def calibrate_propensity(
    model: BehaviourModel, cases: Cases, device: torch.device, prior: float | None = None
) -> dict[str, Any]:
    """Platt scaling: fit sigmoid(a * logit + b) to the validation labels, store (a, b) in the model.

    ``prior``: the purchase rate the calibrated scores should average to on ``cases``, where it is
    better known than from one validation day (the rate of every labelled case before the test
    period): b is shifted until the mean calibrated validation score equals it. The slope, and so
    every ranking and quantile threshold, is unchanged. One day's rate moves with the weekday
    (Taobao: 16.4 % over the training days, 11.7 % on the validation Saturday)."""
    from sklearn.linear_model import LogisticRegression

    model.eval()
    table = model.item_table()
    logits = [
        _propensity(model, cases, sl, device, table, calibrated=False).cpu().numpy()
        for sl in batches(len(cases), 1024)
    ]
    x, y = np.concatenate(logits), cases.bought
    x, y = x[y >= 0], y[y >= 0]
    if len(np.unique(y)) < 2:
        return {"note": "no validation labels of both kinds: not calibrated"}
    lr = LogisticRegression(C=1e4).fit(x[:, None], y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    out: dict[str, Any] = {"platt": [a, b], "valid_rate": float(y.mean())}
    if prior is not None and 0.0 < prior < 1.0:
        shift = prior_shift(a * x + b, prior)
        out.update(prior=prior, shift=shift)
        b += shift
    model.prop_calib.copy_(torch.tensor([a, b]))
    return out


def prior_shift(z: np.ndarray, rate: float) -> float:
    """The shift d with mean(sigmoid(z + d)) == rate (bisection: the mean rises with d)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(np.mean(1.0 / (1.0 + np.exp(-(z + mid))))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def labelled_rate(*cases: Cases) -> float | None:
    """The purchase rate of the labelled (uncensored) cases of all ``cases`` together."""
    y = np.concatenate([c.bought[c.bought >= 0] for c in cases])
    return float(y.mean()) if len(y) else None


def plot_learning_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(7, 4))
    ep = [h["epoch"] for h in history]
    ax1.plot(ep, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(ep, [h["valid_NDCG@10"] for h in history], color="tab:orange", label="valid NDCG@10")
    ax2.set_ylabel("valid NDCG@10", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_model(run_dir: Path, device: str = "cpu") -> BehaviourModel:
    cfg = json.loads((run_dir / "config.json").read_text())
    model = BehaviourModel(ModelConfig(**cfg["model"]))
    state = torch.load(run_dir / "model.pt", weights_only=True, map_location=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # runs saved before calibration and the repeat bonus existed keep their neutral initial values
    older = {
        "prop_calib",
        "repeat_dist.weight",
        "repeat_kind.weight",
        "item_feats",
        "logit_scale",
        "repeat_rank",
    }
    if unexpected or set(missing) - older:
        raise RuntimeError(
            f"{run_dir / 'model.pt'} does not match its config: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()
