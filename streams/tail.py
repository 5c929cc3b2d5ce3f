"""Print output records (recommendations, promotions, dead letters) as they arrive.

In: an output topic. Out: one line per record on stdout; dead letters show their headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streams.errors import ConfigurationError
from streams.settings import Settings


async def end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, topic)
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The partitions of ``topic``, refreshing the metadata for up to 10 s (a topic just created
    may not be in it yet); ConfigurationError (a clean CLI error) when it does not exist."""
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.2)
    raise ConfigurationError(f"topic {topic} not found (create the topics with `shopstream topics`)")


async def read_to_end(
    settings: Settings, topics: Sequence[str], timeout: float | None = None
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topics`` up to their end offsets as of the call (TimeoutError when that
    takes longer than ``timeout`` seconds)."""
    out: list[ConsumerRecord[bytes, bytes]] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [tp for topic in topics for tp in await topic_partitions(consumer, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        for tp in tps:
            while await consumer.position(tp) < end[tp]:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{tp} not read to its end offset {end[tp]} in {timeout:.0f}s")
                for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                    out.extend(r for r in records if r.offset < end[tp])
    finally:
        await consumer.stop()
    return out


def format_record(
    topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
) -> str:
    text = (value or b"").decode("utf-8", "replace")
    if headers:
        meta = " ".join(f"{k.rsplit('-', 1)[-1]}={v.decode('utf-8', 'replace')[:80]}" for k, v in headers)
        return f"{topic} {meta} value={text[:200]!r}"
    return text


async def tail(
    settings: Settings,
    topic: str,
    *,
    limit: int | None = None,
    from_beginning: bool = False,
    idle_timeout: float | None = None,
    start: dict[TopicPartition, int] | None = None,
) -> int:
    """Print records of ``topic`` until ``limit`` records or ``idle_timeout`` seconds of silence."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    n = 0
    try:
        parts = await topic_partitions(consumer, topic)
        consumer.assign(parts)
        if start is not None:
            for tp in parts:
                consumer.seek(tp, start.get(tp, 0))
        elif from_beginning:
            await consumer.seek_to_beginning(*parts)
        else:
            await consumer.seek_to_end(*parts)
        while limit is None or n < limit:
            batch = await consumer.getmany(timeout_ms=int((idle_timeout or 3600) * 1000))
            if not batch:
                break
            for records in batch.values():
                for r in records:
                    print(format_record(topic, r.key, r.value, list(r.headers or [])), flush=True)
                    n += 1
                    if limit is not None and n >= limit:
                        return n
    finally:
        await consumer.stop()
    return n
