"""A record queued for a topic keeps its leader when the producer first sends to another topic.

No broker: aiokafka's own client, producer and accumulator, with the metadata refresh answered by a
fake one-node broker (the topics asked for, or all of them when none are). The sender is not
started, so sent records stay queued; what decides whether one can ever be sent is whether its
partition still has a leader after the refresh that the sender makes for it.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiokafka
import faust
import pytest
from aiokafka.structs import TopicPartition

from streams.delivery import Deliveries
from streams.errors import DeliveryFailed
from streams.producer import ShopstreamProducer, TrackingAIOKafkaProducer, install

UNKNOWN_TOPIC = 3


class FakeBroker:
    """Answers metadata requests as a one-node broker does (MetadataResponse v1 fields)."""

    def __init__(self, topics: dict[str, int]) -> None:
        self.topics = dict(topics)  # name -> partitions
        self.asked: list[list[str] | None] = []

    def response(self, asked: list[str] | None) -> Any:
        names = list(self.topics) if asked is None else asked
        topics = [
            (0, t, False, [(0, p, 1, [1], [1]) for p in range(self.topics[t])])
            if t in self.topics
            else (UNKNOWN_TOPIC, t, False, [])
            for t in names
        ]
        return SimpleNamespace(
            API_VERSION=1, brokers=[(1, "127.0.0.1", 9092, None)], controller_id=1, topics=topics
        )

    async def metadata_update(self, cluster: Any, topics: Any) -> bool:
        asked = sorted(topics) if topics else None  # aiokafka asks for all topics when it tracks none
        self.asked.append(asked)
        cluster.update_metadata(self.response(asked))
        return True


async def leader_of_queued_record(producer_type: type[aiokafka.AIOKafkaProducer]) -> Any:
    """The worker's start, step by step: faust refreshes all topics after creating its changelogs;
    the router queues a record for the by-user topic; the scorer's first changelog write goes to
    a changelog the broker did not show at that refresh; the sender refreshes for the queued
    record. Returns the leader the queued record's partition has then (None: it waits forever)."""
    broker = FakeBroker({"events-by-user": 8, "recommendations": 8})
    producer = producer_type(bootstrap_servers="127.0.0.1:9", request_timeout_ms=5000)
    client = producer.client
    client._metadata_update = broker.metadata_update
    client._sync_task = asyncio.ensure_future(client._md_synchronizer())
    try:
        await client.force_metadata_update()  # all topics (none tracked yet)
        await producer.send("events-by-user", b"event", key=b"u1", partition=3)  # queued
        broker.topics["users-changelog"] = 8  # created after that refresh
        await producer.send("users-changelog", b"state", key=b"u1", partition=3)
        await client.force_metadata_update()  # the sender's, as the queued record has no leader
        queued = [tp for tp in producer._message_accumulator._batches if tp.topic == "events-by-user"]
        assert queued == [TopicPartition("events-by-user", 3)]
        return client.cluster.leader_for_partition(queued[0])
    finally:
        await producer.stop()  # the sender never started: this closes the client only


def test_plain_aiokafka_forgets_the_leader_of_a_queued_record() -> None:
    """The bug being worked around (aiokafka 0.14): when this fails, aiokafka tracks the topics it
    sends to by itself and ``streams.producer`` can go."""
    assert asyncio.run(leader_of_queued_record(aiokafka.AIOKafkaProducer)) is None


def test_the_tracking_producer_keeps_the_leader_of_a_queued_record() -> None:
    assert asyncio.run(leader_of_queued_record(TrackingAIOKafkaProducer)) == 1


def test_refreshes_keep_every_topic_including_ones_never_sent_to() -> None:
    """A new topic is learnt by an all-topics refresh; a changelog nobody sent to (faust's web
    router looks its partitions up) stays known."""

    async def scenario() -> tuple[list[list[str] | None], Any]:
        broker = FakeBroker({"a": 1, "b": 1, "users-changelog": 4})
        producer = TrackingAIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
        producer.client._metadata_update = broker.metadata_update
        producer.client._sync_task = asyncio.ensure_future(producer.client._md_synchronizer())
        try:
            await producer.client.force_metadata_update()
            await producer.send("a", b"v")
            broker.topics["new"] = 2  # created after the first refresh
            await producer.send("new", b"v")
            await producer.client.force_metadata_update()
            return broker.asked, producer.client.cluster.partitions_for_topic("users-changelog")
        finally:
            await producer.stop()

    asked, changelog = asyncio.run(scenario())
    assert asked and all(a is None for a in asked)  # never narrowed to a list of topics
    assert changelog == {0, 1, 2, 3}


def test_plain_aiokafka_drops_a_topic_nobody_sent_to() -> None:
    """What failed ``GET /users/<id>`` (aiokafka's partitioner found no partitions)."""

    async def scenario() -> Any:
        broker = FakeBroker({"a": 1, "users-changelog": 4})
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
        producer.client._metadata_update = broker.metadata_update
        producer.client._sync_task = asyncio.ensure_future(producer.client._md_synchronizer())
        try:
            await producer.client.force_metadata_update()
            broker.topics["new"] = 2
            await producer.send("new", b"v")
            await producer.client.force_metadata_update()
            return producer.client.cluster.partitions_for_topic("users-changelog")
        finally:
            await producer.stop()

    assert asyncio.run(scenario()) is None


def test_install_makes_the_app_use_the_tracking_producer() -> None:
    app = faust.App("producer-install-test", broker="kafka://127.0.0.1:9")
    install(app)
    assert isinstance(app.producer, ShopstreamProducer)
    assert app.producer._producer_type is TrackingAIOKafkaProducer


def test_a_timeout_names_the_topic_of_a_plain_aiokafka_future() -> None:
    """aiokafka's futures carry no topic: the caller names it (the report said '?' before)."""

    async def scenario() -> None:
        d = Deliveries(timeout_s=0.05)
        d.add(asyncio.get_running_loop().create_future(), "shopstream.events-by-user")
        d.add(asyncio.get_running_loop().create_future())
        with pytest.raises(DeliveryFailed, match=r"\{'shopstream.events-by-user': 1, '\?': 1\}"):
            await d.confirm()

    asyncio.run(scenario())
