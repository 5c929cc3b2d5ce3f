"""The Grafana dashboard and alert rules, proven against a real Prometheus scraping a real worker
and a real archiver.

A worker (with the shipped demo model) processes real-looking traffic - model recommendations,
dead letters, review recovery, cart abandonment with a holdout user, frequency-cap suppression -
while an archiver (``shopstream archive``, rolling every second) writes the same input to Parquet
and a real Prometheus (the Debian ``prometheus`` binary) scrapes both every second and evaluates
``deploy/prometheus/alerts.yml``. Then every panel query of
``deploy/grafana/dashboards/shopstream.json`` (template variables substituted) must be valid and
return data, and every alert rule must evaluate without error. The worker's model folder is a copy
of the demo model written by hand for the Learning row: its manifest says it was exported 10 days
ago and its ``registry.jsonl`` holds a published and a refused retrain, so the model age, the
decision times and the two learning alerts they trip have known answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, in the dev extra (no stubs)

from streams.admin import ensure_topics
from streams.promotions import in_holdout
from streams.settings import Settings
from streams.state import user_partition
from tests.conftest import IN_CI
from tests.integration.harness import (
    ROOT,
    WorkerProcess,
    collect,
    free_port,
    isolated_env,
    produce,
    settings_of,
)

pytestmark = pytest.mark.integration
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "shopstream.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ARCHIVER = ROOT / "deploy" / "k8s" / "base" / "archive.yaml"
T0 = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
SUBSTITUTIONS = {"$__rate_interval": "30s", "$job": ".+", "$archive_job": ".+"}
# The hand-written model folder: exported 10 days ago, published 3 days ago, refused 2.5 days ago
EXPORTED = T0 - timedelta(days=10)
DECISIONS = {"published": T0 - timedelta(days=3), "refused": T0 - timedelta(days=2, hours=12)}


def learning_folder(work: Path) -> Path:
    """A copy of the demo model with a hand-written export time and retrain registry."""
    folder = work / "model"
    shutil.copytree(ROOT / "deploy" / "demo" / "model", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["created_at"] = EXPORTED.isoformat()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    lines = [{"time": at.isoformat().replace("+00:00", "Z"), "decision": d} for d, at in DECISIONS.items()]
    (folder / "registry.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"`{name}` not installed (Debian package prometheus; .ci/run installs it)"
        if IN_CI:
            pytest.fail(f"CI=true and {msg}")
        pytest.skip(msg)
    return path


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


@dataclass
class Archiver:
    """The ``shopstream archive`` process of the stack, its environment and its log."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture(scope="module")
def stack(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess, str, Archiver]]:
    prometheus = binary("prometheus")
    work = tmp_path_factory.mktemp("dashboard")
    env = isolated_env(
        kafka_bootstrap,
        work,
        SHOPSTREAM_MODEL_DIR=str(learning_folder(work)),
        SHOPSTREAM_INFERENCE_PROVIDER="cpu",
        SHOPSTREAM_METRICS_INTERVAL_S="1",
        SHOPSTREAM_PROMOTION_TICK_S="0.5",
        SHOPSTREAM_CART_ABANDON_AFTER_S="600",
        SHOPSTREAM_QUIET_HOURS="",
        SHOPSTREAM_HOLDOUT_PERCENT="50",
        SHOPSTREAM_FREQUENCY_CAP="1",
    )
    settings = settings_of(env)
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(env, work / "worker.log").start()
    archive_port = free_port()
    archive_env = {
        **os.environ,
        **env,
        "SHOPSTREAM_ARCHIVE_DIR": str(work / "archive"),
        "SHOPSTREAM_ARCHIVE_METRICS_PORT": str(archive_port),
        "SHOPSTREAM_ARCHIVE_ROLL_S": "1",
        "PYTHONUNBUFFERED": "1",
    }
    archive_env.pop("PYTEST_CURRENT_TEST", None)
    with (work / "archive.log").open("wb") as log:
        archiver = subprocess.Popen(
            [sys.executable, "-m", "streams", "archive"],
            cwd=ROOT,
            env=archive_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    port = free_port()
    shutil.copy(ALERTS, work / "alerts.yml")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        "  - job_name: shopstream\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{settings.web_port}']}}]\n"
        "  - job_name: shopstream-archive\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{archive_port}']}}]\n"
    )
    with (work / "prometheus.log").open("wb") as log:
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # traffic only once Prometheus has scraped a ready worker: counters first seen after a
        # burst show no increase, and the no-output alert then stays pending (a busy CI run)
        scraped_ready(f"http://127.0.0.1:{port}", worker)
        yield (
            settings,
            worker,
            f"http://127.0.0.1:{port}",
            Archiver(archiver, archive_env, work / "archive.log"),
        )
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        worker.stop()
        archiver.terminate()
        archiver.wait(timeout=60)


def scraped_ready(prom: str, worker: WorkerProcess, timeout: float = 300.0) -> None:
    """Wait until Prometheus holds a sample of the worker saying it is ready."""
    query = urllib.parse.urlencode({"query": 'shopstream_ready{job="shopstream"} == 1'})
    deadline = time.monotonic() + timeout
    while True:
        try:
            if get(f"{prom}/api/v1/query?{query}")["data"]["result"]:
                return
        except OSError:  # Prometheus not listening yet
            pass
        assert time.monotonic() < deadline, f"Prometheus never scraped a ready worker\n{worker.tail()}"
        assert worker.alive(), worker.tail()
        time.sleep(1)


def event(etype: str, user: str, eid: str, t: float, **fields: Any) -> bytes:
    at = (T0 + timedelta(seconds=t)).isoformat().replace("+00:00", "Z")
    ev = {"schema_version": 1, "type": etype, "event_id": eid, "user_id": user, "event_time": at, **fields}
    return orjson.dumps(ev)


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in SUBSTITUTIONS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {p['title']!r}: {expr}"
            out.append((p["title"], expr))
    return out


async def test_every_panel_query_returns_data_and_every_alert_rule_evaluates(
    stack: tuple[Settings, WorkerProcess, str, Archiver],
) -> None:
    settings, worker, prom, archiver = stack
    items: list[str] = json.loads((ROOT / "deploy" / "demo" / "model" / "vocab.json").read_text())["items"]
    pool = [f"dash-{i}" for i in range(300)]
    target = user_partition(pool[0].encode(), settings.partitions)
    same = [u for u in pool if user_partition(u.encode(), settings.partitions) == target]
    held = [u for u in same if in_holdout(u, 50)][:2]  # [reviewer, cart owner] in the holdout
    sent = [u for u in same if not in_holdout(u, 50)][:3]  # [reviewer, cart owner, ticker]
    ticker = sent[2]
    t = 0.0
    for wave in range(6):  # traffic spread over several scrapes, so rates have two samples
        records: list[tuple[str, bytes | None, bytes | None]] = [
            (
                settings.topic_views,
                None,
                event("view", f"v-{i % 9}", f"w{wave}-v{i}", t + i, item_id=items[i]),
            )
            for i in range(20)
        ]
        records.append((settings.topic_views, None, b"{not json"))  # a dead letter
        for user in (held[0], sent[0]):  # two low reviews each: one recovery, one past the cap of 1
            for k in range(2):
                review = event("review", user, f"w{wave}-r-{user}-{k}", t + k, item_id="x", rating=1)
                records.append((settings.topic_reviews, None, review))
        if wave == 0:
            for user in (held[1], sent[1]):
                cart = event(
                    "cart", user, f"c-{user}", t, action="add", item_id="sku", quantity=1, unit_price=9.0
                )
                records.append((settings.topic_carts, None, cart))
        if wave == 2:  # moves the partition's event-time clock past both carts
            records.append(
                (settings.topic_views, None, event("view", ticker, "tick", 3600, item_id=items[0]))
            )
        if wave == 3:  # both cart owners order after their promotion: a treated and a holdout outcome
            for user in (held[1], sent[1]):
                line = {"item_id": "sku", "quantity": 1, "unit_price": 9.0}
                order = event("order", user, f"o-{user}", 3700, order_id=f"o-{user}", lines=[line])
                records.append((settings.topic_orders, None, order))
        await produce(settings, records)
        t += 30
        await asyncio.sleep(1.5)

    def carts(rs: list[Any]) -> int:
        return sum(b'"cart_abandonment"' in (r.value or b"") for r in rs)

    promos = await collect(
        settings, settings.topic_promotions, lambda rs: carts(rs) >= 2, timeout=60, worker=worker
    )
    assert carts(promos) == 2, [r.value for r in promos]

    base = f"http://127.0.0.1:{settings.web_port}"
    assert get(f"{base}/healthz") == {"status": "ok"}
    assert get(f"{base}/readyz") == {
        "ready": True,
        "consuming": True,
        "tables_recovered": True,
        "model_loaded": True,
        "progressing": True,
    }
    fetching = get(f"{base}/debug/consumer")
    assert (fetching["flow_active"], fetching["in_recovery"]) == (True, False), fetching
    views = [p for p in fetching["partitions"] if p["topic"] == settings.topic_views]
    assert sorted(p["partition"] for p in views) == list(range(settings.partitions)), fetching
    for p in views:  # one worker: it fetches every partition, none waits on a reset or a pause
        assert (p["active"], p["paused"], p["kafka"]["awaiting_reset"], p["kafka"]["paused"]) == (
            True,
            False,
            False,
            False,
        ), p
        assert p["kafka"]["position"] is not None, p

    queries = panel_queries()
    assert len(queries) >= 20
    deadline = time.monotonic() + 90
    while True:
        empty = []
        for title, expr in queries:
            answer = get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            assert answer["status"] == "success", (title, expr, answer)
            if not answer["data"]["result"]:
                empty.append((title, expr))
        if not empty:
            break
        assert time.monotonic() < deadline, f"panels without data: {empty}"
        assert worker.alive(), worker.tail()
        assert archiver.proc.poll() is None, archiver.tail()
        await asyncio.sleep(2)

    # the Learning row's known answers: what the hand-written model folder says, through Prometheus
    def latest(expr: str) -> dict[str, float]:
        answer = get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        return {r["metric"].get("decision", ""): float(r["value"][1]) for r in answer["data"]["result"]}

    decisions = latest("shopstream_retrain_last_decision_timestamp_seconds")
    assert decisions == {d: at.timestamp() for d, at in DECISIONS.items()}
    (age,) = latest("shopstream_model_age_seconds").values()
    assert 0 <= time.time() - EXPORTED.timestamp() - age < 120  # as of a scrape seconds ago

    # the worker under test serves a model and publishes: these alerts must not stay pending. A
    # rule evaluated before the first recommendations were scraped is pending until Prometheus
    # evaluates it again, so wait for an evaluation that has seen the output (not one snapshot).
    # The learning alerts answer what the model folder says (a 10-day-old model, no decision for
    # 2.5 days: pending, as both wait an hour) and what a healthy archiver shows (inactive).
    learning = {
        "ShopstreamModelStale": "pending",
        "ShopstreamRetrainOverdue": "pending",
        "ShopstreamArchiveLagGrowing": "inactive",
        "ShopstreamArchiveNotCommitting": "inactive",
    }
    deadline = time.monotonic() + 240  # several evaluation rounds on a busy machine
    while True:
        rules = get(f"{prom}/api/v1/rules")["data"]["groups"]
        evaluated = [r for g in rules for r in g["rules"]]
        assert len(evaluated) == 11
        assert all(r["health"] == "ok" for r in evaluated), [
            (r["name"], r.get("lastError")) for r in evaluated
        ]
        states = {r["name"]: r["state"] for r in evaluated}
        firing = {name for name, state in states.items() if state != "inactive"}
        if (
            not firing & {"ShopstreamModelNotLoaded", "ShopstreamNoOutput"}
            and learning.items() <= states.items()
        ):
            break
        assert time.monotonic() < deadline, {
            "not inactive": sorted(firing),
            "learning alerts": {name: states.get(name) for name in learning},
        }
        await asyncio.sleep(2)


def test_the_archivers_kubernetes_liveness_probe_passes_against_a_running_archiver(
    stack: tuple[Settings, WorkerProcess, str, Archiver],
) -> None:
    archiver = stack[3]
    container = yaml.safe_load(ARCHIVER.read_text())["spec"]["template"]["spec"]["containers"][0]
    command = container["livenessProbe"]["exec"]["command"]  # as the kubelet runs it, in the image
    assert command[0] == "python"
    probe = subprocess.run(
        [sys.executable, *command[1:]], env=archiver.env, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr + archiver.tail()


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    promtool = binary("promtool")
    checks = (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],  # the learning alerts on hand-written series
    )
    for args in checks:
        out = subprocess.run(
            [promtool, *args], cwd=ROOT / "deploy" / "prometheus", capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
