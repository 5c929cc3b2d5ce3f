"""Back off after a failed Kafka metadata refresh instead of retrying at once, forever.

While no broker answers, aiokafka's producer sender (``_sender_routine``) asks for a metadata
refresh whenever a partition has no known leader and loops as soon as the refresh fails; a
refused connection fails at once, so the worker spins: a core at 100 % and thousands of
``Unable to update metadata`` errors a second until a broker is back (aiokafka 0.14; its fetcher
has the same shape, aio-libs/aiokafka#1155). One pause after each failed refresh, in the task
that does every refresh of a client, slows all those loops at once; a refresh that succeeds is
not delayed, so the worker still resumes within a pause of the broker's return.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from aiokafka.client import AIOKafkaClient

FAILED_REFRESH_PAUSE_S = 0.5


def back_off_failed_metadata_refreshes(pause_s: float = FAILED_REFRESH_PAUSE_S) -> None:
    """Patch aiokafka's client, process-wide (every faust consumer and producer); idempotent."""
    original = AIOKafkaClient._metadata_update
    if getattr(original, "shopstream_backoff", False):
        return

    @functools.wraps(original)
    async def metadata_update(self: AIOKafkaClient, cluster_metadata: Any, topics: Any) -> bool:
        ok = bool(await original(self, cluster_metadata, topics))
        if not ok:
            await asyncio.sleep(max(pause_s, self._retry_backoff))
        return ok

    metadata_update.shopstream_backoff = True  # type: ignore[attr-defined]
    AIOKafkaClient._metadata_update = metadata_update
