"""``shopstream train | evaluate | export``: the learning side of the command line.

``streams.cli`` parses the arguments and calls these functions only when one of those commands
runs, so the serving install never needs torch.

Data specs (``--data``):
- ``seqrec:NAME``: the S3-Rec benchmark file ``seqrec/s3rec/NAME.txt`` (leave-one-out);
- ``sasrec:Video``, ``bert4rec:beauty``: the ``user item`` files of SASRec and BERT4Rec (leave-one-out);
- a path to a ``user item item ...`` file (leave-one-out);
- ``taobao-users``: Taobao UserBehavior, 814 complete users, time split in Beijing time: train
  before 2017-12-02, validation 12-02, test 12-03; purchase propensity over 6 hours.
- any other event data set of ``shopstream replay`` (``taobao`` time slice, ``rees46``, ``rees46-demo``
  (the sample shipped for the demo), ``instacart``, ...): time split at the 70 % and 85 % quantiles
  of event time; purchase propensity over 30 minutes. Some of these logs cover hours, not days:
  the split exists so the model is chosen on held-out events.
- ``archive:DIR[?since=ISO&until=ISO&tz=ZONE]``: an event archive (``shopstream archive``, any
  fsspec URL), read deduped with erasures applied (``streams.archive_read``). Time split by calendar
  days in ``tz``: the last day tests, the day before validates, the rest trains, propensity over
  6 hours (as ``taobao-users``); an archive covering fewer than three days splits at the quantiles
  of the other event logs, with their 30-minute horizon.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeling.sequences import (
    Split,
    leave_one_out,
    read_pairs,
    read_seqrec,
    sequences_from_events,
    time_split,
)
from streams.sources.datasets import DATASETS, load
from streams.splits import split_bounds

if TYPE_CHECKING:
    from streams.price_response import PriceReference

# Purchase propensity horizon. The test period is one day, so a 24 h horizon would never be fully
# observed there; 6 h leaves the first 18 hours of each day with known labels (the rest is censored).
HORIZON_S = 6 * 3600.0


def build_split(spec: str, datasets_dir: Path, max_len: int) -> Split:
    if spec.startswith("seqrec:"):
        name = spec.split(":", 1)[1]
        s3rec = datasets_dir / "seqrec" / "s3rec"
        attrs = s3rec / f"{name}_item2attributes.json"
        seqs = read_seqrec(s3rec / f"{name}.txt", attrs if attrs.is_file() else None)
        return leave_one_out(seqs, max_len, spec)
    if spec.startswith(("sasrec:", "bert4rec:")):
        folder, name = spec.split(":", 1)
        return leave_one_out(read_pairs(datasets_dir / "seqrec" / folder / f"{name}.txt"), max_len, spec)
    if spec.startswith("archive:"):
        return archive_split(spec, max_len)
    if spec == "taobao-users":
        seqs = sequences_from_events(load("taobao-users", datasets_dir))
        return time_split(seqs, *split_bounds(spec, []), max_len, HORIZON_S, spec)
    if spec in DATASETS or spec == "rees46-demo":
        seqs = sequences_from_events(load(spec, datasets_dir))
        bounds = split_bounds(spec, [t for s in seqs for t in s.times])
        return time_split(seqs, *bounds, max_len, 1800.0, spec)
    path = Path(spec)
    if path.is_file():
        return leave_one_out(read_seqrec(path), max_len, path.stem)
    raise ValueError(
        f"unknown data spec {spec!r}: use seqrec:NAME, taobao-users, rees46[-demo], archive:DIR or a "
        "file path"
    )


def archive_split(spec: str, max_len: int) -> Split:
    """An archive split like the public event logs: ``taobao-users``'s day split and horizon when it
    covers at least three calendar days (with ``tz=Asia/Shanghai``, an archive of ``taobao-users``
    splits exactly as ``--data taobao-users``), else the quantile split of the others. Without
    ``tz`` in the spec, UTC (``shopstream train`` fills in SHOPSTREAM_DEFAULT_TIMEZONE)."""
    from streams.archive_read import ArchiveSpec, calendar_day_bounds, read_events  # pyarrow

    archive = ArchiveSpec.parse(spec)
    seqs = sequences_from_events(read_events(archive.root, archive.since, archive.until))
    times = [t for s in seqs for t in s.times]
    days = calendar_day_bounds(times, archive.tz)
    if days is not None:
        return time_split(seqs, *days, max_len, HORIZON_S, str(archive))
    return time_split(seqs, *split_bounds(str(archive), times), max_len, 1800.0, str(archive))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def run_train(
    spec: str,
    preset: str,
    out: Path,
    overrides: dict[str, Any],
    datasets_dir: Path,
    evaluate_after: bool = True,
) -> Path:
    from modeling.evaluate import evaluate
    from modeling.train import PRESETS, train

    max_len = int(overrides.get("max_len", PRESETS[preset].model.get("max_len", 50)))
    split = build_split(spec, datasets_dir, max_len)
    print(
        f"data {spec}: {len(split.vocab) - 2} items, {len(split.train)} training windows, "
        f"{len(split.valid)} validation and {len(split.test)} test cases"
    )
    model, history = train(split, preset, out, overrides)
    best = max(history, key=lambda h: h["valid_NDCG@10"])
    print(f"best epoch {best['epoch']}: valid NDCG@10 {best['valid_NDCG@10']:.4f}; run in {out}")
    if evaluate_after:
        print_results(evaluate(model, split, out))
    return out


def run_evaluate(run_dir: Path, datasets_dir: Path) -> None:
    from modeling.evaluate import evaluate
    from modeling.train import load_model

    cfg = json.loads((run_dir / "config.json").read_text())
    split = build_split(cfg["data"], datasets_dir, cfg["model"]["max_len"])
    print_results(evaluate(load_model(run_dir), split, run_dir))


def run_export(
    run_dir: Path,
    out: Path,
    datasets_dir: Path,
    k: int,
    catalogue: str = "fp32",
    candidates: int | None = None,
) -> None:
    from exporters.onnx_export import export

    cfg = json.loads((run_dir / "config.json").read_text())
    split = build_split(cfg["data"], datasets_dir, cfg["model"]["max_len"])
    manifest = export(
        run_dir,
        out,
        split.test,
        k=k,
        prices=price_reference(cfg["data"], datasets_dir, split),
        catalogue=catalogue,
        candidates=candidates,
    )
    prices = manifest.get("price_reference")
    product = manifest["catalogue"]
    print(
        f"exported {manifest['model_version']} to {out} (parity max abs diff "
        f"{manifest['parity_max_abs_diff']['top_scores']:.2e}; price reference: "
        + (f"{prices['categories']} categories" if prices else "none, the data has no prices")
        + (
            f"; int8 catalogue, {product['candidates']} candidates: {product['top10_kept']:.2%} of the exact "
            f"top 10 and {product['topk_kept']:.2%} of the top {k} kept on the test cases)"
            if product["product"] == "int8"
            else ")"
        )
    )


def price_reference(spec: str, datasets_dir: Path, split: Split) -> PriceReference | None:
    """The price reference of an event-log spec's training period (``streams.price_response``);
    None for benchmark files (no prices) and logs without priced categories."""
    from streams.price_response import from_log

    if "valid_start" not in split.bounds:
        return None
    if spec.startswith("archive:"):
        from streams.archive_read import ArchiveSpec, read_events  # pyarrow

        archive = ArchiveSpec.parse(spec)
        return from_log(
            spec, read_events(archive.root, archive.since, archive.until), split.bounds["valid_start"]
        )
    if spec in DATASETS or spec == "rees46-demo":
        return from_log(spec, load(spec, datasets_dir), split.bounds["valid_start"])
    return None


def print_results(results: dict[str, Any]) -> None:
    print(
        f"test ({results['data']}, {results['test_cases']} cases, full ranking, "
        f"{results['headline'].replace('_', ' ')}):"
    )
    for name, e in results["models"].items():
        m, ci = e[results["headline"]], e["NDCG@10_ci95"]
        serving = e.get("serving_excluded")
        print(
            f"  {name:13s} NDCG@10 {m['NDCG@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  HR@10 {m['HR@10']:.4f}"
            f"  MRR {m['MRR']:.4f}"
            + (f"  (serving's exclusions: NDCG@10 {serving['NDCG@10']:.4f})" if serving else "")
        )
    for key, title in (("propensity", "purchase within the horizon"), ("daily", "buys during the test day")):
        prop = results.get(key)
        if not prop or "note" in prop:
            continue
        print(f"{title} (ROC-AUC [users resampled], ECE):")
        for name in ("model", "logistic regression", "gradient-boosted trees"):
            m, ci = prop[name], prop[name]["ROC-AUC_ci95"]
            print(f"  {name:23s} {m['ROC-AUC']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  ECE {m['ECE']:.4f}")
