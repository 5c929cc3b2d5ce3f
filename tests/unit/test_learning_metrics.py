"""The worker's side of the learning loop, against hand-written model folders: the served model's
age from its manifest's ``created_at`` and the last retrain decisions from ``registry.jsonl``, read
when the ``ModelWatcher`` polls and exported at scrape time (``Metrics.watch_models``); and the
step of deploy/k8s and deploy/docker-compose.yml that puts the first model into the shared model
folder. Expected values are unix times worked out by hand (``date -u -d ... +%s``), never
recomputed with the code under test.

Uses copies of the demo artifact shipped in ``deploy/demo/model`` (onnxruntime only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, in the dev extra (no stubs)
from prometheus_client import CollectorRegistry, generate_latest

from exporters.publish import append_registry
from streams.metrics import Metrics
from streams.scoring import ModelWatcher

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "deploy" / "demo" / "model"
NOW = 1_796_162_400.0  # 2026-12-01T22:00:00Z, the scrape's clock
AGE = "shopstream_model_age_seconds"
DECISION = "shopstream_retrain_last_decision_timestamp_seconds"

REGISTRY_LINES = [  # as modeling.retrain appends them (fields the metric does not read left out)
    {"time": "2026-11-20T02:30:00Z", "decision": "published", "reason": "no published model yet"},
    {"time": "2026-11-21T02:30:00Z", "decision": "refused", "reason": "worse by 0.0470"},
    {"time": "2026-11-22T23:30:00.250000Z", "decision": "published", "reason": "not worse"},
    {"time": "2026-11-24T01:30:00+02:00", "decision": "refused", "reason": "an offset, not Z"},
    {"time": "2026-11-24T00:00:00Z", "decision": "skipped", "reason": "not a decision the metric knows"},
    {"decision": "published", "reason": "no time"},
]


def folder_with(tmp_path: Path, created_at: str | None) -> Path:
    """A copy of the demo model whose manifest says it was exported at ``created_at``."""
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if created_at is None:
        del manifest["created_at"]
    else:
        manifest["created_at"] = created_at
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def watched(folder: Path | None) -> tuple[CollectorRegistry, ModelWatcher]:
    registry = CollectorRegistry()
    models = ModelWatcher(folder, "cpu")
    models.load_initial()
    Metrics(registry).watch_models(models, clock=lambda: NOW)
    return registry, models


def write_lines(path: Path, lines: Sequence[Mapping[str, object]]) -> None:
    with path.open("w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def test_model_age_is_seconds_since_the_manifests_created_at(tmp_path: Path) -> None:
    registry, _ = watched(folder_with(tmp_path, "2026-11-01T00:00:00+00:00"))
    assert registry.get_sample_value(AGE) == NOW - 1_793_491_200  # 30 days and 22 hours
    assert registry.get_sample_value(AGE) == 30 * 86400 + 22 * 3600


def test_the_shipped_demo_models_age_and_no_decision_without_a_registry() -> None:
    registry, models = watched(DEMO_MODEL)  # created_at 2026-11-28T17:57:49.550361+00:00
    assert registry.get_sample_value(AGE) == pytest.approx(NOW - 1_795_888_669.550361)
    assert models.decisions == {}
    assert registry.get_sample_value(DECISION, {"decision": "published"}) is None
    text = generate_latest(registry).decode()
    assert f"# TYPE {DECISION} gauge" in text and f"{DECISION}{{" not in text  # declared, no sample


def test_no_age_without_a_model_or_without_created_at(tmp_path: Path) -> None:
    assert watched(None)[0].get_sample_value(AGE) is None  # no model folder configured
    empty = tmp_path / "empty"
    empty.mkdir()
    assert watched(empty)[0].get_sample_value(AGE) is None  # baseline until a model is published
    assert watched(folder_with(tmp_path, None))[0].get_sample_value(AGE) is None


def test_last_decision_of_each_kind_from_a_hand_written_registry(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, "2026-11-01T00:00:00Z")
    path = folder / "registry.jsonl"
    write_lines(path, REGISTRY_LINES)
    with path.open("a") as f:
        f.write("{not json\n")
    registry, models = watched(folder)
    assert models.decisions == {"published": 1_795_390_200.25, "refused": 1_795_476_600.0}
    assert registry.get_sample_value(DECISION, {"decision": "published"}) == 1_795_390_200.25
    assert registry.get_sample_value(DECISION, {"decision": "refused"}) == 1_795_476_600.0  # 11-23T23:30Z
    assert registry.get_sample_value(DECISION, {"decision": "skipped"}) is None


async def test_polls_read_only_what_was_appended_and_wait_for_a_whole_line(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, "2026-11-01T00:00:00Z")
    path = folder / "registry.jsonl"
    write_lines(path, REGISTRY_LINES[:1])
    registry, models = watched(folder)
    assert models.decisions == {"published": 1_795_141_800.0}
    assert registry.get_sample_value(DECISION, {"decision": "refused"}) is None

    line = json.dumps({"time": "2026-12-01T21:58:41.123456Z", "decision": "refused"}) + "\n"
    with path.open("a") as f:  # a retrain in the middle of appending its line
        f.write(line[:20])
    assert await models.poll() is False  # the manifest did not change: no reload
    assert models.decisions == {"published": 1_795_141_800.0}
    with path.open("a") as f:
        f.write(line[20:])
    await models.poll()
    assert registry.get_sample_value(DECISION, {"decision": "refused"}) == 1_796_162_321.123456
    assert registry.get_sample_value(DECISION, {"decision": "published"}) == 1_795_141_800.0

    # what exporters.publish appends (the writer the retrain uses) reads the same way
    append_registry(folder, {"time": "2026-12-01T22:00:00Z", "decision": "published", "reason": "x"})
    await models.poll()
    assert models.decisions == {"published": NOW, "refused": 1_796_162_321.123456}


async def test_a_replaced_registry_is_read_again_and_a_removed_one_clears(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, "2026-11-01T00:00:00Z")
    path = folder / "registry.jsonl"
    write_lines(path, REGISTRY_LINES)
    registry, models = watched(folder)
    assert set(models.decisions) == {"published", "refused"}

    replacement = folder / "registry.new"
    write_lines(replacement, REGISTRY_LINES[1:2])  # a shorter file put in its place
    replacement.replace(path)
    await models.poll()
    assert models.decisions == {"refused": 1_795_228_200.0}

    path.unlink()
    await models.poll()
    assert models.decisions == {}
    assert registry.get_sample_value(DECISION, {"decision": "refused"}) is None
    assert registry.get_sample_value(AGE) == NOW - 1_793_491_200  # the model still serves


def seed_commands() -> dict[str, list[str]]:
    """The model-seed step as deploy/k8s (the workers' init container) and compose run it."""
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "statefulset.yaml").read_text())
    init = next(c for c in pod["spec"]["template"]["spec"]["initContainers"] if c["name"] == "seed-model")
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]["model-seed"]
    return {"k8s": init["command"], "compose": [*compose["entrypoint"], *compose["command"]]}


def test_the_seed_step_publishes_the_first_model_once_under_concurrent_pods(tmp_path: Path) -> None:
    commands = seed_commands()
    assert commands["k8s"][:3] == commands["compose"][:3]  # one script: python -c SCRIPT SOURCE FOLDER
    assert commands["k8s"][3:] == ["/opt/shopstream/demo/model", "$(SHOPSTREAM_MODEL_DIR)"]
    assert commands["compose"][3:] == ["/models/current", "/models/live"]
    script = commands["k8s"][2]
    folder = tmp_path / "live"
    folder.mkdir()
    seeds = [  # three worker pods starting at once on an empty shared folder
        subprocess.Popen(
            [sys.executable, "-c", script, str(DEMO_MODEL), str(folder)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in seeds)
    assert [p.returncode for p in seeds] == [0, 0, 0], outputs
    version = json.loads((DEMO_MODEL / "manifest.json").read_text())["model_version"]
    assert outputs == [*[f"{folder} already holds a model"] * 2, f"seeded {folder} with {version}"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["graph"], manifest["vocab"]) == (f"model-{version}.onnx", f"vocab-{version}.json")
    registry, models = watched(folder)  # what the workers then load
    assert models.current is not None and models.current.version == version
    assert registry.get_sample_value(AGE) == pytest.approx(NOW - 1_795_888_669.550361)
