"""The one handler for rejected input: log ``topic[partition]@offset``, count, dead-letter.

In: the original message and a ``RejectedInput``. Out: a record on the dead-letter topic whose
value is the original raw bytes and key the original key; headers carry the source topic,
partition, offset and the reason, as Kafka Connect's dead-letter queues do.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from streams.errors import RejectedInput
from streams.metrics import Metrics

log = logging.getLogger(__name__)

H_TOPIC = "x-shopstream-source-topic"
H_PARTITION = "x-shopstream-source-partition"
H_OFFSET = "x-shopstream-source-offset"
H_REASON = "x-shopstream-reason"
H_DETAIL = "x-shopstream-detail"


LOG_PER_MINUTE = 20  # dead letters logged one by one per minute; the rest are summarised


class DeadLetters:
    def __init__(self, app: Any, topic: str, metrics: Metrics) -> None:
        self.app = app
        self.topic = topic
        self.metrics = metrics
        self._window = time.monotonic()
        self._logged = 0
        self._quiet = 0

    def _log(self, msg: Any, exc: RejectedInput) -> None:
        """Log where and why (never the payload: it may hold personal data), at a bounded rate."""
        now = time.monotonic()
        if now - self._window >= 60.0:
            if self._quiet:
                log.warning("%d more messages dead-lettered in the last minute", self._quiet)
            self._window, self._logged, self._quiet = now, 0, 0
        if self._logged < LOG_PER_MINUTE:
            self._logged += 1
            log.warning("dead-lettered %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, exc.reason)
        else:
            self._quiet += 1

    async def send(self, msg: Any, exc: RejectedInput) -> None:
        self._log(msg, exc)
        headers = [
            (H_TOPIC, str(msg.topic).encode()),
            (H_PARTITION, str(msg.partition).encode()),
            (H_OFFSET, str(msg.offset).encode()),
            (H_REASON, str(exc.reason).encode()),
            (H_DETAIL, exc.detail.encode("utf-8", "replace")),
        ]
        await self.app.producer.send(self.topic, msg.key, msg.value, None, None, headers)
        self.metrics.events.labels(msg.topic, str(exc.reason)).inc()
