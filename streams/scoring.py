"""The behaviour model on the hot path: an exported artifact scored with onnxruntime (no torch).

In: a model folder written by ``shopstream export`` (``manifest.json``, ``model.onnx``,
``vocab.json``) and users' token sequences (``UserState.seq``). Out: per user, the graph's top-K
items (ids decoded to shop item ids) with scores, and the calibrated purchase propensity; per
model, the propensity thresholds its exporter chose (``Artifact.thresholds``, when the manifest
has them) and the price reference the policy's price sensitivity reads (``Artifact.prices``,
``streams.price_response``, when it has one).

Graph inputs: ``items``, ``kinds``, ``gaps`` (batch x length), optionally ``feats`` (hashed
features per token) and ``context`` (batch x ``N_CONTEXT`` float32: ``streams.features`` of the
window the graph reads, the same function training used).

Lifecycle: ``load_artifact`` verifies the manifest (format, sha256 of graph and vocabulary, token
id conventions) and refuses anything else with a ``ModelError`` that says what is wrong; the
session is warmed up and then run on a probe batch shaped like real users' sequences (lengths up
to and past ``max_len``, unknown items, features, all token kinds) before it is used.
``ModelWatcher`` polls the folder and, when the manifest changes, loads, warms and probes the new
version off the event loop and swaps it in between batches; if the new one fails, the old one
keeps serving. A served model can still fail on some input: ``ModelWatcher.score_safely`` turns
that into ``None`` (the caller answers from the baseline), counts it and logs it once a minute.
When it polls, the watcher also reads the retrain decisions appended to the folder's
``registry.jsonl`` (``ModelWatcher.decisions``); with the manifest's ``created_at``
(``Artifact.created_at``) they are what ``Metrics.watch_models`` exports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from streams.errors import ShopstreamError
from streams.features import CONTEXT_NAMES, N_CONTEXT, context_features
from streams.price_response import PriceReference
from streams.state import (
    FEATURE_BUCKETS,
    FIRST_GAP,
    MAX_FEATURES,
    N_GAPS,
    STATIC_BUCKETS,
    TokenKind,
    dynamic_feature,
    gap_bucket,
    static_feature,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UNK = 1
REQUIRED_INPUTS = ("items", "kinds", "gaps")
OUTPUTS = ("top_items", "top_scores", "propensity")
FAILURE_LOG_EVERY_S = 60.0  # a model failing on every batch logs once a minute, not per batch
REGISTRY = "registry.jsonl"  # retrain decisions in the model folder, one JSON object a line
DECISIONS = ("published", "refused")  # the registry's decisions (a bounded metric label)


class ModelError(ShopstreamError):
    """A model artifact that cannot be served (missing, corrupt or made for other conventions)."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file (the manifest's checksums; the exporter writes them with this)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"{path}: no manifest (export a model with `shopstream export RUN --out DIR`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise ModelError(f"{path}: the manifest is not a JSON object")
    return manifest


@dataclass
class Prediction:
    """One user's scores: the top items best first, their scores, and the propensity. Item ids
    are decoded as they are read (``ranked``): a recommendation reads about a dozen of the top K."""

    ids: list[int]  # indexes into ``vocab``
    scores: list[float]
    propensity: float
    vocab: list[str] = field(repr=False, compare=False)

    @property
    def items(self) -> list[str]:
        """Every top item's id, best first."""
        vocab = self.vocab
        return [vocab[i] for i in self.ids]

    def ranked(self, exclude: Container[str] = ()) -> Iterator[tuple[str, float]]:
        """(item id, score) of the items not in ``exclude``, best first, decoded one at a time."""
        vocab = self.vocab
        return (
            (item, s) for i, s in zip(self.ids, self.scores, strict=True) if (item := vocab[i]) not in exclude
        )


@dataclass(frozen=True)
class PropensityThresholds:
    """The manifest's ``propensity_thresholds``: score values at quantiles of the model's calibrated
    propensity on its validation period, chosen by the exporter. A propensity is only comparable
    with the thresholds of the model version that produced it."""

    high_intent: float  # a propensity crossing this upwards triggers a high-intent nudge
    reminder: float  # an abandoned cart of a user at least this likely to buy gets a reminder
    high_intent_quantile: float | None = None  # the quantiles they were taken at (informational)
    reminder_quantile: float | None = None


@dataclass
class Artifact:
    """A loaded, verified, warmed-up model."""

    version: str
    folder: Path
    session: Any  # onnxruntime.InferenceSession
    provider: str  # the execution provider that actually runs the graph
    vocab: list[str]  # index i + 2 -> item id
    index: dict[str, int]
    max_len: int
    top_k: int
    with_feats: bool
    manifest_sha: str
    category: dict[str, int] = field(default_factory=dict)  # item -> hashed category id, where known
    with_context: bool = False  # the graph reads the window's context features (``context`` input)
    thresholds: PropensityThresholds | None = None  # None: the manifest has none (settings' fallback)
    # False: the exporter found the propensity ranks validation no better than chance (manifest's
    # ``propensity_ranks``); promotions then follow the rules alone (``streams.pipeline``)
    propensity_ranks: bool = True
    created_at: float | None = None  # unix time of the export (manifest's created_at), when it has one
    prices: PriceReference | None = None  # the manifest's price reference (streams.price_response)
    buffers: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def encode_id(self, item: str) -> int:
        return self.index.get(item, UNK) if item else UNK

    def knows(self, item: str) -> bool:
        return item in self.index

    def score(self, sequences: Sequence[Sequence[Sequence[Any]]]) -> list[Prediction]:
        """Score a batch of token sequences (``UserState.seq`` lists) in one onnxruntime call."""
        n = len(sequences)
        if n == 0:
            return []
        width = min(self.max_len, max(len(s) for s in sequences)) or 1
        feeds = self._buffers(n, width)
        items, kinds, gaps = feeds["items"], feeds["kinds"], feeds["gaps"]
        feats, context = feeds.get("feats"), feeds.get("context")
        encode = self.encode_id
        pad = [0] * MAX_FEATURES
        for r, seq in enumerate(sequences):  # one row assignment per input, not one per token
            toks = seq[-width:]  # = seq[-max_len:]: width is max_len whenever a row is longer
            if not toks:
                continue
            off = width - len(toks)
            items[r, off:] = [encode(t[0]) for t in toks]
            ks = [t[1] for t in toks]
            kinds[r, off:] = ks
            ts = [t[2] for t in toks]
            gaps[r, off:] = [FIRST_GAP, *(gap_bucket(b - a) for a, b in pairwise(ts))]
            if context is not None:
                context[r] = context_features(ks, ts, [t[0] for t in toks])
            if feats is not None:
                feats[r, off:] = [
                    [*t[3][:MAX_FEATURES], *pad][:MAX_FEATURES] if len(t) > 3 and t[3] else pad for t in toks
                ]
        top_items, top_scores, propensity = self.session.run(list(OUTPUTS), feeds)
        self._check_outputs(n, top_items, top_scores, propensity)
        # converted a batch at a time (iterating numpy rows makes a numpy scalar per item: 40 us
        # a row of 100); item ids are decoded as they are read (``Prediction.ranked``)
        vocab = self.vocab
        scores = top_scores.tolist()
        probs = propensity.reshape(n).tolist()
        return [Prediction(row, scores[r], probs[r], vocab) for r, row in enumerate((top_items - 2).tolist())]

    def _check_outputs(self, n: int, items: np.ndarray, scores: np.ndarray, propensity: np.ndarray) -> None:
        """Refuse outputs that would decode to wrong items or break the records (~25 us a batch):
        ids outside the vocabulary (``vocab[i - 2]`` would wrap around for PAD and UNK), shapes that
        disagree, scores or propensities that are not finite."""
        if (
            items.ndim != 2
            or items.shape[0] != n
            or scores.shape != items.shape
            or propensity.shape[:1] != (n,)
        ):
            raise ModelError(
                f"model {self.version}: output shapes {items.shape}, {scores.shape}, {propensity.shape} "
                f"for a batch of {n}"
            )
        if items.size and (items.min() < 2 or items.max() >= len(self.vocab) + 2):
            raise ModelError(
                f"model {self.version}: item ids {items.min()}..{items.max()} outside the vocabulary "
                f"(2..{len(self.vocab) + 1})"
            )
        if not (np.isfinite(scores).all() and ((propensity >= 0) & (propensity <= 1)).all()):
            raise ModelError(f"model {self.version}: scores not finite or propensity outside [0, 1]")

    def _buffers(self, n: int, width: int) -> dict[str, np.ndarray]:
        """Zeroed input arrays (n, width[, feats]) and (n, N_CONTEXT) carved from buffers kept per
        width (the context rows do not depend on the width; kept beside the others all the same)."""
        per_width = self.buffers.get(width)
        if per_width is None or len(per_width["items"]) < n:
            rows = max(n, len(per_width["items"]) if per_width else 0)
            per_width = {name: np.zeros((rows, width), dtype=np.int64) for name in REQUIRED_INPUTS}
            if self.with_feats:
                per_width["feats"] = np.zeros((rows, width, MAX_FEATURES), dtype=np.int64)
            if self.with_context:
                per_width["context"] = np.zeros((rows, N_CONTEXT), dtype=np.float32)
            self.buffers[width] = per_width
        out = {}
        for name, buf in per_width.items():
            view = buf[:n]
            view.fill(0)
            out[name] = view
        return out


def load_artifact(folder: Path, provider: str = "auto", threads: int = 1) -> Artifact:
    """Load, verify and warm up the model in ``folder``; raises ``ModelError`` with the reason."""
    import onnxruntime as ort

    manifest = read_manifest(folder)
    where = folder / "manifest.json"
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{where}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    try:
        version = str(manifest["model_version"])
        graph = folder / manifest["graph"]
        vocab_path = folder / manifest["vocab"]
        ids = manifest["token_ids"]
        max_len, top_k = int(manifest["max_len"]), int(manifest["top_k"])
        inputs = list(manifest["inputs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{where}: incomplete manifest ({exc!r} missing or invalid)") from None
    for name, path in (("graph", graph), ("vocab", vocab_path)):
        if not path.is_file():
            raise ModelError(f"{where}: {name} file {path.name} is missing")
        digest = sha256(path)
        if digest != manifest.get(f"{name}_sha256"):
            raise ModelError(
                f"{path}: sha256 {digest[:12]}... does not match the manifest "
                f"({str(manifest.get(f'{name}_sha256'))[:12]}...): corrupt or half-copied artifact"
            )
    if ids.get("pad") != 0 or ids.get("unk") != UNK or ids.get("gap_buckets", N_GAPS) != N_GAPS:
        raise ModelError(f"{where}: token id conventions differ from this service's ({ids})")
    with_feats = "feats" in inputs
    if with_feats and (
        ids.get("feature_buckets") != FEATURE_BUCKETS or ids.get("feat_width") != MAX_FEATURES
    ):
        raise ModelError(
            f"{where}: model hashes features into {ids.get('feature_buckets')} x {ids.get('feat_width')}, "
            f"this service into {FEATURE_BUCKETS} x {MAX_FEATURES}"
        )
    with_context = "context" in inputs
    if with_context:
        check_context(manifest, where)
    thresholds = read_thresholds(manifest, where)
    ranks = manifest.get("propensity_ranks", True)  # absent: exported before the check, trusted
    if not isinstance(ranks, bool):
        raise ModelError(f"{where}: propensity_ranks = {ranks!r}, expected true or false")
    prices = read_price_reference(manifest, folder)
    try:
        vocab_doc = json.loads(vocab_path.read_text())
        vocab = vocab_doc["items"]
        categories = vocab_doc.get("categories") or []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{vocab_path}: unreadable vocabulary: {exc!r}") from None
    if categories and len(categories) != len(vocab):
        raise ModelError(f"{vocab_path}: {len(categories)} categories for {len(vocab)} items")
    if len(vocab) + 2 != manifest.get("n_items"):
        raise ModelError(f"{vocab_path}: {len(vocab)} items, the manifest says {manifest.get('n_items')} - 2")

    providers = select_providers(provider, ort.get_available_providers())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(graph), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ModelError(f"{graph}: onnxruntime cannot load it: {exc}") from None
    got = [i.name for i in session.get_inputs()]
    if got != inputs or [o.name for o in session.get_outputs()] != list(OUTPUTS):
        raise ModelError(
            f"{graph}: graph inputs/outputs {got} do not match the manifest {inputs} / {OUTPUTS}"
        )
    if with_context:
        shape = next(i.shape for i in session.get_inputs() if i.name == "context")
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != N_CONTEXT):
            raise ModelError(
                f"{graph}: the graph's context input has shape {shape}, not [batch, {N_CONTEXT}]"
            )
    actual = session.get_providers()[0]
    if providers[0] != actual:
        log.warning("model %s: asked for %s, onnxruntime runs it on %s", version, providers[0], actual)
    art = Artifact(
        version=version,
        folder=folder,
        session=session,
        provider=actual,
        vocab=vocab,
        index={item: i + 2 for i, item in enumerate(vocab)},
        category={item: c for item, c in zip(vocab, categories, strict=False) if c},  # [] when absent
        max_len=max_len,
        top_k=top_k,
        with_feats=with_feats,
        with_context=with_context,
        thresholds=thresholds,
        propensity_ranks=ranks,
        prices=prices,
        created_at=unix_time(manifest.get("created_at")),
        manifest_sha=sha256(folder / "manifest.json"),
    )
    warm_up(art)
    probe(art)
    return art


def read_price_reference(manifest: dict[str, Any], folder: Path) -> PriceReference | None:
    """The manifest's ``price_reference`` (``{"file": ..., "sha256": ...}``), checked; None
    without one (the policy then keeps the heuristic price sensitivity)."""
    entry = manifest.get("price_reference")
    if entry is None:
        return None
    where = folder / "manifest.json"
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise ModelError(f"{where}: price_reference must be an object with a file, not {entry!r}")
    path = folder / entry["file"]
    if not path.is_file():
        raise ModelError(f"{where}: price reference file {path.name} is missing")
    digest = sha256(path)
    if digest != entry.get("sha256"):
        raise ModelError(
            f"{path}: sha256 {digest[:12]}... does not match the manifest "
            f"({str(entry.get('sha256'))[:12]}...): corrupt or half-copied artifact"
        )
    try:
        return PriceReference.from_json(json.loads(path.read_text()))
    except ValueError as exc:
        raise ModelError(f"{path}: not a price reference: {exc}") from None


def check_context(manifest: dict[str, Any], where: Path) -> None:
    """A ``context`` input must be the features this service computes: the same names in the same
    order (``streams.features.CONTEXT_NAMES``) and the same width. Feature definitions of another
    version would feed the propensity head numbers it was not trained on, silently."""
    inputs = manifest["inputs"]
    spec = inputs.get("context") if isinstance(inputs, dict) else None
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("dtype") != "float32" or not isinstance(shape, list):
        raise ModelError(
            f"{where}: inputs.context must be {{'dtype': 'float32', 'shape': ['batch', N]}}, not {spec!r}"
        )
    if len(shape) != 2 or shape[1] != N_CONTEXT:
        raise ModelError(
            f"{where}: the context input has shape {shape}; this service computes {N_CONTEXT} context "
            "features per row (streams.features.N_CONTEXT)"
        )
    names = manifest.get("context_features")
    if not isinstance(names, list):
        raise ModelError(f"{where}: a context input without the context_features list it was trained on")
    if names != list(CONTEXT_NAMES):
        diff = next(
            (
                f"feature {j}: {a!r} there, {b!r} here"
                for j, (a, b) in enumerate(zip(names, CONTEXT_NAMES, strict=False))
                if a != b
            ),
            f"{len(names)} features there, {N_CONTEXT} here",
        )
        raise ModelError(
            f"{where}: the model's context features are not this service's ({diff}): it was trained "
            "with another version of streams.features; serve it with that version or re-export it"
        )


def unix_time(value: Any) -> float | None:
    """An ISO 8601 instant (``Z``, an offset, or none: UTC) as unix seconds; None for anything else
    (informational fields: a model is never refused for them)."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def registry_decision(line: bytes) -> tuple[str, float] | None:
    """``(decision, unix time)`` of one ``registry.jsonl`` line (``exporters.publish`` appends them:
    ``{"time": ISO, "decision": "published" | "refused", ...}``); None for anything else."""
    try:
        entry = json.loads(line)
        decision, at = entry["decision"], unix_time(entry["time"])
    except (ValueError, KeyError, TypeError):
        return None
    return (decision, at) if decision in DECISIONS and at is not None else None


def read_thresholds(manifest: dict[str, Any], where: Path) -> PropensityThresholds | None:
    """The manifest's ``propensity_thresholds`` (None without them), checked like the settings
    they stand in for: high intent in (0, 1], reminder in [0, 1] and not above high intent."""
    doc = manifest.get("propensity_thresholds")
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ModelError(f"{where}: propensity_thresholds must be an object, not {doc!r}")
    values: dict[str, float | None] = {}
    for key in ("high_intent", "reminder", "high_intent_quantile", "reminder_quantile"):
        value = doc.get(key)
        if value is None and key.endswith("_quantile"):
            values[key] = None
        elif isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
            values[key] = float(value)
        else:
            raise ModelError(f"{where}: propensity_thresholds.{key} = {value!r}, expected a number in [0, 1]")
    high, reminder = values["high_intent"] or 0.0, values["reminder"] or 0.0
    out = PropensityThresholds(high, reminder, values["high_intent_quantile"], values["reminder_quantile"])
    if out.high_intent <= 0 or out.reminder > out.high_intent:
        raise ModelError(
            f"{where}: propensity_thresholds high_intent {out.high_intent}, reminder {out.reminder}: "
            "expected 0 < high_intent and reminder <= high_intent (a likely buyer gets a reminder)"
        )
    return out


def select_providers(setting: str, available: Sequence[str]) -> list[str]:
    """onnxruntime providers for the ``inference_provider`` setting (auto, cpu or cuda)."""
    if setting == "cpu":
        return ["CPUExecutionProvider"]
    if setting == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelError(f"inference_provider=cuda but onnxruntime offers only {list(available)}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if setting == "auto":
        # onnxruntime-gpu lists CUDA even on machines without a GPU driver; ask for it only where
        # the NVIDIA driver is loaded (the fallback check in load_artifact still applies)
        if "CUDAExecutionProvider" in available and Path("/proc/driver/nvidia/version").exists():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise ModelError(f"inference_provider must be auto, cpu or cuda, not {setting!r}")


def warm_up(art: Artifact) -> None:
    """Run the graph on a few shapes so the first real batch does not pay for allocation."""
    tok = [art.vocab[0] if art.vocab else "", 2, 0, []]
    for n, length in ((1, 1), (1, art.max_len), (8, art.max_len)):
        _run_checked(art, [[tok] * length] * n, "warm-up")


def probe_batch(art: Artifact) -> list[list[list[Any]]]:
    """Sequences shaped like ``UserState.seq`` of real users, for ``probe``: lengths from 1 to past
    ``max_len`` (the scorer keeps the last ``max_len``), every token kind, known items from the
    whole vocabulary, unknown items and searches without one, no features, too many features and
    the extreme feature ids, time gaps from 0 to years and out of order. Each sequence ends with a
    known item, as the sequences the pipeline sends to the model do. For a graph with a ``context``
    input the same rows give windows with and without purchases, one-token and multi-token
    sessions and negative gaps (``Artifact.score`` computes their context features)."""
    known = (
        [art.vocab[i] for i in sorted({0, len(art.vocab) // 2, len(art.vocab) - 1})] if art.vocab else [""]
    )
    unknown = next(
        f"probe-unknown-{i}" for i in range(len(art.vocab) + 1) if f"probe-unknown-{i}" not in art.index
    )
    items = [*known, unknown, ""]
    kinds = [int(k) for k in TokenKind]
    feats = [
        [],
        [static_feature("c", "probe"), static_feature("b", "probe"), dynamic_feature("p", "7")],
        [1, STATIC_BUCKETS - 1, STATIC_BUCKETS, FEATURE_BUCKETS - 1],
        list(range(1, MAX_FEATURES + 4)),  # more than a token carries: cut to MAX_FEATURES
    ]
    gaps = (0, 1, 45, 3600, -600, 86400, 40 * 86400, 10 * 365 * 86400)
    lengths = sorted(
        {1, 2, 5, max(1, art.max_len // 2), max(1, art.max_len - 1), art.max_len, art.max_len + 3}
    )
    rows = []
    for r, length in enumerate(lengths):
        t, seq = 1_700_000_000, []
        for j in range(length):
            k = r + j
            item = known[k % len(known)] if j == length - 1 else items[k % len(items)]
            kind = int(TokenKind.SEARCH) if item == "" else kinds[k % len(kinds)]
            t += gaps[k % len(gaps)]
            seq.append([item, kind, t, feats[k % len(feats)]])
        rows.append(seq)
    return rows


def probe(art: Artifact) -> None:
    """Score the probe batch as one batch and each sequence alone (other widths than warm-up's):
    a graph that loads and warms up can still fail on real input (a shape, an index), and a
    version that does must not replace one that works. Raises ``ModelError`` with the reason."""
    rows = probe_batch(art)
    _run_checked(art, rows, "the probe batch")
    for seq in rows:
        _run_checked(art, [seq], f"a probe sequence of {len(seq)} tokens")


def _run_checked(art: Artifact, sequences: list[list[list[Any]]], what: str) -> None:
    try:
        preds = art.score(sequences)
    except Exception as exc:  # onnxruntime raises its own types; decoding raises IndexError etc.
        raise ModelError(f"{art.folder}: model {art.version} fails on {what}: {exc!r}"[:1000]) from None
    if len(preds) != len(sequences) or not all(p.items and len(p.items) == len(p.scores) for p in preds):
        raise ModelError(f"{art.folder}: model {art.version} returned malformed outputs on {what}")


class ModelWatcher:
    """Holds the serving model and swaps in new versions from the model folder.

    ``current`` is replaced by one assignment between batches: a batch scores entirely on one
    version, and every output names the version that produced it.
    """

    def __init__(
        self,
        folder: Path | None,
        provider: str = "auto",
        threads: int = 1,
        on_change: Callable[[Artifact | None, str], None] | None = None,
        on_failure: Callable[[Artifact, Exception], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_change(model, outcome)``: a version loaded, reloaded or failed to load;
        ``on_failure(model, exc)``: ``score_safely`` caught an inference failure of ``model``
        (the caller's ``shopstream_inference_failures_total``)."""
        self.folder = folder
        self.provider = provider
        self.threads = threads
        self.current: Artifact | None = None
        self.failed_sha: str | None = None  # manifest digest that last failed (not retried until it changes)
        self.on_change = on_change or (lambda art, outcome: None)
        self.on_failure = on_failure or (lambda art, exc: None)
        self.clock = clock
        self.failures = 0  # inference failures caught by score_safely since start
        self._failure_logged_at: float | None = None
        self._failures_unlogged = 0
        self.decisions: dict[str, float] = {}  # registry.jsonl: decision -> unix time of its last line
        self._registry_at = (0, 0)  # (inode, bytes of it read): the next poll reads only what follows

    def load_initial(self) -> None:
        """At startup: a folder with a manifest must hold a valid model (else ``ModelError``);
        a folder without one means "baseline until a model is exported there"."""
        if self.folder is None:
            return
        self.read_registry()
        if not (self.folder / "manifest.json").exists():
            log.warning("no model in %s yet: serving the baseline until one is exported there", self.folder)
            return
        self.current = load_artifact(self.folder, self.provider, self.threads)
        log.info(
            "model %s loaded from %s (%s, %d items)",
            self.current.version,
            self.folder,
            self.current.provider,
            len(self.current.vocab),
        )
        self.on_change(self.current, "loaded")

    def changed(self) -> str | None:
        """The manifest's digest when it differs from the serving one (and did not fail before)."""
        if self.folder is None:
            return None
        path = self.folder / "manifest.json"
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        if self.current is not None and digest == self.current.manifest_sha:
            return None
        return None if digest == self.failed_sha else digest

    async def poll(self) -> bool:
        """Load a new version if the manifest changed; True when a new model now serves. Reads the
        registry's new lines first (``read_registry``)."""
        self.read_registry()
        digest = self.changed()
        if digest is None or self.folder is None:
            return False
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            art = await loop.run_in_executor(None, load_artifact, self.folder, self.provider, self.threads)
        except Exception as exc:  # ModelError says why; anything else (a file gone mid-read) too
            self.failed_sha = digest
            log.error("model reload refused, still serving %s: %s", self._serving(), exc)
            self.on_change(self.current, "failed")
            return False
        old, self.current, self.failed_sha = self._serving(), art, None
        log.info(
            "model %s now serving (was %s; loaded and warmed in %.2fs on %s)",
            art.version,
            old,
            time.perf_counter() - started,
            art.provider,
        )
        self.on_change(art, "reloaded")
        return True

    def read_registry(self) -> None:
        """Fold the lines retrains appended to the folder's ``registry.jsonl`` since the last call
        into ``decisions``, reading only the new bytes (the file grows by a line per retrain). A
        line not yet ended waits for the next poll; a file replaced or cut shorter is read again
        from its start; a missing one clears ``decisions``. Never raises: the reload that follows
        in ``poll`` matters more than this metric."""
        if self.folder is None:
            return
        try:
            with (self.folder / REGISTRY).open("rb") as f:
                st = os.fstat(f.fileno())
                inode, offset = self._registry_at
                if st.st_ino != inode or st.st_size < offset:
                    self.decisions, offset = {}, 0
                f.seek(offset)
                chunk = f.read(st.st_size - offset)
        except FileNotFoundError:
            self.decisions, self._registry_at = {}, (0, 0)
            return
        except OSError as exc:
            log.debug("%s not read: %s", self.folder / REGISTRY, exc)
            return
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            found = registry_decision(line)
            if found is not None:
                decision, at = found
                self.decisions[decision] = max(at, self.decisions.get(decision, at))
        self._registry_at = (st.st_ino, offset + end)

    def score_safely(
        self, model: Artifact, sequences: Sequence[Sequence[Sequence[Any]]]
    ) -> list[Prediction] | None:
        """``model.score(sequences)``, or None when it raises (onnxruntime on some input, the
        decoding of its outputs): the caller answers that batch from the baseline. A failure is
        counted (``failures``, ``on_failure``) and logged at most once a minute with the model's
        version and the exception, never the sequences (users' data)."""
        try:
            return model.score(sequences)
        except Exception as exc:
            self.failures += 1
            self.on_failure(model, exc)
            now = self.clock()
            if self._failure_logged_at is not None and now - self._failure_logged_at < FAILURE_LOG_EVERY_S:
                self._failures_unlogged += 1
                return None
            log.error(
                "model %s failed on a batch of %d, the baseline answers it (%d more failures since the "
                "last report, %d in all): %s",
                model.version,
                len(sequences),
                self._failures_unlogged,
                self.failures,
                f"{exc!r}"[:500],
            )
            self._failure_logged_at, self._failures_unlogged = now, 0
            return None

    def _serving(self) -> str:
        return self.current.version if self.current else "the baseline"
