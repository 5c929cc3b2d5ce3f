"""Fixtures shared by every tier: where the broker and the real data sets are."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"


def datasets_dir() -> Path:
    return Path(os.environ.get("SHOPSTREAM_DATASETS_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data sets; outside CI a missing folder skips, in CI it fails."""
    path = datasets_dir()
    if not path.is_dir():
        msg = f"real data folder {path} not found (set SHOPSTREAM_DATASETS_DIR)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _docker_daemon() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real Apache Kafka broker: KAFKA_BOOTSTRAP_SERVERS, else testcontainers, else skip (CI: fail)."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if _docker_daemon():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    msg = "no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS (e.g. after `shopstream kafka up`) or run Docker"
    if IN_CI:
        pytest.fail(f"CI=true and {msg}")
    pytest.skip(msg)
