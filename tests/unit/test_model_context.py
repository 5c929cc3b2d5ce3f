"""The artifact's optional ``context`` input and ``propensity_thresholds``: the scorer feeds the
context features of exactly the window the graph reads, refuses feature definitions of another
version, and carries the model's thresholds; artifacts without them serve as before.

Uses copies of the demo artifact (``deploy/demo/model``) whose graph gets a ``context`` input and
a propensity computed from it alone (the sigmoid of the mean feature), so the test can check the
value onnxruntime returns against ``streams.features`` in numpy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from streams.features import CONTEXT_NAMES, N_CONTEXT, context_features
from streams.scoring import Artifact, ModelError, PropensityThresholds, load_artifact, probe_batch, sha256
from streams.state import TokenKind

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "deploy" / "demo" / "model"
THRESHOLDS = {"high_intent": 0.31, "reminder": 0.12, "high_intent_quantile": 0.95, "reminder_quantile": 0.8}


def edit_manifest(folder: Path, **changes: Any) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def with_context(folder: Path, width: int = N_CONTEXT, names: list[str] | None = None) -> Path:
    """A copy of the demo artifact whose graph reads ``context`` (batch, width) and returns
    sigmoid(mean of the row) as the propensity."""
    shutil.copytree(DEMO_MODEL, folder)
    model = onnx.load(str(folder / "model.onnx"))
    g = model.graph
    for node in g.node:
        node.output[:] = ["propensity_unused" if o == "propensity" else o for o in node.output]
    g.input.append(helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", width]))
    g.node.extend(
        [
            helper.make_node("ReduceMean", ["context"], ["context_mean"], axes=[1], keepdims=0),
            helper.make_node("Sigmoid", ["context_mean"], ["propensity"]),
        ]
    )
    onnx.save(model, str(folder / "model.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"]["context"] = {"dtype": "float32", "shape": ["batch", width]}
    manifest["context_features"] = list(CONTEXT_NAMES) if names is None else names
    manifest["graph_sha256"] = sha256(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def ctx_model(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    folder = with_context(tmp_path_factory.mktemp("ctx") / "model")
    edit_manifest(folder, propensity_thresholds=THRESHOLDS)
    return load_artifact(folder, "cpu")


def user(art: Artifact, n: int, t0: int = 1_700_000_000, step: int = 600) -> list[list[Any]]:
    """A ``UserState.seq`` of ``n`` tokens: views of known items, a cart add and a purchase early on."""
    kinds = [TokenKind.VIEW, TokenKind.CART_ADD, TokenKind.PURCHASE, TokenKind.VIEW, TokenKind.SEARCH]
    return [
        [art.vocab[j % len(art.vocab)], int(kinds[j % len(kinds)]), t0 + j * step + (j % 3) * 7000, []]
        for j in range(n)
    ]


def expected(art: Artifact, seq: list[list[Any]]) -> list[float]:
    window = seq[-art.max_len :]
    return context_features([t[1] for t in window], [t[2] for t in window], [t[0] for t in window])


def test_the_graph_gets_the_context_of_the_window_it_reads(ctx_model: Artifact) -> None:
    art = ctx_model
    assert art.with_context and art.max_len < 40
    seqs = [user(art, 40), user(art, 3, step=30), user(art, art.max_len), user(art, 1)]
    preds = art.score(seqs)
    for seq, pred in zip(seqs, preds, strict=True):
        want = 1 / (1 + np.exp(-np.mean(np.asarray(expected(art, seq), dtype=np.float32))))
        assert pred.propensity == pytest.approx(float(want), abs=1e-6)
    # the window is the last max_len tokens: older tokens change nothing
    older = [[art.vocab[0], int(TokenKind.PURCHASE), 1_600_000_000, []], *seqs[0]]
    assert art.score([older])[0].propensity == preds[0].propensity
    assert (
        expected(art, older)
        == expected(art, seqs[0])
        != context_features([t[1] for t in older], [t[2] for t in older], [t[0] for t in older])
    )


def test_the_context_buffer_is_reused_per_width_and_zeroed(ctx_model: Artifact) -> None:
    art = Artifact(**{**ctx_model.__dict__, "buffers": {}})
    big = [user(art, art.max_len + 5) for _ in range(6)]
    art.score(big)
    buf = art.buffers[art.max_len]["context"]
    assert buf.shape == (6, N_CONTEXT) and buf.dtype == np.float32
    alone = art.score([user(art, art.max_len)])[0].propensity
    assert art.buffers[art.max_len]["context"] is buf  # the same rows, no new allocation
    assert art.score([[], user(art, art.max_len)])[1].propensity == alone  # an empty row stays zero
    assert not buf[0].any()


def test_the_probe_batch_exercises_the_context(ctx_model: Artifact) -> None:
    rows = [expected(ctx_model, seq) for seq in probe_batch(ctx_model)]
    no_purchase = CONTEXT_NAMES.index("no_purchase")
    assert {r[no_purchase] for r in rows} == {0.0, 1.0}
    assert len({tuple(r) for r in rows}) == len(rows)  # every probe row a different context
    assert ctx_model.score(probe_batch(ctx_model))  # scored in one batch (load_artifact did it too)


def test_an_old_artifact_serves_as_before(tmp_path: Path) -> None:
    art = load_artifact(DEMO_MODEL, "cpu")
    assert not art.with_context and art.thresholds is None
    art.score([user(art, 5)])
    assert all("context" not in b for b in art.buffers.values())


@pytest.mark.parametrize(
    ("names", "width", "says"),
    [
        (
            [*CONTEXT_NAMES[:-1], "is_weekend"],
            N_CONTEXT,
            f"feature {N_CONTEXT - 1}: 'is_weekend' there, 'weekend' here",
        ),
        (list(reversed(CONTEXT_NAMES)), N_CONTEXT, "another version of streams.features"),
        (list(CONTEXT_NAMES[:-1]), N_CONTEXT - 1, f"this service computes {N_CONTEXT} context features"),
        ([*CONTEXT_NAMES, "extra"], N_CONTEXT + 1, f"this service computes {N_CONTEXT} context features"),
        (list(CONTEXT_NAMES[:-1]), N_CONTEXT, f"{N_CONTEXT - 1} features there, {N_CONTEXT} here"),
    ],
)
def test_context_features_of_another_version_are_refused(
    tmp_path: Path, names: list[str], width: int, says: str
) -> None:
    folder = with_context(tmp_path / "model", width=width, names=names)
    with pytest.raises(ModelError, match=r"manifest\.json") as err:
        load_artifact(folder, "cpu")
    assert says in str(err.value)


def test_a_context_input_needs_its_feature_list_and_a_graph_of_that_width(tmp_path: Path) -> None:
    folder = with_context(tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["context_features"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="without the context_features list"):
        load_artifact(folder, "cpu")
    folder = with_context(tmp_path / "b", width=N_CONTEXT - 2)  # the graph is narrower than the manifest says
    edit_manifest(
        folder, inputs={**manifest["inputs"], "context": {"dtype": "float32", "shape": ["batch", N_CONTEXT]}}
    )
    with pytest.raises(ModelError, match=rf"graph's context input has shape \['batch', {N_CONTEXT - 2}\]"):
        load_artifact(folder, "cpu")


def test_the_model_thresholds_come_with_the_artifact(ctx_model: Artifact) -> None:
    assert ctx_model.thresholds == PropensityThresholds(0.31, 0.12, 0.95, 0.8)


@pytest.mark.parametrize(
    "thresholds",
    [
        {"high_intent": 0.2, "reminder": 0.3},  # a likely buyer would get a discount
        {"high_intent": 0.0, "reminder": 0.0},
        {"high_intent": 1.5, "reminder": 0.3},
        {"high_intent": "0.7", "reminder": 0.3},
        {"reminder": 0.3},
        {"high_intent": 0.7, "reminder": 0.3, "reminder_quantile": 80},
        [0.7, 0.5],
    ],
)
def test_thresholds_that_make_no_sense_are_refused(tmp_path: Path, thresholds: Any) -> None:
    shutil.copytree(DEMO_MODEL, tmp_path / "model")
    edit_manifest(tmp_path / "model", propensity_thresholds=thresholds)
    with pytest.raises(ModelError, match="propensity_thresholds"):
        load_artifact(tmp_path / "model", "cpu")


def test_a_context_model_scores_the_propensity_where_the_baseline_recommends(tmp_path: Path) -> None:
    """The propensity branch reads kinds, times and window features, not items: an event of an
    item the model does not know gets the baseline's recommendations and the model's propensity;
    a model without the branch leaves such events unscored, as before."""
    import orjson

    from streams.pipeline import Message, local_pipeline
    from streams.settings import Settings
    from streams.state import user_partition

    def view(eid: str, item: str, minute: int) -> Message:
        e = {
            "schema_version": 1,
            "event_id": eid,
            "type": "view",
            "user_id": "u1",
            "event_time": f"2026-11-30T10:{minute:02d}:00+00:00",
            "item_id": item,
        }
        return Message(user_partition(b"u1", 8), b"u1", orjson.dumps(e), None)

    for folder, scored in ((with_context(tmp_path / "ctx"), True), (DEMO_MODEL, False)):
        settings = Settings(model_dir=folder, promotions=False, inference_provider="cpu")
        pipe = local_pipeline(settings, budget_per_partition=1e9, clock=lambda: 0.0)
        assert pipe.models.current is not None
        pipe.process([view("e1", "never-seen-1", 0)])
        result = pipe.process([view("e2", "never-seen-2", 5)])
        rec = orjson.loads(result.outputs[0].value)
        assert rec["source"] == "baseline"  # unknown items: the model does not recommend
        assert (0 in result.propensity) is scored
        if scored:
            from datetime import UTC, datetime

            t0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC).timestamp()
            kinds = [int(TokenKind.VIEW)] * 2
            mean = float(np.mean(context_features(kinds, [t0, t0 + 300], ["never-seen-1", "never-seen-2"])))
            assert result.propensity[0] == pytest.approx(1 / (1 + np.exp(-mean)), abs=1e-5)
