"""A model that loads but fails on real input: a reload is refused after the probe batch and the
old version keeps serving; at run time ``score_safely`` turns a failure into None (the caller
answers from the baseline), counts it and logs it once a minute without the users' data.

Uses the demo artifact shipped in ``deploy/demo/model`` (onnxruntime only) and copies of it whose
onnxruntime session is made to fail."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from streams import scoring
from streams.scoring import UNK, Artifact, ModelError, ModelWatcher, load_artifact, probe_batch, warm_up
from streams.state import MAX_FEATURES, TokenKind

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "deploy" / "demo" / "model"


class FailsOnUnknownItems(ort.InferenceSession):  # type: ignore[misc]
    """A session that passes warm-up (known items only) and raises on the first unknown item, as a
    graph with a bad gather index would."""

    def run(self, output_names: Any, input_feed: dict[str, np.ndarray], run_options: Any = None) -> Any:
        if (input_feed["items"] == UNK).any():
            raise RuntimeError(
                "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data bounds"
            )
        return super().run(output_names, input_feed, run_options)


class Raises:
    """Stands in for a loaded session that fails on every run."""

    def run(self, output_names: Any, input_feed: Any) -> Any:
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code")


class ReturnsPadding:
    """A working session whose top items include PAD (0): decoding would wrap to vocab[-2]."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, output_names: Any, input_feed: Any) -> Any:
        top_items, top_scores, propensity = self.session.run(output_names, input_feed)
        top_items = top_items.copy()
        top_items[0, 0] = 0
        return top_items, top_scores, propensity


@pytest.fixture(scope="module")
def demo() -> Artifact:
    return load_artifact(DEMO_MODEL, "cpu")


def new_version(folder: Path, version: str) -> None:
    """Publish another model version in ``folder`` (same graph, new manifest)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model_version"] = version
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_probe_batch_looks_like_real_users(demo: Artifact) -> None:
    rows = probe_batch(demo)
    lengths = [len(r) for r in rows]
    assert len(rows) >= 5 and 1 in lengths and demo.max_len in lengths and max(lengths) > demo.max_len
    tokens = [t for r in rows for t in r]
    assert any(not demo.knows(t[0]) and t[0] for t in tokens)  # unknown items
    assert any(t[0] == "" for t in tokens)  # searches without a clicked item
    assert {t[1] for t in tokens} == {int(k) for k in TokenKind}
    assert any(len(t[3]) > MAX_FEATURES for t in tokens) and any(not t[3] for t in tokens)
    assert all(demo.knows(r[-1][0]) for r in rows)  # as the pipeline's: the latest item is known
    preds = demo.score(rows)  # the demo model passes it
    assert len(preds) == len(rows) and all(len(p.items) == demo.top_k for p in preds)


def test_a_model_that_fails_only_on_real_input_passes_warm_up_but_not_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: Artifact
) -> None:
    monkeypatch.setattr(ort, "InferenceSession", FailsOnUnknownItems)
    shutil.copytree(DEMO_MODEL, tmp_path / "m")
    with pytest.raises(ModelError, match=r"fails on the probe batch: RuntimeError\(.*out of data bounds"):
        load_artifact(tmp_path / "m", "cpu")
    broken = Artifact(**{**demo.__dict__, "session": FailsOnUnknownItems(str(DEMO_MODEL / "model.onnx"))})
    broken.buffers = {}
    warm_up(broken)  # what load_artifact checked before: not enough


async def test_a_reload_that_fails_the_probe_is_refused_and_the_old_version_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, folder)
    changes: list[tuple[str | None, str]] = []
    watcher = ModelWatcher(
        folder, "cpu", on_change=lambda art, outcome: changes.append((art.version if art else None, outcome))
    )
    watcher.load_initial()
    serving = watcher.current
    assert serving is not None

    new_version(folder, "v2-broken")
    with monkeypatch.context() as m:
        m.setattr(ort, "InferenceSession", FailsOnUnknownItems)
        with caplog.at_level(logging.ERROR, logger="streams.scoring"):
            assert await watcher.poll() is False
    assert watcher.current is serving
    assert changes == [(serving.version, "loaded"), (serving.version, "failed")]
    assert f"model reload refused, still serving {serving.version}" in caplog.text
    assert "probe" in caplog.text
    assert await watcher.poll() is False and len(changes) == 2  # not retried until it changes

    new_version(folder, "v3")  # a fixed graph
    assert await watcher.poll() is True
    assert watcher.current is not None and watcher.current.version == "v3"
    assert changes[-1] == ("v3", "reloaded")


async def test_a_reload_that_raises_anything_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, folder)
    watcher = ModelWatcher(folder, "cpu")
    watcher.load_initial()
    serving = watcher.current

    def vanished(*args: Any) -> Artifact:
        raise FileNotFoundError(folder / "model.onnx")  # replaced while being read

    monkeypatch.setattr(scoring, "load_artifact", vanished)
    new_version(folder, "v2")
    assert await watcher.poll() is False and watcher.current is serving


class Fixed:
    """A session that returns the given outputs whatever its inputs."""

    def __init__(self, *outputs: np.ndarray) -> None:
        self.outputs = outputs

    def run(self, output_names: Any, input_feed: Any) -> Any:
        return self.outputs


@pytest.mark.parametrize("propensity_shape", [(2,), (2, 1)])
def test_outputs_decode_to_each_rows_item_ids_scores_and_propensity(
    demo: Artifact, propensity_shape: tuple[int, ...]
) -> None:
    v = demo.vocab
    ids = np.array([[2, 5, 3], [len(v) + 1, 2, 4]], dtype=np.int64)  # vocabulary index + 2
    scores = np.array([[3.0, 2.5, 1.0], [0.5, 0.25, 0.125]], dtype=np.float32)
    propensity = np.array([0.75, 0.5], dtype=np.float32).reshape(propensity_shape)
    art = Artifact(**{**demo.__dict__, "session": Fixed(ids, scores, propensity), "buffers": {}})
    first, second = art.score(probe_batch(demo)[:2])
    assert first.items == [v[0], v[3], v[1]] and first.scores == [3.0, 2.5, 1.0]
    assert list(second.ranked()) == [(v[-1], 0.5), (v[0], 0.25), (v[2], 0.125)]
    assert (first.propensity, second.propensity) == (0.75, 0.5)
    assert all(type(x) is float for x in [*first.scores, first.propensity])  # plain floats for the records


def test_score_safely_returns_the_scores_of_a_working_model(demo: Artifact) -> None:
    watcher = ModelWatcher(None)
    seqs = probe_batch(demo)
    safe = watcher.score_safely(demo, seqs)
    assert safe is not None and [p.items for p in safe] == [p.items for p in demo.score(seqs)]
    assert watcher.score_safely(demo, []) == [] and watcher.failures == 0


def test_a_failure_at_run_time_gives_none_is_counted_and_logged_once_a_minute(
    demo: Artifact, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Artifact(**{**demo.__dict__, "session": Raises(), "buffers": {}})
    now = [1000.0]
    failed: list[tuple[str, type[Exception]]] = []
    watcher = ModelWatcher(
        None, on_failure=lambda art, exc: failed.append((art.version, type(exc))), clock=lambda: now[0]
    )
    seqs = [[["user-private-item", int(TokenKind.VIEW), 1_700_000_000, [5]]], *probe_batch(demo)]
    with caplog.at_level(logging.ERROR, logger="streams.scoring"):
        for _ in range(3):
            assert watcher.score_safely(broken, seqs) is None
            now[0] += 10.0
        now[0] += 60.0
        assert watcher.score_safely(broken, seqs) is None
    assert watcher.failures == 4 and failed == [(demo.version, RuntimeError)] * 4
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2, logged  # the first, then one a minute later
    assert all(f"model {demo.version} failed on a batch of {len(seqs)}" in m for m in logged)
    assert "2 more failures since the last report, 4 in all" in logged[1]
    assert "RUNTIME_EXCEPTION" in logged[0] and "user-private-item" not in caplog.text


def test_outputs_that_would_decode_to_wrong_items_are_a_failure_not_an_answer(demo: Artifact) -> None:
    bad = Artifact(**{**demo.__dict__, "session": ReturnsPadding(demo.session), "buffers": {}})
    seqs = probe_batch(demo)
    with pytest.raises(ModelError, match="outside the vocabulary"):
        bad.score(seqs)
    watcher = ModelWatcher(None)
    assert watcher.score_safely(bad, seqs) is None and watcher.failures == 1
