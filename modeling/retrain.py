"""``shopstream retrain``: train a challenger, compare it with the served model, publish if not worse.

In: a data spec (anything ``modeling.cli.build_split`` reads: ``rees46-demo``, ``taobao-users``,
``archive:DIR``, ...) and the model folder the workers serve (``SHOPSTREAM_MODEL_DIR``). Out, in that
folder: a new version when the challenger wins, and one line per retrain in ``registry.jsonl``
(time, versions, data and split bounds, both models' metrics, decision, reason) whatever the
decision. The run and the exported challenger stay under ``.runs/<time>/`` (the last ``RUNS_KEPT``).

1. Train the challenger (``modeling.train.train``), export it (``exporters.onnx_export.export``) to
   ``.runs/<time>/artifact``; it must load in the worker's own loader (``streams.scoring``).
2. Score challenger and champion (the published artifact) with one function, ``score_model``,
   through onnxruntime on the same held-out cases: the challenger's test split, the most recent
   period. The cases keep every raw item id (``HeldOut``) and each model encodes them with its own
   vocabulary: an item a model does not know is UNK to it, a target it does not know a miss.
   NDCG@10 / HR@10 of the graph's top-K without exclusion and under serving's exclusions (excluded
   ids dropped from the top-K before the cut at 10), propensity ROC-AUC on labelled cases.
3. Publish when the chosen metric of the challenger is not below the champion's by more than the
   margin (absolute). No champion: publish. A champion that does not load: stop with the reason,
   or with ``replace_broken`` decide on the challenger alone.
4. Publish atomically (``publish``): the graph, vocabulary and a copy of the manifest under
   version-named files, each written to a temporary name, fsynced and renamed; then
   ``manifest.json`` the same way and the folder fsynced. A worker polling the folder sees the old
   manifest with its files or the new one with its files, never a mix. The files of the two
   previous published versions stay for rollback; older ones are deleted.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from exporters.publish import (
    KEEP_VERSIONS,
    REGISTRY,
    append_registry,
    folder_lock,
    prune,
    publish,
    registry_entries,
)
from modeling.cli import build_split, price_reference
from modeling.metrics import batches, ranking_metrics
from modeling.model import PAD, UNK
from modeling.propensity import roc_auc
from modeling.sequences import Cases, Split, Vocab
from modeling.train import used_width
from streams.errors import ShopstreamError
from streams.scoring import OUTPUTS, Artifact, ModelError, load_artifact, read_manifest, sha256
from streams.state import MAX_FEATURES

DEFAULT_MARGIN = 0.001  # absolute: a challenger may be this much below the champion and still publish
METRICS = ("auto", "NDCG@10", "HR@10", "serving-NDCG@10", "serving-HR@10", "ROC-AUC")
RUNS_KEPT = 3  # run folders under .runs (the challenger's model.pt, logs and staged artifact)


class RetrainError(ShopstreamError):
    """A retrain that cannot decide: no data, a broken champion, a folder changed underneath."""


# --- held-out cases with raw item ids ------------------------------------------------------------


@dataclass
class HeldOut:
    """The challenger's test cases encoded with ``names``, a vocabulary of every item of the data,
    so each model can re-encode them with its own. ``rebuild`` makes the same cases with another
    window length (a model with another ``max_len`` reads the window serving would give it)."""

    names: Vocab
    serving: bool  # an event log: serving's exclusions apply (as modeling.evaluate reports them)
    by_len: dict[int, Cases] = field(default_factory=dict)
    rebuild: Callable[[int], Cases] | None = None

    def at(self, max_len: int) -> Cases:
        if max_len not in self.by_len:
            if self.rebuild is None:
                raise RetrainError(f"no held-out cases of window length {max_len}")
            self.by_len[max_len] = self.rebuild(max_len)
        return self.by_len[max_len]


def held_out_split(spec: str, datasets_dir: Path, max_len: int) -> tuple[Split, HeldOut]:
    """The challenger's split and its test cases with raw item ids.

    A ``Split`` holds vocabulary ids only: an item outside the challenger's vocabulary is UNK and
    its id is gone, though the champion may know it. The split's ``test_with`` makes the same test
    cases with a vocabulary of every item of the data (``all_items``), and the result is checked
    against ``split.test``."""
    split = _build(spec, datasets_dir, max_len)
    if split.test_with is None or split.all_items is None:
        raise RetrainError(f"data {spec}: its split cannot rebuild its test cases with raw item ids")
    names = split.all_items()
    test_with = split.test_with
    serving = split.train_cases is not None and len(split.test.serving_exclude) == len(split.test)
    held = HeldOut(names, serving, rebuild=lambda length: test_with(names, length))
    raw = held.at(split.test.items.shape[1])
    to_challenger = remap(names, split.vocab.index)
    if not (
        np.array_equal(to_challenger[raw.targets], split.test.targets)
        and np.array_equal(to_challenger[raw.items], split.test.items)
    ):
        raise RetrainError(f"data {spec}: the held-out cases could not be rebuilt with raw item ids")
    return split, held


def _build(spec: str, datasets_dir: Path, max_len: int) -> Split:
    try:
        return build_split(spec, datasets_dir, max_len)
    except ValueError as exc:  # build_split's "unknown data spec", split_bounds' "no events to split"
        raise RetrainError(f"data {spec}: {exc}") from None


def windowed(spec: str, window_days: float | None, default_tz: str = "UTC", now: float | None = None) -> str:
    """The spec to read. An archive's in canonical form, its split zone ``default_tz`` unless it
    names one (as ``shopstream train`` fills in SHOPSTREAM_DEFAULT_TIMEZONE), the window as its
    ``since`` bound; the window applies to archives only (a public data set is split as ``shopstream
    train`` splits it). The window ends at ``now``, by default the newest archived event (an
    archive of last year's data, or one whose archiver has stopped, still has a window)."""
    if not spec.startswith("archive:"):
        if window_days is not None:
            raise RetrainError(
                f"--window-days applies to archive:DIR data only; {spec} is split as "
                "`shopstream train` splits it"
            )
        return spec
    if window_days is not None and window_days <= 0:
        raise RetrainError(f"--window-days {window_days:g}: a number of days above 0")
    from streams.archive_read import ArchiveSpec, newest_event_ms

    parsed = ArchiveSpec.parse(spec, default_tz)
    since = None
    if window_days is not None:
        if now is None:
            newest = newest_event_ms(parsed.root)
            if newest is None:
                raise RetrainError(f"{parsed.root}: no archived events")
            now = newest / 1000
        since = datetime.fromtimestamp(now - window_days * 86400, UTC).isoformat()
    return str(parsed.with_options(since, None, None))


def remap(names: Vocab, index: Mapping[str, int]) -> np.ndarray:
    """``names`` ids -> a model's ids: PAD stays PAD, an item the model does not know becomes UNK."""
    out = np.full(len(names), UNK, dtype=np.int64)
    out[PAD] = PAD
    out[2:] = [index.get(item, UNK) for item in names.items]
    return out


# --- one scoring function for both models ----------------------------------------------------------


def topk_ranks(
    top_items: np.ndarray,
    top_scores: np.ndarray,
    targets: np.ndarray,
    exclude: Sequence[Sequence[int] | np.ndarray] | None = None,
) -> np.ndarray:
    """0-based rank of each target within its row's returned top-K (ties count as half, as in
    ``modeling.metrics.ranks_from_scores``); ``inf`` when it is not there, is UNK or is excluded.
    ``exclude``: per row, ids dropped from the top-K first (what serving would not show)."""
    scores = top_scores.astype(np.float64)
    if exclude is not None:
        for r, ids in enumerate(exclude):
            if len(ids):
                scores[r, np.isin(top_items[r], ids)] = -np.inf
    hit = (top_items == targets[:, None]) & np.isfinite(scores)
    found = hit.any(axis=1) & (targets > UNK)
    target_score = np.where(found, scores[np.arange(len(targets)), hit.argmax(axis=1)], np.nan)
    above = (scores > target_score[:, None]).sum(axis=1)
    ties = (scores == target_score[:, None]).sum(axis=1) - 1
    return np.where(found, above + 0.5 * np.maximum(ties, 0), np.inf)


def case_metrics(
    top_items: np.ndarray,
    top_scores: np.ndarray,
    propensity: np.ndarray,
    targets: np.ndarray,
    bought: np.ndarray,
    exclude: Sequence[Sequence[int] | np.ndarray] | None = None,
) -> dict[str, float | None]:
    """NDCG@10 and HR@10 (and under ``exclude``: ``serving-``), ROC-AUC on labelled cases (None
    without labels of both kinds), cases and the share of targets the model knows."""
    plain = ranking_metrics(topk_ranks(top_items, top_scores, targets))
    out: dict[str, float | None] = {"NDCG@10": plain["NDCG@10"], "HR@10": plain["HR@10"]}
    if exclude is not None:
        served = ranking_metrics(topk_ranks(top_items, top_scores, targets, exclude))
        out.update({"serving-NDCG@10": served["NDCG@10"], "serving-HR@10": served["HR@10"]})
    labelled = bought >= 0
    auc = roc_auc(bought[labelled], propensity[labelled]) if labelled.any() else float("nan")
    out["ROC-AUC"] = None if np.isnan(auc) else auc
    out["cases"] = float(len(targets))
    out["known_targets"] = float((targets > UNK).mean()) if len(targets) else 0.0
    return out


def score_model(art: Artifact, held: HeldOut, batch: int = 256) -> dict[str, float | None]:
    """``case_metrics`` of a loaded artifact on the held-out cases, fed the inputs its graph asks
    for as the exporter's parity check feeds them (items in its own vocabulary)."""
    cases = held.at(art.max_len)
    to_model = remap(held.names, art.index)
    inputs = [i.name for i in art.session.get_inputs()]
    tops, scores, props = [], [], []
    for sl in batches(len(cases), batch):
        w = used_width(cases.items[sl])  # cut the all-padding columns
        feeds = {
            "items": to_model[cases.items[sl, -w:]],
            "kinds": np.ascontiguousarray(cases.kinds[sl, -w:]),
            "gaps": np.ascontiguousarray(cases.gaps[sl, -w:]),
        }
        if "feats" in inputs:  # data without features: empty ones, as serving pads a bare token
            feats = cases.feats
            n = sl.stop - sl.start
            feeds["feats"] = (
                np.zeros((n, w, MAX_FEATURES), dtype=np.int64)
                if feats is None
                else np.ascontiguousarray(feats[sl, -w:], dtype=np.int64)
            )
        if "context" in inputs:
            assert cases.context is not None  # _cases always computes it
            feeds["context"] = np.ascontiguousarray(cases.context[sl], dtype=np.float32)
        top_items, top_scores, propensity = art.session.run(list(OUTPUTS), feeds)
        tops.append(top_items)
        scores.append(top_scores)
        props.append(propensity)
    exclude = (
        [to_model[np.asarray(e, dtype=np.int64)] for e in cases.serving_exclude] if held.serving else None
    )
    return case_metrics(
        np.concatenate(tops),
        np.concatenate(scores),
        np.concatenate(props),
        to_model[cases.targets],
        cases.bought,
        exclude,
    )


# --- decision --------------------------------------------------------------------------------------


def resolve_metric(metric: str, serving: bool) -> str:
    if metric not in METRICS:
        raise RetrainError(f"--metric {metric!r}: one of {', '.join(METRICS)}")
    if metric == "auto":
        return "serving-NDCG@10" if serving else "NDCG@10"
    if metric.startswith("serving-") and not serving:
        raise RetrainError(f"--metric {metric}: serving's exclusions apply to event logs only")
    return metric


def decide(
    metric: str, challenger: Mapping[str, float | None], champion: Mapping[str, float | None], margin: float
) -> tuple[bool, str]:
    """Publish when the challenger's ``metric`` is not below the champion's by more than ``margin``."""
    c, p = challenger.get(metric), champion.get(metric)
    if c is None or p is None:
        raise RetrainError(f"{metric} is undefined on these held-out cases (no labels of both kinds?)")
    gap = c - p
    said = f"{metric} {c:.4f} against the champion's {p:.4f}"
    if gap >= -margin:
        how = f"better by {gap:.4f}" if gap > 0 else f"within the margin {margin:g}"
        return True, f"{said}: {how}"
    return False, f"{said}: worse by {-gap:.4f}, more than the margin {margin:g}"


# --- the command -----------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _manifest_sha(model_dir: Path) -> str | None:
    path = model_dir / "manifest.json"
    return sha256(path) if path.exists() else None


def _scored(art: Artifact, held: HeldOut, role: str) -> dict[str, float | None]:
    try:
        return score_model(art, held)
    except Exception as exc:  # onnxruntime raises its own types
        raise RetrainError(
            f"the {role} ({art.version}) fails on the held-out cases: {exc!r}"[:1000]
        ) from None


def _champion(model_dir: Path, replace_broken: bool) -> tuple[Artifact | None, dict[str, Any] | None]:
    if not (model_dir / "manifest.json").exists():
        return None, None
    try:
        art = load_artifact(model_dir, provider="cpu")
    except ModelError as exc:
        if not replace_broken:
            raise RetrainError(
                f"the published model in {model_dir} does not load: {exc}. Nothing trained; pass "
                "--replace-broken to publish the challenger on its own merits"
            ) from None
        with contextlib.suppress(ModelError, KeyError):
            return None, {"version": read_manifest(model_dir)["model_version"], "error": str(exc)}
        return None, {"version": None, "error": str(exc)}
    return art, {"version": art.version}


def retrain(
    spec: str,
    model_dir: Path,
    datasets_dir: Path,
    *,
    preset: str = "events",
    overrides: dict[str, Any] | None = None,
    metric: str = "auto",
    margin: float = DEFAULT_MARGIN,
    window_days: float | None = None,
    default_tz: str = "UTC",
    top_k: int = 100,
    catalogue: str = "fp32",
    candidates: int | None = None,
    replace_broken: bool = False,
    evaluate_run: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, compare, publish or refuse; returns the registry entry (also appended to the file).
    ``catalogue``, ``candidates``: the challenger's catalogue step (``exporters.onnx_export.export``);
    it is scored as exported, so an int8 challenger is compared with the champion as it would serve."""
    from exporters.onnx_export import ExportError, check_catalogue, export
    from modeling.evaluate import evaluate
    from modeling.train import PRESETS, train

    if preset not in PRESETS:
        raise RetrainError(f"--preset {preset!r}: one of {', '.join(PRESETS)}")
    if margin < 0:
        raise RetrainError(f"--margin {margin}: an absolute difference, 0 or more")
    try:  # refused before training, not after it
        check_catalogue(catalogue, candidates)
    except ExportError as exc:
        raise RetrainError(str(exc)) from None
    overrides = overrides or {}
    read = windowed(spec, window_days, default_tz)
    model_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(model_dir):
        at_start = _manifest_sha(model_dir)  # publish only over the manifest the decision compared with
        champion, champion_doc = _champion(model_dir, replace_broken)
        broken = " (does not load: --replace-broken)" if champion_doc and not champion else ""
        say(f"champion: {champion_doc['version'] if champion_doc else 'none'}{broken} in {model_dir}")
        max_len = int(overrides.get("max_len", PRESETS[preset].model.get("max_len", 50)))
        split, held = held_out_split(read, datasets_dir, max_len)
        if not len(split.train) or not len(split.test):
            raise RetrainError(
                f"data {spec}: {len(split.train)} training windows and {len(split.test)} held-out cases "
                "(no data in the window?)"
            )
        metric = resolve_metric(metric, held.serving)
        run_dir = model_dir / ".runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        say(f"training a challenger on {spec} ({len(split.train)} windows, preset {preset}) in {run_dir}")
        model, history = train(split, preset, run_dir, overrides, progress=False)
        if evaluate_run:
            evaluate(model, split, run_dir)  # eval.json: the manifest's metrics
        staging = run_dir / "artifact"
        export(
            run_dir,
            staging,
            split.test,
            k=top_k,
            prices=price_reference(read, datasets_dir, split),
            catalogue=catalogue,
            candidates=candidates,
        )
        try:
            challenger = load_artifact(staging, provider="cpu")
        except ModelError as exc:
            raise RetrainError(f"the challenger does not load in the worker's loader: {exc}") from None
        scores = {"challenger": _scored(challenger, held, "challenger")}
        if champion is not None:
            scores["champion"] = _scored(champion, held, "champion")
            publishing, reason = decide(metric, scores["challenger"], scores["champion"], margin)
        elif champion_doc is not None:
            publishing, reason = (
                True,
                "the published model does not load; --replace-broken: the challenger alone",
            )
        else:
            publishing, reason = True, "no published model yet"
        if publishing:
            if _manifest_sha(model_dir) != at_start:
                raise RetrainError(
                    f"{model_dir / 'manifest.json'} changed during the retrain: nothing published"
                )
            publish(staging, model_dir)
        entry: dict[str, Any] = {
            "time": _iso(time.time()),
            "decision": "published" if publishing else "refused",
            "reason": reason,
            "metric": metric,
            "margin": margin,
            "challenger": {
                "version": challenger.version,
                "metrics": scores["challenger"],
                "run": str(run_dir),
                "best_epoch": max(history, key=lambda h: h["valid_NDCG@10"])["epoch"],
            },
            "champion": {**champion_doc, "metrics": scores.get("champion")} if champion_doc else None,
            "data": {
                "spec": spec,
                "read": read,
                "window_days": window_days,
                "split": {k: _iso(v) for k, v in split.bounds.items()},
                "held_out_cases": len(split.test),
            },
        }
        append_registry(model_dir, entry)
        (run_dir / "retrain.json").write_text(json.dumps(entry, indent=2))
        if publishing:
            published = [
                e["challenger"]["version"]
                for e in registry_entries(model_dir)
                if e["decision"] == "published"
            ]
            prune(model_dir, set(published[-KEEP_VERSIONS:]))
        for old in sorted(p for p in (model_dir / ".runs").iterdir() if p.is_dir())[:-RUNS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        return entry


def summary(entry: Mapping[str, Any], model_dir: Path) -> str:
    """What ``shopstream retrain`` prints: both models' metrics, the decision and its reason."""
    cols = ("NDCG@10", "HR@10", "serving-NDCG@10", "serving-HR@10", "ROC-AUC", "known_targets")
    data, split = entry["data"], entry["data"]["split"]
    period = f", test period {split['test_start']} .. {split['test_end']}" if split else ""
    lines = [
        f"held out: {data['read']}{period}, {data['held_out_cases']} cases",
        f"{'':11s}" + "".join(f"{c:>16s}" for c in cols) + "  version",
    ]
    for role in ("challenger", "champion"):
        doc = entry[role] or {"version": "none"}
        if doc.get("metrics") is None:
            broken = f" (does not load: {doc['error'][:300]})" if "error" in doc else ""
            lines.append(f"{role:11s}" + "".join(f"{'-':>16s}" for c in cols) + f"  {doc['version']}{broken}")
            continue
        m = doc["metrics"]
        cells = "".join(f"{m[c]:16.4f}" if m.get(c) is not None else f"{'-':>16s}" for c in cols)
        lines.append(f"{role:11s}{cells}  {doc['version']}")
    lines.append(f"decision: {entry['decision']}: {entry['reason']}")
    if entry["decision"] == "published":
        lines.append(f"published to {model_dir}: workers polling it load it without a restart")
    else:
        lines.append(f"{model_dir} unchanged; the challenger stays in {entry['challenger']['run']}")
    lines.append(f"registry: {model_dir / REGISTRY}")
    return "\n".join(lines)


def run_retrain(spec: str, model_dir: Path, datasets_dir: Path, **options: Any) -> int:
    entry = retrain(spec, model_dir, datasets_dir, **options)
    print(summary(entry, model_dir))
    return 0
