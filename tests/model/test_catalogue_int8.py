"""``exporters.catalogue``: the int8 first pass with an exact re-rank, on a small exported serving
graph (random weights, the repeat bonus on). With every item a candidate it must return exactly
what the fp32 graph returns; with fewer, every item it returns carries its exact score."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.catalogue import CatalogueError, quantize_catalogue
from exporters.onnx_export import OUTPUTS, export_graph
from modeling.model import BehaviourModel, ModelConfig, ServingModel

N_ITEMS, K = 400, 20


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServingModel, Path]:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=N_ITEMS, d_model=16, n_layers=2, n_heads=2, max_len=12, repeat=True)
    model = BehaviourModel(cfg).eval()
    with torch.no_grad():  # a repeat bonus as a trained model has (it starts at zero)
        model.repeat_dist.weight.normal_(1.0, 0.5)
        model.repeat_kind.weight.normal_(0.5, 0.5)
    serving = ServingModel(model, k=K).eval()
    folder = tmp_path_factory.mktemp("catalogue")
    items = torch.randint(2, N_ITEMS, (4, 9))
    export_graph(
        serving, (items, torch.full_like(items, 5), torch.ones_like(items)), folder / "fp32.onnx", 17
    )
    return serving, folder / "fp32.onnx"


def inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Token rows that repeat items (so the repeat bonus changes the ranking), left-padded."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(2, N_ITEMS, size=(rows, 4))
    items = np.take_along_axis(pool, rng.integers(0, 4, size=(rows, 10)), axis=1)
    items[:, :3] = 0  # padding
    kinds = rng.integers(1, 5, size=items.shape)
    return {"items": items.astype(np.int64), "kinds": kinds.astype(np.int64), "gaps": np.ones_like(items)}


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUTS), feeds)  # type: ignore[no-any-return]


def quantized(fp32: Path, folder: Path, candidates: int) -> Path:
    path = folder / f"int8-{candidates}.onnx"
    shutil.copy(fp32, path)
    assert quantize_catalogue(path, candidates) == {
        "product": "int8",
        "candidates": min(candidates, N_ITEMS - 2),
        "items": N_ITEMS - 2,
        "dim": 16,
    }
    onnx.checker.check_model(str(path), full_check=True)
    return path


def test_every_item_a_candidate_returns_what_the_fp32_graph_returns(
    graphs: tuple[ServingModel, Path], tmp_path: Path
) -> None:
    _, fp32 = graphs
    path = quantized(fp32, tmp_path, candidates=10_000)  # more than the catalogue: all of it
    feeds = inputs(64, seed=1)
    want_ids, want_scores, want_prop = run(fp32, feeds)
    got_ids, got_scores, got_prop = run(path, feeds)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert (got_ids == want_ids).mean() > 0.99  # any difference is a tie within float error
    repeated = [set(row[row >= 2].tolist()) for row in feeds["items"]]
    assert (
        np.mean([len(r & set(ids.tolist())) / len(r) for r, ids in zip(repeated, got_ids, strict=True)]) > 0.5
    )
    np.testing.assert_array_equal(got_prop, want_prop)
    assert got_ids.min() >= 2  # PAD and UNK are never returned


def test_with_fewer_candidates_every_returned_item_has_its_exact_score(
    graphs: tuple[ServingModel, Path], tmp_path: Path
) -> None:
    serving, fp32 = graphs
    path = quantized(fp32, tmp_path, candidates=K)
    feeds = inputs(64, seed=2)
    got_ids, got_scores, _ = run(path, feeds)
    with torch.no_grad():
        full = serving.logits(*(torch.from_numpy(feeds[name]) for name in ("items", "kinds", "gaps"))).numpy()
    np.testing.assert_allclose(np.take_along_axis(full, got_ids, axis=1), got_scores, atol=1e-5)
    assert (np.diff(got_scores, axis=1) <= 0).all()  # best first
    assert all(len(set(row.tolist())) == K for row in got_ids)  # no item twice
    want_ids, _, _ = run(fp32, feeds)
    kept = np.mean(
        [
            len(set(w[:10].tolist()) & set(g[:10].tolist())) / 10
            for w, g in zip(want_ids, got_ids, strict=True)
        ]
    )
    assert kept > 0.8  # the first pass ranks nearly as the exact product does


def test_a_graph_of_another_shape_or_too_few_candidates_is_refused(
    graphs: tuple[ServingModel, Path], tmp_path: Path
) -> None:
    _, fp32 = graphs
    path = tmp_path / "model.onnx"
    shutil.copy(fp32, path)
    before = path.read_bytes()
    with pytest.raises(CatalogueError, match="at least 20"):
        quantize_catalogue(path, K - 1)
    assert path.read_bytes() == before
    node = onnx.helper.make_node("TopK", ["x", "k"], ["top_scores", "i"], axis=1)
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("top_scores", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "k")],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(CatalogueError, match="scaled catalogue logits"):
        quantize_catalogue(path, 4)


def test_the_first_pass_scores_keep_the_named_shape_the_bonus_scatter_needs(
    graphs: tuple[ServingModel, Path], tmp_path: Path
) -> None:
    _, fp32 = graphs
    graph = onnx.load(str(quantized(fp32, tmp_path, candidates=K))).graph
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info
    }
    (scatter,) = [node for node in graph.node if node.op_type == "ScatterElements"]
    assert scatter.input[0] == "catalogue_int8/approx"
    assert shapes[scatter.input[0]] == shapes[scatter.output[0]] == ["batch", N_ITEMS - 2]
    # the exact rows are read from the graph's own item table, not from a second copy of it
    (gather,) = [node for node in graph.node if node.name == "catalogue_int8/rows_of_candidates"]
    assert gather.input[0] == "table" and "catalogue_int8/rows" not in {i.name for i in graph.initializer}
