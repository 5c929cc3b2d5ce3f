"""Topic administration: create the topics the service reads and writes, and check them.

Source topics are created with the app's partition count so that faust never crash-loops on a
partition mismatch; the internal by-user topic must have exactly ``settings.partitions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from streams.errors import BrokerUnavailable, ConfigurationError
from streams.settings import Settings

log = logging.getLogger(__name__)


def all_topics(settings: Settings) -> list[str]:
    return [
        *settings.input_topics,
        settings.topic_events_by_user,
        settings.topic_recommendations,
        settings.topic_promotions,
        settings.topic_deadletter,
    ]


async def connect_admin(settings: Settings, timeout_s: float = 30.0) -> AIOKafkaAdminClient:
    """An admin client, retrying until the cluster answers or ``timeout_s`` passes."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(**settings.kafka_client_options(), request_timeout_ms=10_000)
        try:
            await admin.start()
            return admin
        except KafkaConnectionError as exc:
            await admin.close()
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {settings.kafka_bootstrap_servers} in {timeout_s:.0f}s"
                    " (start one with `shopstream kafka up`)"
                ) from exc
            await asyncio.sleep(1.0)


async def ensure_topics(settings: Settings, topics: list[str] | None = None) -> list[str]:
    """Create missing topics; fail clearly if the by-user topic has the wrong partition count."""
    wanted = topics or all_topics(settings)
    admin = await connect_admin(settings)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            new = [
                NewTopic(
                    t, num_partitions=settings.partitions, replication_factor=settings.replication_factor
                )
                for t in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent worker was first
                await admin.create_topics(new)
            log.info("created topics %s with %d partitions", missing, settings.partitions)
        internal = settings.topic_events_by_user
        if internal in wanted:
            found = 0
            for _ in range(50):  # a topic created a moment ago may not show its partitions yet
                described = await admin.describe_topics([internal])
                found = len(described[0]["partitions"])
                if found:
                    break
                await asyncio.sleep(0.2)
            if found != settings.partitions:
                raise ConfigurationError(
                    f"topic {internal} has {found} partitions but SHOPSTREAM_PARTITIONS="
                    f"{settings.partitions}; the tables are partitioned like it: use the same count,"
                    " or a new app id and topic"
                )
        return missing
    finally:
        await admin.close()
