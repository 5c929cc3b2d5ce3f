"""Faults: a worker killed with SIGKILL mid-stream and restarted loses nothing.

At-least-once: every input event still gets its recommendation (redeliveries carry the same
event id and are counted), the user tables equal a recomputation from the by-user topic the
worker consumed, and promotions keep their deterministic ids (a redelivered trigger repeats an id,
never invents a new one).
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.admin import ensure_topics
from streams.records import event_adapter
from streams.replay import replay
from streams.sources.datasets import load
from streams.state import UserState
from tests.integration.harness import ROOT, WorkerProcess, collect, isolated_env, settings_of, values

pytestmark = pytest.mark.integration


def user_state(port: int, user: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/users/{user}/", timeout=10) as resp:
        return orjson.loads(resp.read())


async def test_kill_9_mid_stream_then_restart_loses_nothing(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = isolated_env(
        kafka_bootstrap,
        tmp_path,
        SHOPSTREAM_MODEL_DIR=str(ROOT / "deploy" / "demo" / "model"),
        SHOPSTREAM_INFERENCE_PROVIDER="cpu",
        SHOPSTREAM_QUIET_HOURS="",
    )
    settings = settings_of(env)
    await ensure_topics(settings)
    events = list(load("rees46-demo", settings.datasets_dir))
    wanted = {e["event_id"] for e in events}
    first = WorkerProcess(env, tmp_path / "worker1.log").start()
    await replay(settings, events, progress=False)

    def answered(rs: list[Any]) -> set[str]:
        return {v["event_id"] for v in values(rs)}

    partial = await collect(
        settings, settings.topic_recommendations, lambda rs: len(answered(rs)) >= 800, worker=first
    )
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-stream, no clean shutdown
    killed_at = len(answered(partial))
    assert killed_at < len(wanted), "the worker finished before it was killed: nothing was tested"

    second = WorkerProcess(env, tmp_path / "worker2.log").start()  # same data dir and group
    started = time.monotonic()
    try:
        recs = await collect(
            settings,
            settings.topic_recommendations,
            lambda rs: answered(rs) >= wanted,
            timeout=180,
            worker=second,
        )
        recovered_s = time.monotonic() - started
        ids = Counter(v["event_id"] for v in values(recs))
        assert set(ids) == wanted  # every event answered
        redelivered = sum(n - 1 for n in ids.values())

        # the tables equal the input folded again, in the order the worker consumed it
        by_user = await collect(
            settings,
            settings.topic_events_by_user,
            lambda rs: len(rs) >= len(events),
            worker=second,
        )
        expected: dict[str, UserState] = {}
        for r in sorted(by_user, key=lambda r: (r.partition, r.offset)):
            ev = event_adapter.validate_json(r.value or b"")
            expected.setdefault(ev.user_id, UserState()).apply(ev, 0, settings.sequence_length)
        sample = sorted(expected)[:: max(1, len(expected) // 40)]  # ~40 users across partitions
        for user in sample:
            got = user_state(settings.web_port, user)
            want = expected[user]
            assert got["seq"] == want.seq, user
            assert got["cart"] == want.cart and got["counts"] == want.counts, user

        promos = values(await collect(settings, settings.topic_promotions, lambda rs: False, timeout=3))
        per_id = Counter(p["promotion_id"] for p in promos)
        # a repeated id is the same promotion re-sent (consumers deduplicate on it): its content matches
        for pid, n in per_id.items():
            if n > 1:
                same = [
                    (p["kind"], p["user_id"], p["trigger_event_id"])
                    for p in promos
                    if p["promotion_id"] == pid
                ]
                assert len(set(same)) == 1, same
        print(
            f"killed after {killed_at}/{len(wanted)} answered; "
            f"all answered {recovered_s:.1f}s after restart; "
            f"{redelivered} redelivered recommendations; {len(per_id)} promotion ids, "
            f"{sum(per_id.values()) - len(per_id)} repeated records"
        )
    finally:
        assert second.stop() == 0, second.tail()
