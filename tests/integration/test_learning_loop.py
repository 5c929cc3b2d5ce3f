"""The learning loop on a real broker, end to end: the shipped REES46 sample replayed through the
input topics, the archiver writes it as Parquet, ``shopstream retrain`` trains on the archive and
publishes into the folder a running worker serves from, the worker hot-reloads it and its
recommendations carry the new ``model_version``; a second retrain with a deliberately worse
configuration is refused, logged in the registry, and leaves the served files untouched. Then
``shopstream forget`` a user: the archiver lists the erasure, no archive read holds the user, and
``shopstream archive compact`` removes their rows from the files (the worker's side of erasures:
``test_erasure.py``)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from streams.admin import ensure_topics
from streams.archive_read import archive_files, read_erasures, read_events
from streams.replay import replay
from streams.settings import Settings
from streams.sources.datasets import load
from tests.commands import streams_cli
from tests.conftest import IN_CI
from tests.integration.harness import (
    ROOT,
    ArchiverProcess,
    WorkerProcess,
    collect,
    isolated_env,
    produce,
    settings_of,
    values,
)
from tests.integration.test_archive import wait_until_committed

pytestmark = pytest.mark.integration

if importlib.util.find_spec("torch") is None:
    if IN_CI:
        raise RuntimeError(
            "CI=true but torch is missing: install the training extra (pip install -e '.[train]')"
        )
    pytest.skip("torch is not installed: pip install -e '.[train]'", allow_module_level=True)


def retrain(env: dict[str, str], archive: Path, model_dir: Path, *sets: str) -> str:
    """``shopstream retrain`` on the archive; its output (it must exit 0: published or refused)."""
    argv = [
        sys.executable,
        "-m",
        "streams",
        "retrain",
        "--archive",
        str(archive),
        "--model-dir",
        str(model_dir),
    ]
    argv += ["--preset", "events", "--no-eval", *(a for s in sets for a in ("--set", s))]
    done = subprocess.run(
        argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=1200, check=False
    )
    assert done.returncode == 0, f"retrain exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def streams_command(env: dict[str, str], *args: str) -> str:
    done = streams_cli(*args, env=env, timeout=300)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def users_on_disk(archive: Path) -> set[str]:
    """Every user id in the archive's Parquet files, the erasure list ignored."""
    return {
        user
        for stream in ("events", "promotions")
        for path in archive_files(str(archive), stream)
        for user in pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist()
    }


def registry(model_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (model_dir / "registry.jsonl").read_text().splitlines()]


def served_files(model_dir: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file() and p.suffix in (".json", ".onnx")
    }


def versions_answering(settings: Settings, worker: WorkerProcess, items: list[str], tag: str) -> set[str]:
    """Publish views of known items by one user; the model versions of the recommendations that
    answer them (every event is answered)."""
    now = time.time()
    views = [
        {
            "schema_version": 1,
            "type": "view",
            "event_id": f"{tag}-{i}",
            "user_id": f"loop-{tag}",
            "event_time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now + i)),
            "item_id": item,
        }
        for i, item in enumerate(items[:5])
    ]
    asyncio.run(produce(settings, [(settings.topic_views, None, orjson.dumps(v)) for v in views]))
    wanted = {v["event_id"] for v in views}

    def answered(records: Any) -> bool:
        return wanted <= {r["event_id"] for r in values(records)}

    recs = asyncio.run(
        collect(settings, settings.topic_recommendations, answered, timeout=180, worker=worker)
    )
    got = [r for r in values(recs) if r["event_id"] in wanted]
    assert {r["event_id"] for r in got} == wanted, f"unanswered views:\n{worker.tail()}"
    return {r["model_version"] for r in got if r["source"] == "model"}


def test_archive_retrain_publish_and_hot_reload(kafka_bootstrap: str, tmp_path: Path) -> None:
    model_dir, archive = tmp_path / "models", tmp_path / "archive"
    model_dir.mkdir()
    env = isolated_env(
        kafka_bootstrap,
        tmp_path,
        SHOPSTREAM_MODEL_DIR=str(model_dir),  # empty: the worker serves the baseline until a publish
        SHOPSTREAM_MODEL_POLL_S="1",
        SHOPSTREAM_ARCHIVE_DIR=str(archive),
        SHOPSTREAM_ARCHIVE_ROLL_S="2",
        SHOPSTREAM_ARCHIVE_METRICS_PORT="0",
    )
    settings = settings_of(env)
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    archiver = ArchiverProcess(env, tmp_path / "archive.log").start()
    try:
        events = list(load("rees46-demo", settings.datasets_dir))
        asyncio.run(replay(settings, events, progress=False))
        wait_until_committed(settings, archiver)
        assert {e["event_id"] for e in read_events(str(archive))} == {e["event_id"] for e in events}

        out = retrain(env, archive, model_dir, "epochs=2")
        manifest = json.loads((model_dir / "manifest.json").read_text())
        v1 = manifest["model_version"]
        assert [r["decision"] for r in registry(model_dir)] == ["published"], out
        items: list[str] = json.loads((model_dir / manifest["vocab"]).read_text())["items"]
        deadline = time.monotonic() + 300  # poll, load, warm-up and probe on a busy machine
        tag = 0
        while v1 not in versions_answering(settings, worker, items, f"a{tag}"):
            assert time.monotonic() < deadline, f"{v1} never served:\n{worker.tail()}"
            tag += 1

        served = served_files(model_dir)
        out = retrain(env, archive, model_dir, "epochs=1", "lr=0", "repeat=false", "d_model=8")
        decisions = registry(model_dir)
        assert [r["decision"] for r in decisions] == ["published", "refused"], out
        assert "worse by" in decisions[-1]["reason"] and decisions[-1]["champion"]["version"] == v1
        assert served_files(model_dir) == served  # byte for byte
        assert versions_answering(settings, worker, items, "b") == {v1}

        # forget a user: the archiver lists the erasure, reads drop the user, compaction removes them
        user = events[0]["user_id"]
        assert any(e["user_id"] == user for e in read_events(str(archive)))
        streams_command(env, "forget", user)
        deadline = time.monotonic() + 180
        while user not in read_erasures(str(archive)):
            assert time.monotonic() < deadline and archiver.alive(), (
                f"erasure not archived:\n{archiver.tail()}"
            )
            time.sleep(0.5)
        assert not any(e["user_id"] == user for e in read_events(str(archive)))
        assert user in users_on_disk(archive)
        streams_command(env, "archive", "compact", "--root", str(archive))
        assert user not in users_on_disk(archive) and len(users_on_disk(archive)) > 1
    finally:
        archiver.stop()
        worker.stop()
