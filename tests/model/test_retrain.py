"""``shopstream retrain`` on the shipped REES46 sample: a first challenger is published into an empty
folder and the worker's loader serves it; a deliberately worse one is refused and leaves the folder
byte for byte; a crash between the graph and the manifest leaves the old manifest serving. The
champion/challenger scorer and the decision have known-answer tests on hand-made arrays.

Two tiny trainings in all (module-scoped fixtures share them)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from exporters import publish as pub
from modeling import retrain as rt
from modeling.sequences import Cases, Vocab
from modeling.train import PRESETS
from streams.cli import main
from streams.features import N_CONTEXT
from streams.scoring import Artifact, ModelWatcher, load_artifact
from streams.state import TokenKind

WORSE = {"epochs": 1, "lr": 0.0, "repeat": False, "d_model": 8}  # an untrained model, no repeat bonus


def served_bytes(folder: Path) -> dict[str, bytes]:
    """What a worker may read: every file but the registry and the hidden run and lock files."""
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.is_file() and p.name != pub.REGISTRY and not p.name.startswith(".")
    }


def registry(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / pub.REGISTRY).read_text().splitlines()]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """A first retrain through the command line into an empty folder."""
    folder = tmp_path_factory.mktemp("retrain") / "model"
    out = io.StringIO()
    argv = ["retrain", "--data", "rees46-demo", "--model-dir", str(folder), "--set", "epochs=2", "--no-eval"]
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return {
        "folder": folder,
        "rc": rc,
        "stdout": out.getvalue(),
        "files": served_bytes(folder),
        "lines": registry(folder),
    }


@pytest.fixture(scope="module")
def refused(published: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """A second retrain of a deliberately worse configuration into the same folder."""
    folder = published["folder"]
    before = served_bytes(folder)
    entry = rt.retrain(
        "rees46-demo", folder, data_dir, overrides=WORSE, evaluate_run=False, say=lambda _: None
    )
    return {"entry": entry, "before": before, "after": served_bytes(folder), "lines": registry(folder)}


def test_a_first_retrain_publishes_into_an_empty_folder_and_the_worker_loads_it(
    published: dict[str, Any],
) -> None:
    assert published["rc"] == 0
    folder, out = published["folder"], published["stdout"]
    manifest = json.loads(published["files"]["manifest.json"])
    version = manifest["model_version"]
    # version-named files, a manifest copy for rollback, the manifest naming them
    assert manifest["graph"] == f"model-{version}.onnx" and manifest["vocab"] == f"vocab-{version}.json"
    assert set(published["files"]) == {
        "manifest.json",
        f"manifest-{version}.json",
        f"model-{version}.onnx",
        f"vocab-{version}.json",
        f"prices-{version}.json",  # the sample has prices: the artifact carries its price reference
    }
    assert manifest["price_reference"]["file"] == f"prices-{version}.json"
    art = load_artifact(folder, provider="cpu")
    assert art.version == version and len(art.vocab) > 100
    assert art.prices is not None and art.prices.fitted["until"] == line_split_start(published)
    [line] = published["lines"]
    assert line["decision"] == "published" and line["champion"] is None
    assert line["challenger"]["version"] == version and line["metric"] == "serving-NDCG@10"
    assert line["data"]["spec"] == "rees46-demo" and set(line["data"]["split"]) == {
        "valid_start",
        "test_start",
        "test_end",
    }
    metrics = line["challenger"]["metrics"]
    assert metrics["cases"] == line["data"]["held_out_cases"] > 100
    assert 0 < metrics["serving-NDCG@10"] <= metrics["NDCG@10"] < 1
    assert "decision: published: no published model yet" in out and version in out


def test_a_worse_challenger_is_refused_and_leaves_the_folder_byte_for_byte(refused: dict[str, Any]) -> None:
    entry = refused["entry"]
    metric = entry["metric"]
    champion, challenger = entry["champion"]["metrics"][metric], entry["challenger"]["metrics"][metric]
    assert champion - challenger > 5 * rt.DEFAULT_MARGIN  # worse by the margin, with room to spare
    assert entry["decision"] == "refused" and "worse by" in entry["reason"]
    assert refused["after"] == refused["before"]
    first, second = refused["lines"]
    assert second == entry and second["champion"]["version"] == first["challenger"]["version"]
    # both models scored on the same held-out cases
    assert entry["champion"]["metrics"]["cases"] == entry["challenger"]["metrics"]["cases"]
    summary = rt.summary(entry, Path("m"))
    assert "decision: refused" in summary and f"{challenger:.4f}" in summary and f"{champion:.4f}" in summary


def test_an_int8_challenger_is_scored_as_it_would_serve(
    published: dict[str, Any], tmp_path: Path, data_dir: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(published["folder"], folder, ignore=shutil.ignore_patterns(".runs"))
    argv = ["retrain", "--data", "rees46-demo", "--model-dir", str(folder), "--set", "epochs=2", "--no-eval"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--catalogue", "int8", "--candidates", "150"]) == 0
    entry = registry(folder)[-1]
    assert entry["decision"] in {"published", "refused"}  # either way, decided on the int8 graph
    assert entry["champion"]["version"] == published["lines"][0]["challenger"]["version"]
    staged = Path(entry["challenger"]["run"]) / "artifact"
    manifest = json.loads((staged / "manifest.json").read_text())
    assert manifest["catalogue"]["product"] == "int8" and manifest["catalogue"]["candidates"] == 150
    assert manifest["catalogue"]["top10_kept"] >= 0.99  # the exporter's own check, on the run's test cases
    graph = onnx.load(str(staged / manifest["graph"])).graph
    assert "DynamicQuantizeMatMul" in {n.op_type for n in graph.node}
    # the decision's figures are the staged int8 graph's, on the same cases as the champion's
    _, held = rt.held_out_split("rees46-demo", data_dir, PRESETS["events"].model.get("max_len", 50))
    again = rt.score_model(load_artifact(staged, provider="cpu"), held)
    assert again == entry["challenger"]["metrics"]
    assert entry["champion"]["metrics"]["cases"] == again["cases"]


async def test_a_crash_between_the_graph_and_the_manifest_leaves_the_old_version_serving(
    published: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(published["folder"], folder, ignore=shutil.ignore_patterns(".runs"))
    old = json.loads((folder / "manifest.json").read_text())["model_version"]
    # the published run's export, as a new version (the same graph: its checksums still hold)
    staging = tmp_path / "staging"
    shutil.copytree(Path(published["lines"][0]["challenger"]["run"]) / "artifact", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    new = manifest["model_version"] = f"{old}-next"
    (staging / "manifest.json").write_text(json.dumps(manifest))
    watcher = ModelWatcher(folder, provider="cpu")
    watcher.load_initial()
    before = (folder / "manifest.json").read_bytes()
    write = pub.write_atomic

    def crash_at_the_manifest(path: Path, data: bytes | Path) -> None:
        if path.name == "manifest.json":
            raise OSError("simulated crash before the manifest")
        write(path, data)

    monkeypatch.setattr(pub, "write_atomic", crash_at_the_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        pub.publish(staging, folder)
    assert (folder / f"model-{new}.onnx").is_file()  # the graph was written, the manifest not
    assert (folder / "manifest.json").read_bytes() == before
    assert load_artifact(folder, provider="cpu").version == old
    assert not await watcher.poll()
    monkeypatch.setattr(pub, "write_atomic", write)
    pub.publish(staging, folder)
    assert await watcher.poll()  # the worker's hot reload takes the version-named files
    assert watcher.current is not None and watcher.current.version == new


def test_candidates_without_the_int8_catalogue_are_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["retrain", "--data", "rees46-demo", "--model-dir", str(tmp_path / "m"), "--candidates", "50"]
    assert main(argv) == 1
    assert "the int8 catalogue's (--catalogue int8)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # nothing trained, nothing written


def test_window_days_apply_to_archives_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["retrain", "--data", "rees46-demo", "--model-dir", str(tmp_path), "--window-days", "3"]
    assert main(argv) == 1
    assert "--window-days applies to archive:DIR data only" in capsys.readouterr().err
    spec = rt.windowed("archive:var/archive", 2, now=1_700_000_000 + 2 * 86400)
    assert spec.startswith("archive:var/archive?since=2023-11-14T22:13:20") and "tz=UTC" in spec
    # the split's zone as `shopstream train` gives it, unless the spec names one
    assert rt.windowed("archive:a", None, "Europe/Berlin") == "archive:a?tz=Europe/Berlin"
    assert rt.windowed("archive:a?tz=Asia/Shanghai", None, "Europe/Berlin") == "archive:a?tz=Asia/Shanghai"


def test_a_champion_that_does_not_load_stops_the_retrain_before_training(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "model_version": "x"}')
    with pytest.raises(rt.RetrainError, match=r"does not load.*--replace-broken"):
        rt.retrain("rees46-demo", tmp_path, tmp_path, say=lambda _: None)
    assert not (tmp_path / pub.REGISTRY).exists() and not (tmp_path / ".runs").exists()


class FakeSession:
    """An onnxruntime session that returns fixed top-K outputs and records what it was fed."""

    def __init__(self, top_items: list[list[int]], top_scores: list[list[float]]) -> None:
        self.outputs = (np.array(top_items), np.array(top_scores, dtype=np.float32))
        self.fed: dict[str, np.ndarray] = {}

    def get_inputs(self) -> list[Any]:
        return [type("Input", (), {"name": n})() for n in ("items", "kinds", "gaps", "context")]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.fed = feeds
        n = len(feeds["items"])
        return [*self.outputs, np.full(n, 0.5, dtype=np.float32)]


def artifact(vocab: list[str], session: FakeSession) -> Artifact:
    index = {item: i + 2 for i, item in enumerate(vocab)}
    return Artifact("v", Path("."), session, "cpu", vocab, index, 3, 3, False, "")


def test_challenger_and_champion_are_scored_on_raw_ids_with_their_own_vocabularies() -> None:
    # one case: the user viewed a, d, b; the next item is c; serving would not show b (the event's own)
    names = Vocab(items=["a", "b", "c", "d"], index={"a": 2, "b": 3, "c": 4, "d": 5})
    view = int(TokenKind.VIEW)
    cases = Cases(
        items=np.array([[2, 5, 3]]),
        kinds=np.array([[view] * 3]),
        gaps=np.array([[1, 2, 2]]),
        targets=np.array([4]),
        bought=np.array([-1]),
        context=np.zeros((1, N_CONTEXT), dtype=np.float32),
        serving_exclude=[[3]],
    )
    held = rt.HeldOut(names, serving=True, by_len={3: cases})
    # the challenger knows c (its id 2) and returns b, c, a: c at rank 1, at rank 0 once b is dropped
    challenger = FakeSession([[3, 2, 4]], [[0.9, 0.8, 0.7]])
    got = rt.score_model(artifact(["c", "b", "a"], challenger), held)
    assert list(challenger.fed["items"][0]) == [4, 1, 3]  # a, d (unknown to it: UNK), b
    assert got["NDCG@10"] == pytest.approx(1 / np.log2(3)) and got["HR@10"] == 1.0
    assert got["serving-NDCG@10"] == 1.0 and got["serving-HR@10"] == 1.0
    assert got["known_targets"] == 1.0 and got["ROC-AUC"] is None  # no labelled case
    # the champion does not know c: a miss whatever it returns
    champion = FakeSession([[2, 3, 4]], [[0.9, 0.8, 0.7]])
    got = rt.score_model(artifact(["a", "b", "d"], champion), held)
    assert list(champion.fed["items"][0]) == [2, 4, 3]
    assert got["NDCG@10"] == got["HR@10"] == got["serving-NDCG@10"] == got["known_targets"] == 0.0


def test_topk_ranks_count_ties_as_half_and_propensity_auc_uses_labelled_cases() -> None:
    top = np.array([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    scores = np.array([[0.9, 0.9, 0.1], [0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    ranks = rt.topk_ranks(top, scores, np.array([6, 8, 1]))
    assert list(ranks) == [0.5, np.inf, np.inf]  # a tie with the top item; absent; UNK
    out = rt.case_metrics(top, scores, np.array([0.9, 0.1, 0.7]), np.array([6, 8, 1]), np.array([1, 0, -1]))
    assert out["ROC-AUC"] == 1.0 and out["known_targets"] == pytest.approx(2 / 3)


def test_the_decision_allows_the_margin_and_no_more() -> None:
    assert rt.decide("NDCG@10", {"NDCG@10": 0.2995}, {"NDCG@10": 0.3}, 0.001)[0]
    assert rt.decide("NDCG@10", {"NDCG@10": 0.31}, {"NDCG@10": 0.3}, 0.001) == (
        True,
        "NDCG@10 0.3100 against the champion's 0.3000: better by 0.0100",
    )
    publish, reason = rt.decide("NDCG@10", {"NDCG@10": 0.298}, {"NDCG@10": 0.3}, 0.001)
    assert not publish and reason.endswith("worse by 0.0020, more than the margin 0.001")
    with pytest.raises(rt.RetrainError, match="undefined"):
        rt.decide("ROC-AUC", {"ROC-AUC": None}, {"ROC-AUC": 0.6}, 0.001)


def line_split_start(published: dict[str, Any]) -> str:
    """The validation start of the published run's split, as the price reference spells it."""
    return datetime.fromisoformat(published["lines"][0]["data"]["split"]["valid_start"]).isoformat()


def test_pruning_keeps_the_kept_versions_and_what_the_manifest_names(tmp_path: Path) -> None:
    for v in ("v1", "v2", "v3", "v4", "v5", "orphan"):
        for name in (f"model-{v}.onnx", f"vocab-{v}.json", f"manifest-{v}.json", f"prices-{v}.json"):
            (tmp_path / name).write_text(v)
    (tmp_path / ".model-v6.onnx.tmp-123").write_text("half")  # a crashed publish
    (tmp_path / "model.onnx").write_text("exported by hand")  # not ours: never touched
    current = {  # rolled back
        "model_version": "v1",
        "graph": "model-v1.onnx",
        "vocab": "vocab-v1.json",
        "price_reference": {"file": "prices-v1.json"},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(current))
    removed = pub.prune(tmp_path, {"v3", "v4", "v5"})
    left = {p.name for p in tmp_path.iterdir()}
    assert {"model-v1.onnx", "vocab-v1.json", "manifest-v1.json", "prices-v1.json", "model.onnx"} <= left
    assert "manifest.json" in left and {f"prices-{v}.json" for v in ("v3", "v4", "v5")} <= left
    assert not any(v in name for name in left for v in ("v2", "orphan", "v6"))
    assert {f"model-{v}.onnx" for v in ("v3", "v4", "v5")} <= left
    assert ".model-v6.onnx.tmp-123" in removed


def test_the_window_ends_at_the_newest_archived_event(tmp_path: Path) -> None:
    from datetime import timedelta

    from tests.unit.test_archive import T0, event, write

    root = str(tmp_path / "archive")
    newest = T0 + timedelta(days=3, hours=5, minutes=7)
    write(root, [event("e1", at=T0), event("e2", at=newest)], [event("e3", at=T0 + timedelta(days=1))])
    spec = rt.windowed(f"archive:{root}", 1)  # last year's data: not measured from the wall clock
    assert f"since={(newest - timedelta(days=1)).replace(tzinfo=None).isoformat()}" in spec
    with pytest.raises(rt.RetrainError, match="no archived events"):
        rt.windowed(f"archive:{tmp_path / 'empty'}", 1)
