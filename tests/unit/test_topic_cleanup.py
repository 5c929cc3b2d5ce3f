"""The harness's topic clean-up at exit (``tests.integration.harness.delete_run_topics``) skips a
broker nothing listens on any more (a test's own, stopped with its topics); the deletion itself is
an integration test (``test_pipeline``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.integration.harness import STOPPED, delete_run_topics, free_port, isolated_env


def test_a_stopped_broker_is_skipped_at_once(tmp_path: Path) -> None:
    gone = f"127.0.0.1:{free_port()}"
    env = isolated_env(gone, tmp_path)
    assert asyncio.run(delete_run_topics([(("t-",), env)])) == {gone: STOPPED}
