"""Security: a worker on a private SASL_SSL broker (SCRAM-SHA-512 and mutual TLS, certificates made
here), wrong credentials refused with the reason, secrets masked everywhere they could show, and
no user text or user id in the worker's INFO log.

The broker comes from ``deploy/kafka/local-kafka.sh`` in SASL_SSL mode on free ports (see
``secure_kafka.py``); it needs the jars that script fetches: outside CI their absence skips the
broker tests, with CI=true it fails them.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.admin import connect_admin, ensure_topics
from streams.replay import rebase, replay
from streams.sources.datasets import Event, load
from streams.tail import format_record
from tests.commands import streams_cli
from tests.conftest import IN_CI
from tests.integration.harness import WorkerProcess, collect, isolated_env, settings_of, values
from tests.integration.secure_kafka import Certs, make_certs, missing_tools, secure_broker

pytestmark = pytest.mark.integration

USER = "shopstream-svc"
PASSWORD = f"pw-{uuid.uuid4().hex}"  # distinctive, so a leak cannot hide in ordinary text
KEY_PASSWORD = f"kp-{uuid.uuid4().hex}"
MASK = "**********"


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    certs: Certs

    def env(self, **extra: str) -> dict[str, str]:
        """The settings env of a client of this broker (SCRAM-SHA-512, client certificate)."""
        return {
            "SHOPSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SHOPSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "SHOPSTREAM_KAFKA_SASL_USERNAME": USER,
            "SHOPSTREAM_KAFKA_SASL_PASSWORD": PASSWORD,
            "SHOPSTREAM_KAFKA_SSL_CAFILE": str(self.certs.ca),
            "SHOPSTREAM_KAFKA_SSL_CERTFILE": str(self.certs.client_cert),
            "SHOPSTREAM_KAFKA_SSL_KEYFILE": str(self.certs.client_key),
            "SHOPSTREAM_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
            **extra,
        }


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    why = missing_tools()
    if why:
        if IN_CI:
            pytest.fail(f"CI=true and no SASL_SSL broker can start: {why}")
        pytest.skip(why)
    work = tmp_path_factory.mktemp("sasl-ssl")
    certs = make_certs(work / "tls", KEY_PASSWORD)
    with secure_broker(work, USER, PASSWORD, certs) as bootstrap:
        yield Broker(bootstrap, certs)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return streams_cli(*args, env=env, timeout=60)


def real_events(data_dir: Path) -> tuple[list[Event], list[Event]]:
    """Valid events (REES46 views/carts/orders, Best Buy searches, Amazon reviews with text), each
    set moved to end now, merged in time order; and reviews with an impossible rating."""
    now = time.time()
    sets = [
        list(load("rees46-demo", data_dir))[:300],
        list(load("bestbuy", data_dir))[:100],
        list(load("amazon-beauty", data_dir))[:100],
    ]
    for events in sets:
        rebase(events, None, now)
    valid = sorted((e for events in sets for e in events), key=lambda e: e["event_time"])
    bad = [{**e, "event_id": f"{e['event_id']}-bad", "rating": 9} for e in sets[2][:5]]
    return valid, bad


def personal_strings(events: list[Event]) -> tuple[set[str], set[str]]:
    """Texts (queries, review texts and titles, long enough not to occur by chance) and user ids."""
    texts: set[str] = set()
    for e in events:
        for field, n in (("query", 8), ("text", 12), ("title", 8)):
            value = str(e.get(field) or "").strip()
            if len(value) >= n:
                texts.add(value[:40])
    return texts, {e["user_id"] for e in events}


async def test_worker_over_sasl_ssl_answers_every_event_and_logs_nothing_personal(
    broker: Broker, data_dir: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    env = isolated_env(
        broker.bootstrap,
        tmp_path,
        **broker.env(SHOPSTREAM_LOG_LEVEL="info", SHOPSTREAM_QUIET_HOURS=""),
        SHOPSTREAM_DATASETS_DIR=str(data_dir),
    )
    settings = settings_of(env)
    await ensure_topics(settings)
    valid, bad = real_events(data_dir)
    assert {e["type"] for e in valid} >= {"view", "order", "search", "review"}
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        await replay(settings, [*valid, *bad], keep_time=True, progress=False)
        wanted = {e["event_id"] for e in valid}
        recs = await collect(
            settings,
            settings.topic_recommendations,
            lambda rs: {v["event_id"] for v in values(rs)} >= wanted,
            worker=worker,
        )
        answered = {v["event_id"] for v in values(recs)}
        assert answered >= wanted, f"{len(wanted - answered)} events unanswered"
        dead = await collect(
            settings, settings.topic_deadletter, lambda rs: len(rs) >= len(bad), worker=worker
        )
        assert sorted(orjson.loads(r.value or b"")["event_id"] for r in dead) == sorted(
            e["event_id"] for e in bad
        )
        # the command-line tail reads over SASL_SSL too
        tail = cli(
            env, "tail", "--topic", "deadletter", "--from-beginning", "--limit", "1", "--timeout", "20"
        )
        assert tail.returncode == 0, tail.stderr
        shown = [format_record(settings.topic_deadletter, r.key, r.value, list(r.headers)) for r in dead]
        assert len(tail.stdout.splitlines()) == 1 and tail.stdout.splitlines()[0] in shown
    finally:
        assert worker.stop() == 0, worker.tail()
    elapsed = time.monotonic() - started

    log = worker.log.read_text(errors="replace")
    # the log is live at INFO and names how it connects, without the secrets
    assert f"over SASL_SSL, SASL SCRAM-SHA-512 as '{USER}'" in log
    assert "dead-lettered" in log
    assert PASSWORD not in log and KEY_PASSWORD not in log
    texts, users = personal_strings([*valid, *bad])
    assert len(texts) > 100 and len(users) > 100  # the audit looks at real text, not a handful
    leaked_texts = sorted(t for t in texts if t in log)
    assert not leaked_texts, f"user text in the worker log: {leaked_texts[:5]}"
    leaked_users = sorted(u for u in users if re.search(rf"(?<![\w.-]){re.escape(u)}(?![\w.-])", log))
    assert not leaked_users, f"user ids in the worker log: {leaked_users[:5]}"
    print(
        f"{len(wanted)} events answered over SASL_SSL (SCRAM-SHA-512, client certificate), "
        f"{len(dead)} dead-lettered; log audited for {len(texts)} texts and {len(users)} user ids; "
        f"{elapsed:.1f}s"
    )


async def test_scram_256_and_plain_connect_and_wrong_credentials_are_refused_with_the_reason(
    broker: Broker, tmp_path: Path
) -> None:
    for mechanism in ("SCRAM-SHA-256", "PLAIN"):
        settings = settings_of(
            {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                **broker.env(SHOPSTREAM_KAFKA_SASL_MECHANISM=mechanism),
            }
        )
        admin = await connect_admin(settings, timeout_s=10)
        await admin.close()

    wrong = f"wrong-{uuid.uuid4().hex}"
    base = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "SHOPSTREAM_DATA_DIR": str(tmp_path)}
    refused = cli({**base, **broker.env(SHOPSTREAM_KAFKA_SASL_PASSWORD=wrong)}, "topics")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"SASL SCRAM-SHA-512 authentication of user '{USER}' failed" in refused.stderr
    assert wrong not in refused.stdout + refused.stderr and PASSWORD not in refused.stderr

    no_cert = {k: v for k, v in broker.env().items() if "_SSL_CERTFILE" not in k and "_SSL_KEY" not in k}
    refused = cli({**base, **no_cert}, "topics")
    assert refused.returncode == 1 and "TLS refused" in refused.stderr, refused.stderr

    other_ca = make_certs(tmp_path / "other", KEY_PASSWORD).ca
    refused = cli({**base, **broker.env(SHOPSTREAM_KAFKA_SSL_CAFILE=str(other_ca))}, "topics")
    assert refused.returncode == 1 and "certificate verify failed" in refused.stderr, refused.stderr


def test_secrets_are_masked_in_help_and_the_settings_dump(tmp_path: Path) -> None:
    """No broker needed: the help texts and ``shopstream settings`` never show a secret."""
    env: dict[str, Any] = {
        "SHOPSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SHOPSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "SHOPSTREAM_KAFKA_SASL_USERNAME": USER,
        "SHOPSTREAM_KAFKA_SASL_PASSWORD": PASSWORD,
        "SHOPSTREAM_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
    }
    outputs = [cli(env, *args) for args in (["--help"], ["worker", "--help"], ["topics", "--help"])]
    dump = cli(env, "settings")
    assert dump.returncode == 0, dump.stderr
    assert f"SHOPSTREAM_KAFKA_SASL_PASSWORD={MASK}" in dump.stdout.splitlines()
    assert f"SHOPSTREAM_KAFKA_SSL_KEY_PASSWORD={MASK}" in dump.stdout.splitlines()
    assert f"SHOPSTREAM_KAFKA_SASL_USERNAME={USER}" in dump.stdout.splitlines()
    # a setting that fails validation is reported without echoing the values read
    broken = cli({**env, "SHOPSTREAM_KAFKA_SASL_MECHANISM": ""}, "settings")
    assert broken.returncode == 2 and "SHOPSTREAM_KAFKA_SASL_MECHANISM" in broken.stderr, broken.stderr
    for out in [*outputs, dump, broken]:
        assert PASSWORD not in out.stdout + out.stderr and KEY_PASSWORD not in out.stdout + out.stderr
