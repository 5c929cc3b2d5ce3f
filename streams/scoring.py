"""The behaviour model on the hot path: an exported artifact scored with onnxruntime (no torch).

In: a model folder written by ``shopstream export`` (``manifest.json``, ``model.onnx``,
``vocab.json``) and users' token sequences (``UserState.seq``). Out: per user, the graph's top-K
items (ids decoded to shop item ids) with scores, and the calibrated purchase propensity.

Lifecycle: ``load_artifact`` verifies the manifest (format, sha256 of graph and vocabulary, token
id conventions) and refuses anything else with a ``ModelError`` that says what is wrong; the
session is warmed up before it is used. ``ModelWatcher`` polls the folder and, when the manifest
changes, loads and warms the new version off the event loop and swaps it in between batches; if
the new one fails, the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from streams.errors import ShopstreamError
from streams.state import FEATURE_BUCKETS, FIRST_GAP, MAX_FEATURES, N_GAPS, gap_bucket

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UNK = 1
REQUIRED_INPUTS = ("items", "kinds", "gaps")
OUTPUTS = ("top_items", "top_scores", "propensity")


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
    """One user's scores: vocabulary ids best first (already decoded) and the propensity."""

    items: list[str]
    scores: list[float]
    propensity: float


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
        feats = feeds.get("feats")
        encode = self.encode_id
        pad = [0] * MAX_FEATURES
        for r, seq in enumerate(sequences):  # one row assignment per input, not one per token
            toks = seq[-width:]
            if not toks:
                continue
            off = width - len(toks)
            items[r, off:] = [encode(t[0]) for t in toks]
            kinds[r, off:] = [t[1] for t in toks]
            ts = [t[2] for t in toks]
            gaps[r, off:] = [FIRST_GAP, *(gap_bucket(b - a) for a, b in pairwise(ts))]
            if feats is not None:
                feats[r, off:] = [
                    [*t[3][:MAX_FEATURES], *pad][:MAX_FEATURES] if len(t) > 3 and t[3] else pad for t in toks
                ]
        top_items, top_scores, propensity = self.session.run(list(OUTPUTS), feeds)
        vocab = self.vocab
        return [
            Prediction([vocab[i - 2] for i in top_items[r]], top_scores[r].tolist(), float(propensity[r]))
            for r in range(n)
        ]

    def _buffers(self, n: int, width: int) -> dict[str, np.ndarray]:
        """Zeroed input arrays (n, width[, feats]) carved from buffers kept per width."""
        per_width = self.buffers.get(width)
        if per_width is None or len(per_width["items"]) < n:
            rows = max(n, len(per_width["items"]) if per_width else 0)
            per_width = {name: np.zeros((rows, width), dtype=np.int64) for name in REQUIRED_INPUTS}
            if self.with_feats:
                per_width["feats"] = np.zeros((rows, width, MAX_FEATURES), dtype=np.int64)
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
        manifest_sha=sha256(folder / "manifest.json"),
    )
    warm_up(art)
    return art


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
        preds = art.score([[tok] * length] * n)
        if len(preds) != n or not all(0.0 <= p.propensity <= 1.0 for p in preds):
            raise ModelError(f"{art.folder}: the graph returned malformed outputs on warm-up")


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
    ) -> None:
        self.folder = folder
        self.provider = provider
        self.threads = threads
        self.current: Artifact | None = None
        self.failed_sha: str | None = None  # manifest digest that last failed (not retried until it changes)
        self.on_change = on_change or (lambda art, outcome: None)

    def load_initial(self) -> None:
        """At startup: a folder with a manifest must hold a valid model (else ``ModelError``);
        a folder without one means "baseline until a model is exported there"."""
        if self.folder is None:
            return
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
        """Load a new version if the manifest changed; True when a new model now serves."""
        digest = self.changed()
        if digest is None or self.folder is None:
            return False
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            art = await loop.run_in_executor(None, load_artifact, self.folder, self.provider, self.threads)
        except ModelError as exc:
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

    def _serving(self) -> str:
        return self.current.version if self.current else "the baseline"
