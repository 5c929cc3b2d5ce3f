"""Publish converted real data to the input topics, in event-time order, at a chosen speed.

In: contract events from ``streams.sources``. Out: messages on the input topic of each event's
type, keyed by user id. Times are rebased by default so the stream looks live: at ``speed`` x
real time the first event is "now" and later ones follow ``speed`` times faster; at max rate
the last event is "now" and the original gaps are kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from streams.settings import Settings
from streams.sources.datasets import Event


def _ts(ev: Event) -> float:
    return datetime.fromisoformat(ev["event_time"]).timestamp()


def rebase(events: list[Event], speed: float | None, now: float) -> None:
    """Shift (and at ``speed`` compress) event times in place so the replay looks live."""
    if not events:
        return
    first, last = _ts(events[0]), _ts(events[-1])
    for ev in events:
        t = _ts(ev)
        new = now + (t - first) / speed if speed else now - (last - t)
        ev["event_time"] = datetime.fromtimestamp(new, UTC).isoformat().replace("+00:00", "Z")


async def replay(
    settings: Settings,
    events: Iterable[Event],
    *,
    speed: float | None = None,
    keep_time: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[int, float]:
    """Publish events; returns (count, seconds). ``speed=None`` publishes at max rate."""
    topic_of = {etype: topic for topic, etype in settings.input_topics.items()}
    batch = list(events) if limit is None else [e for _, e in zip(range(limit), events, strict=False)]
    start = time.time()
    t0 = _ts(batch[0]) if batch else 0.0
    due = [start + (_ts(ev) - t0) / speed for ev in batch] if speed else None
    if not keep_time:
        rebase(batch, speed, start)
    producer = AIOKafkaProducer(
        **settings.kafka_client_options(), acks="all", linger_ms=5, max_batch_size=262144
    )
    await producer.start()
    try:
        bar = tqdm(total=len(batch), unit="ev", disable=not progress, desc="replay")
        pending = []
        for i, ev in enumerate(batch):
            if due is not None:
                delay = due[i] - time.time()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            fut = await producer.send(topic_of[ev["type"]], orjson.dumps(ev), key=ev["user_id"].encode())
            pending.append(fut)
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                bar.update(len(pending))
                pending.clear()
        await asyncio.gather(*pending)
        bar.update(len(pending))
        bar.close()
        await producer.flush()
    finally:
        await producer.stop()
    return len(batch), time.time() - start
