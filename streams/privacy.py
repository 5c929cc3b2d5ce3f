"""``shopstream forget`` and ``shopstream consent``: publish one request about a user.

In: a user id (and, for a consent, whether promotions are allowed). Out: one contract event, an
``ErasureEvent`` on ``topic_erasures`` or a ``ConsentEvent`` on ``topic_consents``, validated
before it leaves, keyed by the user id like the inputs and acknowledged by the brokers
(``acks=all``) before the command returns. The worker routes it through the by-user topic and
applies it in order with the user's events (``streams.pipeline``); anything else that needs it (an
archive) reads the same topic.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import NamedTuple

import orjson
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from streams.admin import ensure_topics
from streams.decode import ControlEvent
from streams.errors import ShopstreamError
from streams.records import ConsentEvent, ErasureEvent
from streams.settings import Settings


class Published(NamedTuple):
    event_id: str
    topic: str
    partition: int
    offset: int


def request(kind: str, user_id: str, *, marketing: bool | None = None) -> ControlEvent:
    """A new erasure (``kind="erasure"``) or consent request, stamped now, with a fresh event id."""
    body: dict[str, object] = {
        "schema_version": 1,
        "type": kind,
        "event_id": f"{kind}-{uuid.uuid4().hex}",
        "user_id": user_id,
        "event_time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    if marketing is not None:
        body["marketing"] = marketing
    model = ErasureEvent if kind == "erasure" else ConsentEvent
    try:
        return model.model_validate_json(orjson.dumps(body))
    except ValidationError as exc:  # the field names only: the input is the user id
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors(include_input=False))
        raise ShopstreamError(
            f"not a valid {kind} request ({fields}): a user id is 1-128 characters"
        ) from None


async def publish(settings: Settings, event: ControlEvent) -> Published:
    """Send ``event`` to its topic, keyed by user id, and wait for the brokers' acknowledgement."""
    topic = settings.topic_erasures if isinstance(event, ErasureEvent) else settings.topic_consents
    await ensure_topics(settings, [topic])  # created with the app's partitions, never by the broker
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            topic, event.model_dump_json().encode(), key=event.user_id.encode()
        )
    finally:
        await producer.stop()
    return Published(event.event_id, meta.topic, meta.partition, meta.offset)
