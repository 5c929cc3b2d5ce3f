"""The faust consumer with the two fixes that keep "at least once" true across rebalances.

faust-streaming 0.15.3 (``faust/transport/consumer.py``) treats any jump in the offsets it fetches
as a compaction gap: ``_drain_messages`` calls ``_add_gap(tp, last + 1, offset)`` and
``_new_offset`` then counts the whole range as processed. A record fetched before a rebalance and
handed over after it (the stale-prefetch case of faust-streaming#221; robinhood/faust#115) makes
such a jump, from the offset the partition was sought to up to the stale record: the commit moves
past records that were never processed, and the refetched ones are then dropped as already read
("DROPPED MESSAGE ROFF"). That is how a rebalance lost contiguous runs of events with the group's
lag at zero (issue: two workers, one killed and restarted, 661 of 3,000 events unanswered).

Fixes, both in ``ShopstreamConsumer``:
- records of a fetch that a rebalance overtook (the generation changed while ``getmany`` waited)
  are not handed on: they are fetched again from the committed offset after the rebalance;
- an offset jump is never committable: no topic this worker reads is compacted, so a jump is a
  record out of place, not a gap. It is logged and counted; the commit waits at the last record
  actually processed (a single-offset jump, a transaction marker, still commits, as before). Should
  records really be skipped, the partition stops committing, the worker reports itself not
  ready and then not alive (``streams.progress``), and the restarted worker reads from the last
  commit: slower, never lossy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from faust.transport.drivers.aiokafka import Consumer

log = logging.getLogger(__name__)


class ShopstreamConsumer(Consumer):  # type: ignore[misc]
    on_jump: Any = None  # called with (tp, expected offset, offset) for each offset jump

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        generation = self.app.consumer_generation_id
        records = super().getmany(timeout)
        try:
            async for tp, message in records:
                if message.generation_id != generation:
                    log.info(
                        "a rebalance overtook a fetch (generation %s -> %s): its records are "
                        "fetched again from the committed offsets",
                        generation,
                        message.generation_id,
                    )
                    return
                yield tp, message
        finally:
            await records.aclose()

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        log.warning(
            "%s[%d]: offsets jump from %d to %d; not committing past them until they are processed",
            tp.topic,
            tp.partition,
            offset_from,
            offset_to,
        )
        if self.on_jump is not None:
            self.on_jump(tp, offset_from, offset_to)


def install(app: Any, on_jump: Any = None) -> None:
    """Make ``app`` create its consumer from ``ShopstreamConsumer`` (before it is first used)."""
    ShopstreamConsumer.on_jump = on_jump
    app.transport.Consumer = ShopstreamConsumer
