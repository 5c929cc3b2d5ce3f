"""The README's "Integrate" recipes, run as they are written against a real broker and one worker:
events published with kcat, Kafka's console producer, confluent-kafka and the Java client are each
answered with a schema-valid recommendation; a bad message published with kcat is read back from
the dead-letter topic by kcat and the console consumer with its reason header; kcat reads a
promotion; the consumer-groups tool describes the worker's group.

The recipes are the README's fenced blocks after a ``<!-- recipe: NAME -->`` mark; shell ones run
with ``bash -euo pipefail`` and the worker's settings as their environment (the same variable names
the recipes default), so they talk to this module's topics. Needs kcat, java with the
``jdk.compiler`` module (the source launcher) and Maven or the cached jars: outside CI a missing one
skips its tests, under ``CI=true`` it fails them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from streams.deadletter import H_REASON
from streams.schemas import SCHEMA_DIR
from streams.settings import Settings
from tests.conftest import IN_CI
from tests.integration.harness import ROOT, WorkerProcess, collect, produce, started_worker, values

pytestmark = pytest.mark.integration
KAFKA_SCRIPT = ROOT / "deploy" / "kafka" / "local-kafka.sh"
RECIPE = re.compile(r"<!-- recipe: ([a-z0-9-]+) -->\n```([a-z]+)\n(.*?)\n```\n", re.DOTALL)
RECIPES = {  # name: the fence's language
    "kcat-produce": "sh",
    "kcat-recommendations": "sh",
    "kcat-promotions": "sh",
    "kcat-produce-bad": "sh",
    "kcat-deadletter": "sh",
    "console-produce": "sh",
    "console-recommendations": "sh",
    "console-deadletter": "sh",
    "consumer-groups": "sh",
    "python-producer": "python",
    "java-producer": "java",
    "java-run": "sh",
}
ANSWER_S = 300.0  # a busy CI box may take minutes to start the worker and answer
RUN_S = 180.0  # one run of a recipe: a JVM tool, a first fetch of the tools' jars


def readme_recipes() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for name, lang, text in RECIPE.findall((ROOT / "README.md").read_text()):
        assert name not in found, f"recipe {name} is marked twice in README.md"
        found[name] = (lang, text)
    return found


def need(tool: str, why: str) -> None:
    """Skip (CI: fail) unless ``tool`` is on PATH."""
    if shutil.which(tool) is None:
        msg = f"{tool} not found: {why}"
        if IN_CI:
            pytest.fail(f"CI=true and {msg}")
        pytest.skip(msg)


def need_java_source_launcher() -> None:
    need("java", "install OpenJDK 17 (apt-get install openjdk-17-jre-headless)")
    modules = subprocess.run(["java", "--list-modules"], capture_output=True, text=True, timeout=60).stdout
    if not re.search(r"^jdk\.compiler@", modules, re.MULTILINE):
        msg = "this java has no jdk.compiler module: `java File.java` needs a JDK (openjdk-17-jdk-headless)"
        if IN_CI:
            pytest.fail(f"CI=true and {msg}")
        pytest.skip(msg)


def need_kafka_jars(what: str) -> None:
    """The broker's jars (``fetch``) or the tools' (``tools-fetch``): the README's commands, no-ops
    once cached; Maven fetches them the first time."""
    need("java", "install OpenJDK 17 (apt-get install openjdk-17-jre-headless)")
    done = subprocess.run(
        ["bash", str(KAFKA_SCRIPT), what], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        msg = f"local-kafka.sh {what} failed:\n{done.stderr[-2000:]}"
        if IN_CI or shutil.which("mvn") is not None:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def recipes() -> dict[str, tuple[str, str]]:
    return readme_recipes()


@pytest.fixture(scope="module")
def running(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess]]:
    # promotions at any hour and for every user: the promotions recipe has one to read
    extra = {"SHOPSTREAM_QUIET_HOURS": "", "SHOPSTREAM_HOLDOUT_PERCENT": "0"}
    with started_worker(kafka_bootstrap, tmp_path_factory.mktemp("integrate"), **extra) as running:
        yield running


def run_recipe(
    recipes: dict[str, tuple[str, str]],
    name: str,
    worker: WorkerProcess,
    cwd: Path = ROOT,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one recipe as written, in ``cwd``, with the worker's settings; fail on a non-zero exit."""
    lang, text = recipes[name]
    env = {**os.environ, **worker.env}
    env.pop("PYTEST_CURRENT_TEST", None)
    if lang == "python":
        cmd = [sys.executable, "-c", text]
    else:
        assert lang == "sh", f"recipe {name}: run the {lang} block through a shell recipe"
        cmd = ["bash", "-euo", "pipefail", "-c", text]
    done = subprocess.run(
        cmd, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=RUN_S, check=False
    )
    assert done.returncode == 0, f"recipe {name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def run_until(
    recipes: dict[str, tuple[str, str]],
    name: str,
    worker: WorkerProcess,
    until: Callable[[str], bool],
    timeout: float = ANSWER_S,
) -> str:
    """Run a reading recipe again and again until ``until(stdout)`` holds; its stdout."""
    deadline = time.monotonic() + timeout
    while True:
        done = run_recipe(recipes, name, worker)
        if until(done.stdout):
            return done.stdout
        if not worker.alive():
            raise AssertionError(f"worker died:\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"recipe {name} never showed what it should:\n{done.stdout}\n{done.stderr}")
        time.sleep(1.0)  # between polls of a reader that stopped at the end of the topic


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def answered(settings: Settings, worker: WorkerProcess, want: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Wait for a recommendation of each ``event_id -> event_type`` in ``want``; check each against
    the schema and the README's user; return them by event id."""

    def complete(records: list[Any]) -> bool:
        return set(want) <= {v["event_id"] for v in values(records)}

    recs = asyncio.run(
        collect(settings, settings.topic_recommendations, complete, timeout=ANSWER_S, worker=worker)
    )
    got = {v["event_id"]: v for v in values(recs) if v["event_id"] in want}
    assert set(got) == set(want), f"no recommendation for {set(want) - set(got)}:\n{worker.tail()}"
    check = validator("recommendation")
    for eid, rec in got.items():
        check.validate(rec)
        assert rec["event_type"] == want[eid], rec
    return got


def kcat_lines(out: str) -> list[tuple[str, dict[str, Any]]]:
    """``%k %s`` lines: (key, JSON value)."""
    pairs = [line.split(" ", 1) for line in out.splitlines() if line.strip()]
    return [(key, orjson.loads(value)) for key, value in pairs]


def test_the_readme_marks_every_recipe_this_test_runs() -> None:
    found = readme_recipes()
    assert {name: lang for name, (lang, _) in found.items()} == RECIPES, (
        "README.md's `<!-- recipe: NAME -->` blocks and this test's RECIPES differ"
    )


def test_kcat_publishes_events_that_are_answered_and_reads_them_back(
    recipes: dict[str, tuple[str, str]], running: tuple[Settings, WorkerProcess]
) -> None:
    need("kcat", "install it (apt-get install kcat)")
    settings, worker = running
    run_recipe(recipes, "kcat-produce", worker)
    got = answered(settings, worker, {"kcat-view-1": "view", "kcat-view-2": "view"})
    assert got["kcat-view-1"]["user_id"] == "u-42" and got["kcat-view-2"]["user_id"] == "u-7"

    def shows_both(out: str) -> bool:
        return {"kcat-view-1", "kcat-view-2"} <= {v["event_id"] for _, v in kcat_lines(out)}

    out = run_until(recipes, "kcat-recommendations", worker, shows_both)
    check = validator("recommendation")
    for key, rec in kcat_lines(out):
        check.validate(rec)
        assert key == rec["user_id"]  # outputs are keyed by user id


def test_kcat_reads_a_promotion(
    recipes: dict[str, tuple[str, str]], running: tuple[Settings, WorkerProcess]
) -> None:
    need("kcat", "install it (apt-get install kcat)")
    settings, worker = running
    # three views of one item, never carted: browse abandonment at the third
    now = time.time()
    views = [
        {
            "schema_version": 1,
            "type": "view",
            "event_id": f"browse-{i}",
            "user_id": "u-browser",
            "event_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60 + 10 * i)),
            "item_id": "sku-2001",
        }
        for i in range(3)
    ]
    asyncio.run(produce(settings, [(settings.topic_views, b"u-browser", orjson.dumps(v)) for v in views]))

    def shows_it(out: str) -> bool:
        return any(v["user_id"] == "u-browser" for _, v in kcat_lines(out))

    out = run_until(recipes, "kcat-promotions", worker, shows_it)
    check = validator("promotion")
    promos = [(key, promo) for key, promo in kcat_lines(out) if promo["user_id"] == "u-browser"]
    for key, promo in promos:
        check.validate(promo)
        assert key == "u-browser" and promo["kind"] == "browse_abandonment", promo


def test_console_producer_publishes_an_event_that_the_console_consumer_reads_answered(
    recipes: dict[str, tuple[str, str]], running: tuple[Settings, WorkerProcess]
) -> None:
    need_kafka_jars("tools-fetch")
    settings, worker = running
    run_recipe(recipes, "console-produce", worker)
    answered(settings, worker, {"console-cart-1": "cart"})

    def shows_it(out: str) -> bool:  # print.key=true: key, a tab, the value
        return any('"console-cart-1"' in line for line in out.splitlines())

    out = run_until(recipes, "console-recommendations", worker, shows_it)
    check = validator("recommendation")
    for line in out.splitlines():
        key, value = line.split("\t", 1)
        rec = orjson.loads(value)
        check.validate(rec)
        assert key == rec["user_id"]


def test_confluent_kafka_producer_publishes_an_event_that_is_answered(
    recipes: dict[str, tuple[str, str]], running: tuple[Settings, WorkerProcess]
) -> None:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        msg = "confluent-kafka is not installed (pip install -e '.[dev]')"
        if IN_CI:
            pytest.fail(f"CI=true and {msg}")
        pytest.skip(msg)
    settings, worker = running
    done = run_recipe(recipes, "python-producer", worker)
    assert "published py-order-1" in done.stdout
    answered(settings, worker, {"py-order-1": "order"})


def test_java_producer_publishes_an_event_that_is_answered(
    recipes: dict[str, tuple[str, str]], running: tuple[Settings, WorkerProcess], tmp_path: Path
) -> None:
    need_java_source_launcher()
    need_kafka_jars("fetch")
    settings, worker = running
    (tmp_path / "ShopProducer.java").write_text(recipes["java-producer"][1] + "\n")
    done = run_recipe(recipes, "java-run", worker, cwd=tmp_path)
    assert re.search(rf"published to {re.escape(settings.topic_searches)}\[\d+\]@\d+", done.stdout), done
    answered(settings, worker, {"java-search-1": "search"})


def test_a_bad_message_from_kcat_is_read_back_with_its_reason_by_kcat_and_the_console_consumer(
    recipes: dict[str, tuple[str, str]], running: tuple[Settings, WorkerProcess]
) -> None:
    need("kcat", "install it (apt-get install kcat)")
    need_kafka_jars("tools-fetch")
    _, worker = running
    run_recipe(recipes, "kcat-produce-bad", worker)
    bad = '{"schema_version": 1, "type": "view", "event_id": "kcat-bad-1"'
    # kcat: "key K, headers name=value,...", then the raw value, then a blank line
    out = run_until(recipes, "kcat-deadletter", worker, lambda out: bad in out)
    head, value = next(rec.split("\n", 1) for rec in out.split("\n\n") if bad in rec)
    assert head.startswith("key u-42, headers ") and value.strip() == bad, out
    assert f"{H_REASON}=invalid_json" in head.split(","), head
    # the console consumer: "name:value,...", a tab, the key, a tab, the value
    out = run_until(recipes, "console-deadletter", worker, lambda out: bad in out)
    headers, key, value = next(line.split("\t") for line in out.splitlines() if bad in line)
    assert key == "u-42" and value == bad and f"{H_REASON}:invalid_json" in headers.split(","), out


def test_consumer_groups_describes_the_workers_group(
    recipes: dict[str, tuple[str, str]], running: tuple[Settings, WorkerProcess]
) -> None:
    need_kafka_jars("tools-fetch")
    settings, worker = running

    def shows_inputs(out: str) -> bool:  # a row per partition: GROUP TOPIC PARTITION ... LAG ...
        rows = [line.split() for line in out.splitlines()]
        return any(r[:2] == [settings.app_id, settings.topic_views] for r in rows if len(r) >= 6)

    out = run_until(recipes, "consumer-groups", worker, shows_inputs)
    assert "LAG" in out and "CONSUMER-ID" in out, out
    # the README's other spelling: `shopstream kafka tool NAME ARG...` runs the same script
    cli = [sys.executable, "-m", "streams", "kafka", "tool", "consumer-groups"]
    listed = subprocess.run(
        [*cli, "--bootstrap-server", settings.kafka_bootstrap_servers, "--list"],
        cwd=ROOT,
        env={**os.environ, **worker.env},
        capture_output=True,
        text=True,
        timeout=RUN_S,
        check=False,
    )
    assert listed.returncode == 0 and settings.app_id in listed.stdout.split(), listed
