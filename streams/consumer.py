"""The faust consumer with the fix that keeps "at least once" true across restarts and rebalances.

faust-streaming 0.15.3 (``faust/transport/consumer.py``) treats any jump in the offsets it fetches
as a compaction gap: ``_drain_messages`` calls ``_add_gap(tp, last + 1, offset)`` and
``_new_offset`` then counts the whole range as processed. A record fetched before a rebalance and
handed over after it (the stale-prefetch case of faust-streaming#221; robinhood/faust#115) makes
such a jump, from the offset the partition was sought to up to the stale record: the commit moves
past records that were never processed, and the refetched ones are then dropped as already read
("DROPPED MESSAGE ROFF"). That is how a rebalance lost contiguous runs of events with the group's
lag at zero (issue: two workers, one killed and restarted, 661 of 3,000 events unanswered).

Seen here as well right after a restart: the fetcher starts before "Seek stream partitions to
committed offsets", and the first records after the seek jump by up to a fetch's worth.

The fix, in ``ShopstreamConsumer._drain_messages`` (faust's loop with this one change): an offset
jump is never a gap. No topic this worker reads is compacted, so a record past unread offsets is
out of place: it is not handed on, the partition is sought back to the first unread offset, and the
records in between are fetched and processed. It is logged and counted
(``shopstream_offset_jumps_total``). Were records really missing after the seek (transaction
markers), the next record is taken and no gap is marked committable: the commit then waits at
the last record processed, the worker reports itself not ready and then not alive
(``streams.progress``), and a restart reads from the last commit: slower, never lossy.

A second addition, for the worker's write-back tables (``streams.writeback``): ``commit`` first
enters ``checkpoint()``, an async context the worker installs. It takes the lock that batches and
timers hold, writes the pending table changes and awaits their changelog acknowledgements; faust
then computes and commits the offsets while the lock is still held, so no offset is committed
whose event's state is not yet in the changelog. A checkpoint that fails commits nothing: a
delivery failure ends the process unacked (``streams.delivery.exit_fatally``), anything else (a
store already closed at shutdown) skips this commit, and the events since the last one are
redelivered after the restart.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer

from streams.delivery import exit_fatally
from streams.errors import DeliveryFailed

log = logging.getLogger(__name__)


class ShopstreamConsumer(Consumer):  # type: ignore[misc]
    on_jump: Any = None  # called with (tp, expected offset, offset) for each offset jump
    # () -> async context manager: pending state written and confirmed on entry, held until exit
    checkpoint: Any = None

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        """faust's commit inside the worker's checkpoint (module docstring)."""
        if self.checkpoint is None:
            return bool(await super().commit(topics, start_new_transaction=start_new_transaction))
        try:
            ctx = self.checkpoint()
            await ctx.__aenter__()
        except DeliveryFailed as exc:
            exit_fatally("checkpointing the tables before a commit", exc)
        except Exception:
            log.exception("checkpoint failed: offsets not committed (the events since are redelivered)")
            return False
        try:
            return bool(await super().commit(topics, start_new_transaction=start_new_transaction))
        finally:
            await ctx.__aexit__(None, None, None)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        """Never called by ``_drain_messages`` below; kept inert should faust call it elsewhere."""

    _expected: dict[Any, int]  # acking partition -> next offset to hand on
    _n_acked: int  # faust's count of acks since the last commit

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        for tp in revoked:
            self._expected_offsets().pop(tp, None)
        await super().on_partitions_revoked(revoked)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        self._expected_offsets().update({tp: o for tp, o in self._read_offset.items() if o is not None})

    async def seek(self, partition: Any, offset: int) -> None:
        await super().seek(partition, offset)
        self._expected_offsets()[partition] = offset

    def _expected_offsets(self) -> dict[Any, int]:
        try:
            return self._expected
        except AttributeError:
            self._expected = {}
            return self._expected

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - runs in the worker
        """faust-streaming 0.15.3's fetch loop, with one change for the topics whose offsets are
        committed: a record that jumps past the next expected offset (the committed one after a
        seek, the one after the last record handed on otherwise) is not handed on; the partition
        is sought back to the expected offset and the records in between are fetched again. A
        record that is again first after such a seek is a real gap (transaction markers): it is
        handed on, and the gap is not made committable."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        expected = self._expected_offsets()
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        rewound: dict[Any, int] = {}  # partition -> offset it was sought back to
        n = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if self.should_stop:
                    continue
                skip: set[Any] = set()  # partitions sought back within this fetch
                async for tp, message in ait:
                    n += 1
                    if n > 100:
                        await asyncio.sleep(0)
                        n = 0
                    if tp in skip:
                        continue
                    offset = message.offset
                    if acks_enabled_for(message.topic):
                        want = expected.get(tp)
                        if want is not None and offset < want:
                            continue  # handed on before (faust: "DROPPED MESSAGE ROFF")
                        if want is not None and offset > want and rewound.get(tp) != want:
                            self._jumped(tp, want, offset)
                            rewound[tp] = want
                            skip.add(tp)
                            await self.seek(tp, want)
                            continue
                        rewound.pop(tp, None)
                        expected[tp] = offset + 1
                    else:
                        r_offset = read_offset[tp]
                        if r_offset is not None and offset < r_offset:
                            continue
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    handing = callback(message)
                    try:  # the usual case: handed on without waiting, so nothing to wait on
                        waiting_on = handing.send(None)
                    except StopIteration:
                        pass
                    else:  # it waits (flow control, a full buffer): as faust, until done or suspended
                        await self.wait_first(_finish(handing, waiting_on), self.suspend_flow.wait())
                    read_offset[tp] = offset
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    def _jumped(self, tp: Any, expected: int, offset: int) -> None:
        log.warning(
            "%s[%d]: fetched offset %d where %d was next; seeking back so that nothing in between "
            "is skipped or committed over",
            tp.topic,
            tp.partition,
            offset,
            expected,
        )
        if self.on_jump is not None:
            self.on_jump(tp, expected, offset)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """The rest of ``coro``, which has run up to its first wait (it yielded ``waiting_on`` to the
    event loop): what ``await coro`` would have done from there on.

    faust's loop runs every message's callback as ``wait_first(callback, suspend_flow.wait())``:
    four tasks and an ``asyncio.wait`` per message (about 7 % of the worker's CPU on REES46,
    py-spy). A callback that finishes without waiting, the usual case, cannot be interrupted by a
    suspension either (nothing else runs meanwhile), so ``_drain_messages`` runs it to its end
    directly and only hands one that waits to ``wait_first``, through this."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # thrown into the waiting task (a cancellation): pass it on
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    """``_resume`` as a native coroutine (``wait_first`` takes awaitables, not generators)."""
    return await _resume(coro, waiting_on)


def install(app: Any, on_jump: Any = None, checkpoint: Any = None) -> None:
    """Make ``app`` create its consumer from ``ShopstreamConsumer`` (before it is first used),
    with this app's hooks (a class of its own: several apps may live in one process)."""
    hooks = {
        "on_jump": staticmethod(on_jump) if on_jump is not None else None,
        "checkpoint": staticmethod(checkpoint) if checkpoint is not None else None,
    }
    app.transport.Consumer = type("ShopstreamConsumer", (ShopstreamConsumer,), hooks)
