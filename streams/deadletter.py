"""The one handler for rejected input: log ``topic[partition]@offset``, count, dead-letter.

In: the original message and a ``RejectedInput``. Out: a record on the dead-letter topic whose
value is the original raw bytes and key the original key; headers carry the source topic,
partition, offset and the reason, as Kafka Connect's dead-letter queues do.
"""

from __future__ import annotations

import logging
from typing import Any

from streams.errors import RejectedInput
from streams.metrics import Metrics

log = logging.getLogger(__name__)

H_TOPIC = "x-shopstream-source-topic"
H_PARTITION = "x-shopstream-source-partition"
H_OFFSET = "x-shopstream-source-offset"
H_REASON = "x-shopstream-reason"
H_DETAIL = "x-shopstream-detail"


class DeadLetters:
    def __init__(self, app: Any, topic: str, metrics: Metrics) -> None:
        self.app = app
        self.topic = topic
        self.metrics = metrics

    async def send(self, msg: Any, exc: RejectedInput) -> None:
        # WARNING, not INFO: the detail may quote input, but never the raw value itself.
        log.warning("dead-lettered %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, exc.reason)
        headers = [
            (H_TOPIC, str(msg.topic).encode()),
            (H_PARTITION, str(msg.partition).encode()),
            (H_OFFSET, str(msg.offset).encode()),
            (H_REASON, str(exc.reason).encode()),
            (H_DETAIL, exc.detail.encode("utf-8", "replace")),
        ]
        await self.app.producer.send(self.topic, msg.key, msg.value, None, None, headers)
        self.metrics.events.labels(msg.topic, str(exc.reason)).inc()
