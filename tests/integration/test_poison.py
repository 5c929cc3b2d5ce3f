"""Poison messages of every category, interleaved with valid events on every input topic, through
a real broker and a real worker: every valid event is answered, every bad one dead-lettered with
its reason, odd-but-valid ones answered, and the worker stays up."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from streams.deadletter import H_KEY_TRUNCATED, H_REASON, H_TOPIC, H_TRUNCATED
from streams.decode import EventDecoder
from streams.errors import RejectedInput
from streams.settings import Settings
from tests.fuzzing import CATEGORIES, VALID, Case, Fuzzer
from tests.integration.harness import WorkerProcess, collect, produce, started_worker, values

pytestmark = pytest.mark.integration
NEAR_LIMIT = 1_000_000  # bytes: below the broker's message limit, above the worker's input limit


def near_limit(etype: str, user: str) -> bytes:
    ev = {**VALID[etype], "user_id": user, "event_id": f"huge-{etype}"}
    raw = orjson.dumps({**ev, "pad": ""})
    return orjson.dumps({**ev, "pad": "x" * (NEAR_LIMIT - len(raw))})


def test_poison_of_every_category_never_blocks_valid_events_on_any_topic(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    with started_worker(kafka_bootstrap, tmp_path) as (settings, worker):
        asyncio.run(poison_and_valid_events(settings, worker))


async def poison_and_valid_events(settings: Settings, worker: WorkerProcess) -> None:
    decoder = EventDecoder.from_settings(settings)
    fuzzer = Fuzzer(random.Random(6), decoder)
    now = time.time()
    stamp = datetime.fromtimestamp(now - 60, UTC).isoformat()
    topic_of = {etype: topic for topic, etype in settings.input_topics.items()}
    # a wrong-topic case may go to a privacy topic, which the worker reads too
    any_topic = {
        etype: topic for topic, etype in {**settings.input_topics, **settings.control_topics}.items()
    }
    records: list[tuple[str, bytes | None, bytes | None]] = []
    valid_ids: set[str] = set()
    answered_bad: set[str] = set()  # event ids of odd inputs the contract accepts
    dead: Counter[tuple[bytes | None, str, str]] = Counter()  # (value, reason, source topic)
    for etype, topic in topic_of.items():
        bad: list[Case] = [
            Case("near_limit", near_limit(etype, f"{etype}-big"), etype, None),
            *(
                fuzzer.case(c, {**VALID[etype], "event_id": f"{etype}-{c}", "event_time": stamp}, now)
                for c in CATEGORIES
                if c != "huge_string"  # 1 MiB is over the producer's limit: near_limit stands in
            ),
        ]
        for k, case in enumerate(bad):
            user = f"{etype}-user-{k % 3}"
            key = user.encode()
            try:
                ev = decoder.decode(case.raw, case.topic_type)
            except RejectedInput as exc:
                dead[(case.raw, str(exc.reason), any_topic[case.topic_type])] += 1
            else:
                answered_bad.add(ev.event_id)
            records.append((any_topic[case.topic_type], key, case.raw))  # the poison first,
            eid = f"valid-{etype}-{k}"  # then a valid event of the same user on the same partition
            valid_ids.add(eid)
            valid = {**VALID[etype], "user_id": user, "event_id": eid, "event_time": stamp}
            records.append((topic, key, orjson.dumps(valid)))
    huge_key = b"k" * (NEAR_LIMIT - 100)
    records.append((topic_of["view"], huge_key, b"{"))
    dead[(b"{", "invalid_json", topic_of["view"])] += 1
    assert len(dead) >= 5 * 15 and len(answered_bad) >= 5  # every topic gets poison of most kinds
    await produce(settings, records)

    want = valid_ids | answered_bad
    recs = await collect(
        settings,
        settings.topic_recommendations,
        lambda r: want <= {v["event_id"] for v in values(r)},
        worker=worker,
    )
    assert want <= {v["event_id"] for v in values(recs)}, sorted(want - {v["event_id"] for v in values(recs)})
    letters = await collect(
        settings, settings.topic_deadletter, lambda r: len(r) >= sum(dead.values()), worker=worker
    )
    got: Counter[tuple[bytes | None, str, str]] = Counter()
    for r in letters:
        headers = dict(r.headers)
        value = r.value
        if H_TRUNCATED in headers:  # too large for a Kafka record once headers are added
            assert int(headers[H_TRUNCATED]) == NEAR_LIMIT and value is not None
            value = next(
                raw for raw, _, _ in dead if raw and raw.startswith(value) and len(raw) == NEAR_LIMIT
            )
        if H_KEY_TRUNCATED in headers:
            assert int(headers[H_KEY_TRUNCATED]) == len(huge_key) and huge_key.startswith(r.key or b"-")
        got[(value, headers[H_REASON].decode(), headers[H_TOPIC].decode())] += 1
    assert got == dead
    assert sum(H_TRUNCATED in dict(r.headers) for r in letters) == 5
    assert sum(H_KEY_TRUNCATED in dict(r.headers) for r in letters) == 1
    assert worker.alive()
