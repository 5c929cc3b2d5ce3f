"""A trained run -> the served artifact: ``model.onnx`` + ``manifest.json`` + ``vocab.json``.

In: a run folder from ``modeling.train`` and a few real evaluation cases. Out: an artifact folder
that onnxruntime alone can load and score (``streams`` never imports torch). The exporter checks
itself: the ONNX checker, onnxruntime-vs-torch parity on real batches of several shapes, named
inputs and outputs with dynamic batch and length axes, and a sha256 of the graph in the manifest.

The graph returns the top-K vocabulary ids with their scores and the purchase propensity, so the
stream never sorts the catalogue in Python.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.catalogue import CatalogueError, quantize_catalogue
from exporters.publish import attach
from modeling.model import ServingModel
from modeling.sequences import Cases
from modeling.train import load_model
from streams.features import CONTEXT_NAMES
from streams.price_response import PriceReference
from streams.scoring import sha256
from streams.state import N_GAPS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INPUTS = ("items", "kinds", "gaps")
OUTPUTS = ("top_items", "top_scores", "propensity")
PARITY_TOLERANCE = 1e-4
CATALOGUES = ("fp32", "int8")
# an int8 first pass must keep at least this share of the exact top 10 on the held-out cases
MIN_TOP10_KEPT = 0.99


class ExportError(Exception):
    """The exported graph failed a check."""


def _strict(value: Any) -> Any:
    """JSON without NaN/Infinity (undefined metrics become null), readable by any parser."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def input_names(serving: ServingModel) -> tuple[str, ...]:
    """The graph's inputs: ``feats`` only for a model trained with token features, ``context``
    only for one with a propensity branch."""
    cfg = serving.model.cfg
    return (*INPUTS, *(["feats"] if cfg.n_feats else []), *(["context"] if cfg.n_context else []))


def input_arrays(serving: ServingModel, cases: Cases, rows: slice, w: int) -> list[np.ndarray]:
    arrays = [cases.items, cases.kinds, cases.gaps]
    if serving.model.cfg.n_feats:
        if cases.feats is None:
            raise ExportError("the model reads token features but the example cases have none")
        arrays.append(cases.feats.astype(np.int64))
    out = [np.ascontiguousarray(a[rows, -w:]) for a in arrays]
    if serving.model.cfg.n_context:
        if cases.context is None:
            raise ExportError("the model reads window features but the example cases have none")
        out.append(np.ascontiguousarray(cases.context[rows], dtype=np.float32))
    return out


def export_graph(serving: ServingModel, example: tuple[torch.Tensor, ...], path: Path, opset: int) -> bool:
    """Write the serving graph to ``path``; returns whether its shapes are annotated
    (``annotate_shapes``)."""
    names = input_names(serving)
    dyn = {name: {0: "batch", 1: "length"} if name != "context" else {0: "batch"} for name in names}
    dyn.update({name: {0: "batch"} for name in OUTPUTS})
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated upstream but still the one that needs no
        # extra packages; its tracer warnings concern shapes that are constant here (d_model).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            serving,
            example,
            str(path),
            input_names=list(names),
            output_names=list(OUTPUTS),
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
    return annotate_shapes(path)


def annotate_shapes(path: Path) -> bool:
    """Name every intermediate tensor's dimensions in the graph (onnxruntime's symbolic shape
    inference). ONNX's own inference loses the batch axis after the first reshapes and leaves
    unnamed dimensions, so onnxruntime cannot prove that an operator's output has its input's
    size and copies instead of working in place: the repeat bonus's scatter then copied every
    row's catalogue scores (about 30 us per row of 400 on the 65k-item Taobao slice model). The
    annotations change no result; the parity checks run on the annotated graph. Where the
    inference cannot finish, the graph stays as exported (correct, slower) and this says so."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    try:
        # where it cannot finish, the tool saves its partial graph as sym_shape_infer_temp.onnx
        # in the working directory: let that land in a folder of its own that goes away
        with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            annotated = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # the tool raises a bare Exception for an incomplete inference
        log.warning("%s: shapes not annotated (onnxruntime's symbolic shape inference: %s)", path, exc)
        return False
    if annotated is None:
        log.warning("%s: shapes not annotated (symbolic shape inference does not take this opset)", path)
        return False
    onnx.save(annotated, str(path))
    return True


def _parity(serving: ServingModel, path: Path, cases: Cases) -> dict[str, float]:
    """Max abs differences between onnxruntime and torch on real batches of several shapes, and
    between torch's serving path (the newest position alone) and its full forward pass."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = input_names(serving)
    worst = {"top_scores": 0.0, "propensity": 0.0, "top_items_mismatch": 0.0, "full_forward": 0.0}
    n = len(cases)
    for b, w in ((1, cases.items.shape[1]), (8, 10), (min(64, n), cases.items.shape[1]), (min(32, n), 3)):
        sel = slice(0, min(b, n))
        arrays = input_arrays(serving, cases, sel, w)
        with torch.no_grad():
            t_items, t_scores, t_prop = serving(*(torch.from_numpy(a) for a in arrays))
        o_items, o_scores, o_prop = sess.run(list(OUTPUTS), dict(zip(names, arrays, strict=True)))
        worst["top_scores"] = max(worst["top_scores"], float(np.abs(o_scores - t_scores.numpy()).max()))
        worst["propensity"] = max(worst["propensity"], float(np.abs(o_prop - t_prop.numpy()).max()))
        worst["top_items_mismatch"] = max(
            worst["top_items_mismatch"], id_mismatch(o_items, o_scores, t_items.numpy(), serving, arrays)
        )
        with torch.no_grad():  # the top-K scores of every position computed, PAD and UNK left out
            full = torch.topk(serving.logits(*(torch.from_numpy(a) for a in arrays))[:, 2:], serving.k).values
        worst["full_forward"] = max(worst["full_forward"], float((full - t_scores).abs().max()))
    if (
        worst["top_scores"] > PARITY_TOLERANCE
        or worst["propensity"] > PARITY_TOLERANCE
        or worst["full_forward"] > PARITY_TOLERANCE
        or worst["top_items_mismatch"] > 0
    ):
        raise ExportError(f"onnxruntime and torch disagree: {worst}")
    return worst


def id_mismatch(
    o_items: np.ndarray,
    o_scores: np.ndarray,
    t_items: np.ndarray,
    serving: ServingModel,
    arrays: list[np.ndarray],
) -> float:
    """Share of returned ids that are wrong: where onnxruntime returns another id than torch at a
    rank, the id it returns must really have the score it reports in torch's full scoring (a
    genuine tie within float error), not just a score close to the one torch had at that rank."""
    differ = o_items != t_items
    if not differ.any():
        return 0.0
    with torch.no_grad():
        full = serving.logits(*(torch.from_numpy(a) for a in arrays)).numpy()
    torch_score_of_onnx_id = np.take_along_axis(full, o_items, axis=1)
    wrong = differ & ~np.isclose(torch_score_of_onnx_id, o_scores, atol=PARITY_TOLERANCE)
    return float(wrong.mean())


def _catalogue_agreement(serving: ServingModel, exact: Path, path: Path, cases: Cases) -> dict[str, float]:
    """What an int8 first pass (``exporters.catalogue``) costs in ranking on ``cases``, the graph at
    ``path`` against the fp32 graph at ``exact``: the share of each case's exact top 10 and
    top K it returns. Raises ``ExportError`` where a returned item's score is not its exact score
    (torch's full scoring), or where it keeps less than ``MIN_TOP10_KEPT`` of the top 10."""
    import onnxruntime as ort

    fp32, int8 = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (exact, path))
    names = input_names(serving)
    kept10 = kept_k = rows = 0
    wrong = 0.0
    for start in range(0, len(cases), 256):
        arrays = input_arrays(serving, cases, slice(start, start + 256), cases.items.shape[1])
        feeds = dict(zip(names, arrays, strict=True))
        want, _, _ = fp32.run(list(OUTPUTS), feeds)
        got, scores, _ = int8.run(list(OUTPUTS), feeds)
        with torch.no_grad():
            full = serving.logits(*(torch.from_numpy(a) for a in arrays)).numpy()
        off = ~np.isclose(np.take_along_axis(full, got, axis=1), scores, atol=PARITY_TOLERANCE)
        wrong = max(wrong, float(off.mean()))
        for w, g in zip(want, got, strict=True):
            kept10 += len(set(w[:10].tolist()) & set(g[:10].tolist()))
            kept_k += len(set(w.tolist()) & set(g.tolist()))
            rows += 1
    k = serving.k
    agreement = {"top10_kept": kept10 / max(rows * min(10, k), 1), "topk_kept": kept_k / max(rows * k, 1)}
    if wrong > 0:
        raise ExportError(f"the int8 catalogue returns items with other scores than theirs ({wrong:.2%})")
    if agreement["top10_kept"] < MIN_TOP10_KEPT:
        raise ExportError(
            f"the int8 catalogue keeps {agreement['top10_kept']:.2%} of the exact top 10 on held-out "
            f"cases (at least {MIN_TOP10_KEPT:.0%} wanted): export with more --candidates, or fp32"
        )
    return agreement


def check_catalogue(catalogue: str, candidates: int | None) -> None:
    """Refuse a catalogue step ``export`` cannot make (``ExportError``); ``retrain`` asks before
    it trains."""
    if catalogue not in CATALOGUES:
        raise ExportError(f"catalogue {catalogue!r}: one of {', '.join(CATALOGUES)}")
    if candidates is not None and catalogue != "int8":
        raise ExportError(f"{candidates} candidates: they are the int8 catalogue's (--catalogue int8)")


def export(
    run_dir: Path,
    out_dir: Path,
    cases: Cases,
    *,
    k: int = 100,
    opset: int = 17,
    prices: PriceReference | None = None,
    catalogue: str = "fp32",
    candidates: int | None = None,
) -> dict[str, Any]:
    """Export ``run_dir`` to ``out_dir``; returns the manifest. ``prices``: the price reference
    of the training period (``streams.price_response``), written beside the graph when the data
    has prices. ``catalogue``: ``fp32`` (the exact product over the catalogue) or ``int8`` (an
    int8 first pass keeping ``candidates`` items (default ``k``), then their exact scores:
    ``exporters.catalogue``; checked against the fp32 graph on ``cases``)."""
    import onnx

    check_catalogue(catalogue, candidates)

    model = load_model(run_dir)
    serving = ServingModel(model, k).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = out_dir / "model.onnx"
    example = tuple(
        torch.from_numpy(a) for a in input_arrays(serving, cases, slice(0, 4), cases.items.shape[1])
    )
    annotated = export_graph(serving, example, graph, opset)
    onnx.checker.check_model(str(graph), full_check=True)
    parity = _parity(serving, graph, cases)
    product: dict[str, Any] = {"product": "fp32"}
    if catalogue == "int8":
        with tempfile.TemporaryDirectory() as scratch:
            exact = Path(scratch) / "fp32.onnx"
            exact.write_bytes(graph.read_bytes())
            try:
                product = quantize_catalogue(graph, serving.k if candidates is None else candidates)
            except CatalogueError as exc:
                raise ExportError(f"--catalogue int8: {exc}") from None
            onnx.checker.check_model(str(graph), full_check=True)
            product.update(_catalogue_agreement(serving, exact, graph, cases))
    vocab = json.loads((run_dir / "vocab.json").read_text())
    if model.cfg.n_feats:
        # each item's first static feature (its category where the data has one) for the
        # serving side's diversity filter; 0 = none
        vocab["categories"] = model.item_feats[2:, 0].tolist()
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    cfg = json.loads((run_dir / "config.json").read_text())
    calibration_file = run_dir / "calibration.json"
    calibration = json.loads(calibration_file.read_text()) if calibration_file.exists() else {}
    digest = sha256(graph)
    evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else None
    created = datetime.now(UTC)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_version": re.sub(r"[^A-Za-z0-9._-]+", "-", f"{cfg.get('data') or 'model'}")
        + f"-{created:%Y%m%d%H%M%S}-{digest[:8]}",
        "created_at": created.isoformat(),
        "graph": "model.onnx",
        "graph_sha256": digest,
        "vocab": "vocab.json",
        "vocab_sha256": sha256(out_dir / "vocab.json"),
        "n_items": model.cfg.n_items,
        "max_len": model.cfg.max_len,
        "top_k": serving.k,
        "opset": opset,
        "shapes_annotated": annotated,
        "inputs": {
            name: (
                {"dtype": "float32", "shape": ["batch", model.cfg.n_context]}
                if name == "context"
                else {
                    "dtype": "int64",
                    "shape": ["batch", "length", *(["feat_width"] if name == "feats" else [])],
                }
            )
            for name in input_names(serving)
        },
        "outputs": {
            "top_items": {"dtype": "int64", "shape": ["batch", serving.k]},
            "top_scores": {"dtype": "float32", "shape": ["batch", serving.k]},
            "propensity": {"dtype": "float32", "shape": ["batch"]},
        },
        "token_ids": {
            "pad": 0,
            "unk": 1,
            "kinds": "streams.state.TokenKind",
            "gaps": "streams.state.gap_bucket",
            "feats": "streams.state.event_tokens (hashed features)",
            "gap_buckets": N_GAPS,
            "feature_buckets": model.cfg.n_feats,
            "feat_width": model.cfg.feat_width if model.cfg.n_feats else 0,
        },
        **({"context_features": list(CONTEXT_NAMES)} if model.cfg.n_context else {}),
        **{key: calibration[key] for key in ("propensity_thresholds", "split") if key in calibration},
        # false: the propensity ranks validation no better than chance, the worker's promotions
        # follow the rules alone (modeling.heads.propensity_ranks)
        **(
            {"propensity_ranks": calibration["propensity_ranks"]["ranks"]}
            if "propensity_ranks" in calibration
            else {}
        ),
        "calibration": calibration,
        "config": cfg,
        "trained_on": cfg.get("data"),
        "metrics": evaluation,
        "parity_max_abs_diff": parity,
        "catalogue": product,
    }
    (out_dir / "manifest.json").write_text(json.dumps(_strict(manifest), indent=2, allow_nan=False))
    if prices is not None:
        manifest["price_reference"] = attach(out_dir, prices)
    return manifest
