"""Fixtures of the integration tier (the shared broker's fixture is in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.integration.harness import PrivateBroker, kafka_jars


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A broker this test may stop; the shared one is never touched. Always stopped at the end."""
    if not (kafka_jars() / ".complete").exists():
        msg = f"no Kafka jars in {kafka_jars()}: run `deploy/kafka/local-kafka.sh fetch`"
        if IN_CI:
            pytest.fail(f"CI=true and {msg}")
        pytest.skip(msg)
    broker = PrivateBroker(tmp_path / "kafka")
    try:
        broker.run("up")
        yield broker
    finally:
        broker.run("down")
