"""The behaviour model on CPU: data splits, a tiny training run, export parity, torch-free scoring."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import pytest
import torch

from exporters.onnx_export import ExportError, _parity, annotate_shapes, export, export_graph, input_arrays
from modeling.cli import HORIZON_S, build_split
from modeling.evaluate import evaluate
from modeling.model import PAD, UNK, BehaviourModel, ModelConfig, ServingModel
from modeling.sequences import (
    CENSORED,
    Split,
    UserSeq,
    Vocab,
    _cases,
    leave_one_out,
    read_pairs,
    read_seqrec,
    sequences_from_events,
    time_split,
)
from modeling.train import load_model, train
from streams.scoring import load_artifact, sha256
from streams.sources import datasets
from streams.splits import split_bounds
from streams.state import FEATURE_BUCKETS, MAX_FEATURES, STATIC_BUCKETS, TokenKind

DATA = Path(__file__).resolve().parents[1] / "data"


def test_seqrec_file_reads_and_splits_leave_one_out() -> None:
    seqs = read_seqrec(DATA / "seqrec.txt")
    split = leave_one_out(seqs, max_len=4)
    assert [s.user for s in seqs] == ["1", "2", "3", "4"]
    # user 4 has one item: not evaluable; the vocabulary holds training items only
    assert set(split.vocab.items) == {"a", "b", "c", "e", "f"}
    v = split.vocab.encode
    assert list(split.valid.targets) == [v("d"), v("c"), v("g")] and v("g") == UNK
    assert list(split.test.targets) == [v("e"), v("d"), v("h")]
    assert split.test.history[0] == [v("a"), v("b"), v("c"), v("d")]
    # no training window ever predicts a validation or test item
    trained = {int(t) for t in split.train.targets.ravel() if t != PAD}
    assert trained <= {v("b"), v("c"), v("e"), v("f")}
    assert split.train.items.shape[1] == 4


def test_user_item_pair_files_read_in_order(data_dir: Path) -> None:
    seqs = read_pairs(DATA / "pairs.txt")
    assert [(s.user, s.items) for s in seqs] == [("1", ["a", "b", "c"]), ("2", ["x", "y"])]
    split = build_split("sasrec:Video", data_dir, max_len=50)
    assert len(split.test) > 20_000 and len(split.vocab) > 10_000


def test_event_sequences_use_the_worker_tokens_and_split_by_time() -> None:
    seqs = sequences_from_events(datasets.taobao(DATA / "taobao.csv"))
    user1 = next(s for s in seqs if s.user == "1")
    assert user1.kinds == [TokenKind.VIEW, TokenKind.VIEW, TokenKind.CART_ADD, TokenKind.PURCHASE]
    split = time_split(
        seqs,
        valid_start=1511658002,
        test_start=1511658003,
        test_end=1511658200,
        max_len=8,
        horizon_s=3600,
        min_count=1,
    )
    assert set(split.vocab.items) == {"100", "101"}  # user 2's only view is in the test period
    assert list(split.valid.targets) == [split.vocab.encode("101")]
    assert list(split.valid.bought) == [CENSORED]  # the hour after it runs into the test period
    # the next token is the purchase, but the hour after the case runs past the end of the log:
    # censored, as a case without a purchase would be (never a positive kept for being one)
    assert len(split.test) == 1 and list(split.test.bought) == [CENSORED]
    longer = time_split(seqs, 1511658002, 1511658003, 1511668000, max_len=8, horizon_s=3600, min_count=1)
    assert list(longer.test.bought) == [1]
    assert split.train_cases is not None and len(split.train_cases) == 1  # 100 -> 101
    assert list(split.train_cases.bought) == [CENSORED]  # the purchase is after the training period
    # the vocabulary is every item seen before the test period, once is enough: 101 is first seen
    # in validation here (with its category feature), 200 only in the test period
    early = time_split(seqs, 1511658001, 1511658003, 1511658200, 8, 3600)
    assert early.vocab.items == ["100", "101"]
    assert early.item_feats is not None and early.item_feats[early.vocab.encode("101")].any()
    assert early.train_cases is not None and len(early.train_cases) == 0  # one training token
    # a period's cases know the items seen before it began: 101 is new to the validation cases (as
    # history and as target) and known to the test case that buys it
    assert list(early.valid.targets) == [UNK, UNK] and early.valid.items[-1, -1] == UNK
    assert list(early.test.targets) == [early.vocab.encode("101")] == [UNK + 2]


def test_window_features_of_training_cases_equal_the_workers(data_dir: Path) -> None:
    """The propensity branch reads the same features in training as the worker computes from its
    state: fold REES46 events through ``UserState`` and compare with the cases, case for case."""
    from streams.features import context_features
    from streams.records import event_adapter
    from streams.state import UserState

    events = list(datasets.load("rees46-demo", data_dir))[:3000]
    seqs = sequences_from_events(events)
    by_user = {s.user: s for s in seqs}
    vocab = Vocab.build(s.items for s in seqs)
    max_len = 20
    states: dict[str, UserState] = {}
    seen: dict[str, int] = {}
    checked = 0
    for raw in events:
        ev = event_adapter.validate_python(raw)
        state = states.setdefault(ev.user_id, UserState())
        tokens = state.apply(ev, 0, max_len)
        assert tokens is not None
        seq = by_user[ev.user_id]
        n = seen[ev.user_id] = seen.get(ev.user_id, 0) + len(tokens)
        if n >= len(seq.items):
            continue  # the user's last event: no case follows it
        cases = _cases([seq], [(n, n + 1)], vocab, max_len, horizon_s=3600.0)
        toks = state.seq[-max_len:]
        expected = context_features([t[1] for t in toks], [t[2] for t in toks], [t[0] for t in toks])
        assert cases.context is not None
        np.testing.assert_allclose(cases.context[0], np.array(expected, dtype=np.float32), rtol=1e-6)
        checked += 1
    assert checked > 1000


def test_forward_shapes_and_causality() -> None:
    torch.manual_seed(0)
    model = BehaviourModel(ModelConfig(n_items=30, d_model=16, n_layers=2, n_heads=2, max_len=6)).eval()
    items = torch.tensor([[0, 0, 5, 6, 7, 8]])
    kinds = torch.full_like(items, 2)
    gaps = torch.ones_like(items)
    h = model(items, kinds, gaps)
    assert h.shape == (1, 6, 16)
    changed = items.clone()
    changed[0, -1] = 9  # the future must not change earlier positions
    assert torch.allclose(model(changed, kinds, gaps)[0, :-1], h[0, :-1], atol=1e-6)
    assert model.item_logits(h).shape == (1, 6, 30)


def test_the_serving_graphs_last_position_shortcut_gives_the_full_forwards_answers() -> None:
    torch.manual_seed(1)
    cfg = ModelConfig(n_items=400, d_model=16, n_layers=3, n_heads=2, max_len=12, repeat=True, n_feats=64)
    model = BehaviourModel(cfg).eval()
    with torch.no_grad():  # a repeat bonus that matters (it starts at zero)
        for p in (*model.repeat_dist.parameters(), *model.repeat_kind.parameters(), model.repeat_rank):
            p.normal_(0.0, 3.0)
    b, n = 6, 9
    items = torch.randint(2, 400, (b, n))
    items[:2, :4] = PAD  # left-padded rows: shorter users in the batch
    items[2, 3] = UNK
    items[3, 2:6] = items[3, -1]  # an item viewed again and again
    kinds = torch.randint(1, 7, (b, n)).masked_fill(items == PAD, 0)
    gaps = torch.randint(1, 19, (b, n)).masked_fill(items == PAD, 0)
    feats = torch.randint(0, 64, (b, n, cfg.feat_width))
    with torch.no_grad():
        full = model(items, kinds, gaps, feats)
        last = model(items, kinds, gaps, feats, last_only=True)
        assert last.shape == (b, 1, 16)
        assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
        serving = ServingModel(model, k=20).eval()
        top_items, top_scores, _ = serving(items, kinds, gaps, feats)  # the exported graph's path
        scores, idx = torch.topk(
            serving.logits(items, kinds, gaps, feats)[:, 2:], 20, dim=1
        )  # every position
    assert torch.equal(top_items, idx + 2)
    assert torch.allclose(top_scores, scores, atol=1e-5)


def test_the_feature_bag_is_the_mean_of_the_present_features_vectors() -> None:
    torch.manual_seed(3)
    model = BehaviourModel(ModelConfig(n_items=10, d_model=8, n_feats=16))
    assert model.feat_emb is not None
    weight = model.feat_emb.weight
    assert weight[PAD].abs().sum() > 0  # initialised like every row: the bag must not read it
    ids = torch.tensor([[[3, 5, PAD, 7], [PAD, PAD, PAD, PAD]], [[9, 9, 2, PAD], [4, PAD, PAD, PAD]]])
    bag = model.bag(ids)
    expected = torch.stack(
        [
            torch.stack([(weight[3] + weight[5] + weight[7]) / 3, torch.zeros(8)]),
            torch.stack([(weight[9] + weight[9] + weight[2]) / 3, weight[4]]),
        ]
    )
    assert torch.allclose(bag, expected, atol=1e-6)
    bag.sum().backward()  # type: ignore[no-untyped-call]  # the PAD row learns nothing, as with the embedding's padding_idx
    assert weight.grad is not None and weight.grad[PAD].abs().sum() == 0
    assert torch.equal(weight.grad[9], 2 * weight.grad[3])  # twice in a bag of three


def test_item_attributes_become_static_features_of_tokens_and_items(data_dir: Path) -> None:
    split = build_split("seqrec:LastFM", data_dir, max_len=20)
    assert split.item_feats is not None and split.train.feats is not None
    assert split.item_feats.shape == (len(split.vocab), MAX_FEATURES)
    assert (split.item_feats[2:] > 0).any(axis=1).mean() > 0.9  # most items have attributes
    assert (split.item_feats < STATIC_BUCKETS).all() and not split.item_feats[:2].any()  # none for PAD/UNK
    # a token's features are its item's attributes: same ids wherever the item occurs
    rows, cols = np.nonzero(split.train.items > 1)
    r, c = rows[0], cols[0]
    assert sorted(split.train.feats[r, c][split.train.feats[r, c] > 0]) == sorted(
        split.item_feats[split.train.items[r, c]][split.item_feats[split.train.items[r, c]] > 0]
    )
    model = BehaviourModel(
        ModelConfig(n_items=len(split.vocab), d_model=16, max_len=20, n_feats=FEATURE_BUCKETS)
    ).eval()
    model.item_feats.copy_(torch.from_numpy(split.item_feats).long())
    items = torch.from_numpy(split.test.items[:3])
    assert split.test.feats is not None
    feats = torch.from_numpy(split.test.feats[:3].astype(np.int64))
    kinds, gaps = torch.full_like(items, 5), torch.ones_like(items)
    with torch.no_grad():
        with_feats, without = model(items, kinds, gaps, feats), model(items, kinds, gaps)
        assert not torch.allclose(with_feats, without)  # the features reach the hidden states
        assert not torch.allclose(model.item_table(), model.item_emb.weight)  # and the item table


class TinyRun(NamedTuple):
    run: Path
    split: Split
    history: list[dict[str, Any]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> TinyRun:
    split = build_split("seqrec:LastFM", data_dir, max_len=20)
    run = tmp_path_factory.mktemp("run")
    _, history = train(split, "tiny", run, {"epochs": 3, "patience": 5}, progress=False)
    return TinyRun(run, split, history)


def test_a_few_training_epochs_reduce_the_loss(tiny_run: TinyRun) -> None:
    run, _, history = tiny_run
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["valid_NDCG@10"] > 0
    for name in ("config.json", "vocab.json", "model.pt", "metrics.jsonl", "learning_curve.png"):
        assert (run / name).exists(), name


def test_export_is_checked_and_scores_without_torch(tiny_run: TinyRun, tmp_path: Path) -> None:
    run, split, _ = tiny_run
    manifest = export(run, tmp_path, split.test, k=25)
    assert manifest["graph_sha256"] == sha256(tmp_path / "model.onnx")
    assert manifest["parity_max_abs_diff"]["top_scores"] < 1e-4
    assert manifest["parity_max_abs_diff"]["full_forward"] < 1e-4  # the graph's shortcut, checked
    assert manifest["top_k"] == 25 and manifest["n_items"] == len(split.vocab)
    assert list(manifest["inputs"]) == ["items", "kinds", "gaps", "feats"]  # LastFM has item attributes
    assert manifest["shapes_annotated"] is True and not unnamed_dimensions(tmp_path / "model.onnx")
    assert split.test.feats is not None
    items = split.test.items[:5, -7:]
    np.save(tmp_path / "items.npy", items)
    np.save(tmp_path / "feats.npy", split.test.feats[:5, -7:].astype(np.int64))
    code = f"""
import sys, json
sys.modules["torch"] = None  # any torch import fails: the artifact must not need it
import numpy as np, onnxruntime as ort
s = ort.InferenceSession("{tmp_path / "model.onnx"}", providers=["CPUExecutionProvider"])
items = np.load("{tmp_path / "items.npy"}")
feats = np.load("{tmp_path / "feats.npy"}")
feeds = {{"items": items, "kinds": np.full_like(items, 5), "gaps": np.ones_like(items), "feats": feats}}
ids, scores, prop = s.run(None, feeds)
print(json.dumps({{"shape": list(ids.shape), "min_id": int(ids.min()),
                  "sorted": bool((np.diff(scores, axis=1) <= 0).all()),
                  "prop_ok": bool(((prop >= 0) & (prop <= 1)).all())}}))
"""
    out = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert out == {"shape": [5, 25], "min_id": out["min_id"], "sorted": True, "prop_ok": True}
    assert out["min_id"] >= 2  # PAD and UNK are never recommended


def test_an_int8_catalogue_export_is_checked_against_the_exact_one_and_serves(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    run, split, _ = tiny_run
    n = len(split.vocab.items)
    manifest = export(run, tmp_path, split.test, k=25, catalogue="int8", candidates=60)
    product = manifest["catalogue"]
    assert product["product"] == "int8" and product["candidates"] == min(60, n) and product["items"] == n
    assert product["top10_kept"] >= 0.99 and 0 < product["topk_kept"] <= 1  # measured on split.test
    assert manifest["graph_sha256"] == sha256(tmp_path / "model.onnx")
    art = load_artifact(tmp_path, "cpu")  # the worker loads and scores it as any export
    predictions = art.score([[[split.vocab.items[i], 5, 1_000 + i] for i in range(3, 9)]])
    assert len(predictions) == 1 and len(predictions[0].ids) == 25
    with pytest.raises(ExportError, match="one of fp32, int8"):
        export(run, tmp_path / "other", split.test, k=25, catalogue="fp16")
    with pytest.raises(ExportError, match="the int8 catalogue's"):
        export(run, tmp_path / "other", split.test, k=25, candidates=50)
    assert not (tmp_path / "other").exists()  # refused before anything is written


def dims(value: Any) -> Any:
    """The dimensions of an ONNX value's tensor type."""
    return value.type.tensor_type.shape.dim


def unnamed_dimensions(path: Path) -> list[str]:
    """The graph's intermediate tensors without a shape, or with a dimension neither named nor
    known."""
    graph = onnx.load(str(path)).graph
    info = {v.name: v for v in graph.value_info}
    outputs = {o.name for o in graph.output}
    return [
        name
        for node in graph.node
        for name in node.output
        if name not in outputs
        and (name not in info or any(not (d.dim_param or d.HasField("dim_value")) for d in dims(info[name])))
    ]


def test_the_exported_graph_names_the_catalogue_scores_dimensions(tmp_path: Path) -> None:
    # the repeat bonus's scatter and the catalogue scores it adds to: the same named shape, so
    # onnxruntime can prove the scatter may work in place (unnamed, it copied every row's scores)
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=300, d_model=16, n_layers=2, n_heads=2, max_len=12, repeat=True, n_feats=64)
    serving = ServingModel(BehaviourModel(cfg).eval(), k=20).eval()
    items = torch.randint(2, 300, (4, 9))
    feats = torch.randint(0, 64, (4, 9, cfg.feat_width))
    example = (items, torch.full_like(items, 5), torch.ones_like(items), feats)
    assert export_graph(serving, example, tmp_path / "model.onnx", 17) is True
    assert not unnamed_dimensions(tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in dims(v)] for v in graph.value_info}
    (scatter,) = [node for node in graph.node if node.op_type == "ScatterElements"]
    assert shapes[scatter.input[0]] == shapes[scatter.output[0]] == ["batch", 298]


def test_a_graph_whose_shapes_cannot_be_inferred_is_kept_as_exported(tmp_path: Path) -> None:
    # an operator onnxruntime's symbolic shape inference does not know: no annotations, the
    # graph untouched (correct, if slower), and False (what the manifest's shapes_annotated says)
    node = onnx.helper.make_node("Unknown", ["x"], ["y"], domain="example.custom")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("example.custom", 1)]
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    assert annotate_shapes(path) is False
    assert path.read_bytes() == before
    assert not Path("sym_shape_infer_temp.onnx").exists()  # the tool's partial graph is not left behind


class DriftingShortcut(ServingModel):
    """A serving path that no longer agrees with the full forward pass (as a wrong shortcut
    would), exported as it is: onnxruntime and torch agree with each other."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, scores, propensity = super().forward(*inputs)
        return ids, scores + 0.01, propensity


def test_the_parity_check_holds_the_serving_path_to_the_full_forward_pass(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    run, split, _ = tiny_run
    drifting = DriftingShortcut(load_model(run), 25).eval()
    cases = split.test
    arrays = input_arrays(drifting, cases, slice(0, 4), cases.items.shape[1])
    export_graph(drifting, tuple(torch.from_numpy(a) for a in arrays), tmp_path / "model.onnx", 17)
    with pytest.raises(ExportError, match="disagree") as refused:
        _parity(drifting, tmp_path / "model.onnx", cases)
    worst = ast.literal_eval(str(refused.value).partition("disagree: ")[2])
    assert worst["top_scores"] < 1e-4  # onnxruntime agrees with this torch path: only the new check fails
    assert abs(worst["full_forward"] - 0.01) < 1e-4


def test_evaluation_reports_model_and_baselines(tiny_run: TinyRun) -> None:
    run, split, _ = tiny_run
    model = load_model(run)
    results = evaluate(model, split, run, sampled=False)
    assert results["headline"] == "history_excluded"
    assert set(results["models"]) == {
        "model",
        "most-popular",
        "item-kNN",
    }  # history excluded: no recent-items
    for entry in results["models"].values():
        m = entry["history_excluded"]
        assert 0 <= m["NDCG@10"] <= m["HR@10"] <= m["HR@20"] <= 1
        lo, hi = entry["NDCG@10_ci95"]
        assert lo <= m["NDCG@10"] <= hi
    assert results["models"]["model"]["perplexity"] > 1
    report = (run / "report.md").read_text()
    assert "item-kNN" in report and (run / "ndcg10.png").exists()


def test_event_log_run_reports_propensity_against_both_baselines(tmp_path: Path, data_dir: Path) -> None:
    # the first 300 of Taobao's 814 users, split like `--data taobao-users` (the full set took 418 s
    # of a busy CI run); the training pipeline and every report section run as on the full set
    seqs = sequences_from_events(datasets.load("taobao-users", data_dir))[:300]
    split = time_split(seqs, *split_bounds("taobao-users", []), 20, HORIZON_S, "taobao-users")
    model, _ = train(
        split,
        "tiny",
        tmp_path,
        {
            "epochs": 1,
            "repeat": True,
            "propensity_epochs": 2,
            "repeat_epochs": 3,
            "eval_exclude_history": False,
        },
        progress=False,
    )
    assert model.prop is not None  # event logs get the propensity branch
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    # a tiny model after one epoch on 300 users: its propensity does not rank the validation day
    # beyond noise (0.52 [0.40, 0.62]), so it gets no thresholds and its promotions are the rules'
    check = calibration["propensity_ranks"]
    assert check["ranks"] is False and check["ci95"][0] <= 0.5 and "propensity_thresholds" not in calibration
    assert calibration["split"]["test_start"] == split.bounds["test_start"]
    refit = calibration["next_item"]  # refitted on validation, never worse than training left it
    assert refit["after"]["nll"] <= refit["before"]["nll"]
    results = evaluate(model, split, tmp_path, sampled=False)
    assert results["headline"] == "no_exclusion"
    serving = results["models"]["model"]["serving_excluded"]
    assert serving["NDCG@10"] <= results["models"]["model"]["no_exclusion"]["NDCG@10"]
    prop = results["propensity"]
    for name in ("model", "logistic regression", "gradient-boosted trees"):
        assert 0 <= prop[name]["ECE"] <= 1
        lo, hi = prop[name]["ROC-AUC_ci95"]
        assert lo <= prop[name]["ROC-AUC"] <= hi
    # recency / frequency features carry signal (0.66 with all users); chance is 0.5
    assert prop["logistic regression"]["ROC-AUC"] > 0.55
    daily = results["daily"]  # one case per user on the test day, scored at its start
    assert daily["cases"]["test"] <= 300 and 0 < daily["positives"] < 1
    assert {"model", "logistic regression", "gradient-boosted trees"} <= set(daily)
    assert (tmp_path / "reliability.png").exists()
    art = tmp_path / "artifact"
    manifest = export(tmp_path, art, split.test, k=10)
    assert list(manifest["inputs"])[-1] == "context"
    assert manifest["propensity_ranks"] is False and "propensity_thresholds" not in manifest
    assert load_artifact(art, "cpu").propensity_ranks is False


def test_batches_of_one_token_windows_train_without_nan(tmp_path: Path) -> None:
    # every user has two events: all training windows are one token long, with no next kind inside
    seqs = [
        UserSeq(f"u{i}", [f"i{(i + k) % 5}" for k in range(4)], [2, 3, 2, 5], [0.0, 5.0, 12.0, 20.0])
        for i in range(40)
    ]
    split = time_split(seqs, 10.0, 20.0, 30.0, max_len=4, horizon_s=60.0, min_count=1)
    _, history = train(
        split, "tiny", tmp_path, {"epochs": 1, "kind_weight": 0.5, "max_len": 4}, progress=False
    )
    assert np.isfinite(history[0]["train_loss"])
