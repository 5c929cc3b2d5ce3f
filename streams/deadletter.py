"""The one handler for rejected input: log ``topic[partition]@offset``, count, dead-letter.

In: the original message and a ``RejectedInput``. Out: a record on the dead-letter topic whose
value is the original raw bytes and key the original key; headers carry the source topic,
partition, offset and the reason, as Kafka Connect's dead-letter queues do. A value that would
not fit in one produce request once the headers are added (an input close to the broker's
message limit) is cut to fit, and ``x-shopstream-truncated`` holds its original length: a send
that fails on size would crash the agent and replay the same message forever.
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
H_TRUNCATED = "x-shopstream-truncated"  # the value was cut; this is its original length
H_KEY_TRUNCATED = "x-shopstream-key-truncated"


LOG_PER_MINUTE = 20  # dead letters logged one by one per minute; the rest are summarised
FRAMING = 512  # bytes of record and request framing around one dead letter, generously
MAX_KEY = 4096  # a longer key is cut (the value keeps the room)


class DeadLetters:
    def __init__(self, app: Any, topic: str, metrics: Metrics) -> None:
        self.app = app
        self.topic = topic
        self.metrics = metrics
        self._window = time.monotonic()
        self._logged = 0
        self._quiet = 0
        self.max_request = int(getattr(getattr(app, "conf", None), "producer_max_request_size", 1_000_000))

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

    async def send(self, msg: Any, exc: RejectedInput) -> Any:
        """Publish the dead letter; returns the producer's future, which the caller confirms
        before the input is acked."""
        self._log(msg, exc)
        headers = [
            (H_TOPIC, str(msg.topic).encode()),
            (H_PARTITION, str(msg.partition).encode()),
            (H_OFFSET, str(msg.offset).encode()),
            (H_REASON, str(exc.reason).encode()),
            (H_DETAIL, exc.detail.encode("utf-8", "replace")),
        ]
        key, value = msg.key, msg.value
        if key is not None and len(key) > MAX_KEY:
            headers.append((H_KEY_TRUNCATED, str(len(key)).encode()))
            key = key[:MAX_KEY]
        room = self.max_request - FRAMING - len(key or b"") - sum(len(k) + len(v) for k, v in headers)
        if value is not None and len(value) > room:
            headers.append((H_TRUNCATED, str(len(value)).encode()))
            value = value[: max(0, room - len(H_TRUNCATED) - 20)]
        fut = await self.app.producer.send(self.topic, key, value, None, None, headers)
        self.metrics.events.labels(msg.topic, str(exc.reason)).inc()
        return fut
