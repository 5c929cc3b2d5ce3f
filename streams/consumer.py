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

Records handed on and then dropped. faust clears every stream queue whenever it resumes the flow
(``FlowControlEvent.resume``), and its recovery resumes the stream partitions and the fetcher
before its last seek to the committed offsets and that last resume (faust-streaming#596): records
handed on in between are dropped unprocessed. The consumer's count of what it handed on then runs
ahead of what any stream will ack. Where the partition had a committed offset, the commit stalled
at the first dropped record (a partition never committed again, its events answered twice after
the next rebalance). Where it had none (a partition taken over from a worker killed before its
first commit), faust's head-of-run check does not apply and the group committed past the dropped
records: events no worker folded (issue: two workers, one killed, 321 of 3,000 unanswered; in
another run promotions lost). The fixes, all here:
- ``perform_seek`` seeks every partition it positioned to its committed offset again afterwards, so
  the position and the next offset to hand on agree with what the streams will ack;
- every record handed on is tracked (``HandedOn``) by a weak reference until a stream acks it; one
  released unacked was dropped. When faust clears the queues (its flow control's ``clear``, which
  ``resume`` calls) the oldest dropped record of each partition becomes at once the next one to
  hand on, so no later record is handed on before it (that would fold a user's events out of
  order), and the fetch loop seeks back to it (logged, counted in
  ``shopstream_records_refetched_total``); a record released unacked at any other time is found
  by the fetch loop;
- the fetch loop hands nothing on after one of its own awaits if the flow stopped or the
  generation changed meanwhile (a record of the revoked assignment);
- ``_new_offset`` commits only a run of acks that starts at the committed offset: faust's check
  lets a run start one past it and so commits over a record still in flight (faust-streaming#606).

Records taken from aiokafka and dropped unseen. faust pauses a partition only in its own set of
active partitions: aiokafka keeps fetching it, and faust's ``getmany`` drops what aiokafka returns
for a partition not in that set (or returns while the flow is stopped) after aiokafka has moved
its position past them. faust's last seek to the committed offsets repairs that, except for a
partition without a committed offset, which it leaves where it is (aiokafka's
``seek_to_committed`` skips it): a partition taken over from a worker killed before its first
commit was then never read from its start, and with all its records already fetched, never
answered at all (issue: worker b answered none of a's partitions; faust-streaming#166 reports the
same symptom). And aiokafka is handed faust's very set of active partitions, which faust empties in
place when it pauses them, while aiokafka takes an empty set for "every partition". The fixes:
- ``perform_seek`` seeks every acking partition without a committed offset to its first offset
  (the worker's reset policy, earliest), and ``_new_offset`` then commits for it only a run of
  acks that starts there;
- ``_getmany`` hands aiokafka a copy of the set.

aiokafka's seek from the wrong thread. faust seeks a partition by calling aiokafka from the
worker's thread while aiokafka's fetcher runs on the consumer's thread; the seek deletes buffered
records the fetcher may be iterating, and the fetcher crashes with a ``KeyError``
(robinhood/aiokafka#19). ``_seek`` runs it on the consumer's thread, as faust's other seeks do.

A second addition, for the worker's write-back tables (``streams.writeback``): each commit
(``_commit_tps``, faust's step after it picked the partitions with acks) runs inside
``checkpoint()``, an async context the worker installs (``streams.checkpoint``). On entry it takes
the lock that batches and timers hold, and takes the pending table changes and every record
handed to the producer so far (outputs, forwards, dead letters) to be written and confirmed; the
offsets are computed inside, under the lock, so they cover no event whose outputs and state are
not among those taken. On exit it releases the lock, writes the changes taken to their stores and
changelogs while batches go on, and waits for the acknowledgements of those writes and records;
only then are the offsets committed. So no offset is committed before every output and state
change of the events before it is acknowledged, and scoring stops only while the changes and
records are taken, not for the writes, the broker's round trips or the offset commit itself.
A checkpoint that fails commits nothing: a delivery failure ends the process before the commit
(``streams.delivery.exit_fatally``), anything else (a store already closed at shutdown) skips this
commit, and the events since the last one are redelivered after the restart.
"""

from __future__ import annotations

import asyncio
import logging
import types
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from faust.exceptions import ProducerSendError
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer

from streams.delivery import exit_fatally
from streams.errors import DeliveryFailed

log = logging.getLogger(__name__)


class _Handed:
    __slots__ = ("acked", "message", "offset")

    def __init__(self, offset: int, message: weakref.ref[Any]) -> None:
        self.offset = offset
        self.message = message
        self.acked = False


class HandedOn:
    """The records handed on to streams, per partition, until acked: the oldest one released
    unacked (a queue cleared under it) is where reading must start again.

    In: ``hand(tp, offset, message)`` for each record handed on, in order; ``ack(tp, offset)`` as
    streams ack them; ``forget(tp, from_offset)`` when the partition is revoked or sought back.
    Out: ``dropped()``, per partition, the offset of the oldest record released without an ack.
    Messages are held by weak references: while a queue, a buffer or a batch holds a record it
    is on its way; once nothing does and no ack came, it was dropped."""

    def __init__(self) -> None:
        self._handed: dict[Any, deque[_Handed]] = {}
        self._by_offset: dict[Any, dict[int, _Handed]] = {}

    def hand(self, tp: Any, offset: int, message: Any) -> None:
        entry = _Handed(offset, weakref.ref(message))
        q = self._handed.get(tp)
        if q is None:
            q = self._handed[tp] = deque()
            self._by_offset[tp] = {}
        q.append(entry)
        self._by_offset[tp][offset] = entry

    def ack(self, tp: Any, offset: int) -> None:
        by_offset = self._by_offset.get(tp)
        entry = by_offset.get(offset) if by_offset is not None else None
        if entry is not None:
            entry.acked = True

    def forget(self, tp: Any, from_offset: int | None = None) -> None:
        """Drop the entries of ``tp`` (from ``from_offset`` on): they will be handed on again."""
        q = self._handed.get(tp)
        if q is None:
            return
        if from_offset is None:
            del self._handed[tp], self._by_offset[tp]
            return
        by_offset = self._by_offset[tp]
        kept = deque(e for e in q if e.offset < from_offset)
        for e in q:
            if e.offset >= from_offset and by_offset.get(e.offset) is e:
                del by_offset[e.offset]
        self._handed[tp] = kept

    def dropped(self, everywhere: bool = False) -> dict[Any, int]:
        """Partitions with a record released unacked -> the offset of the oldest such record.
        Acked records at the head are let go on the way. A record still referenced ends the
        search in its partition (cheap, for every fetch), unless ``everywhere``: then records
        behind it are looked at too (once a queue was cleared, while older records still wait
        in a stream's buffer)."""
        out: dict[Any, int] = {}
        for tp, q in self._handed.items():
            by_offset = self._by_offset[tp]
            while q:
                head = q[0]
                if head.acked:
                    q.popleft()
                    if by_offset.get(head.offset) is head:
                        del by_offset[head.offset]
                    continue
                if head.message() is None:
                    out[tp] = head.offset
                elif everywhere:
                    gone = next((e.offset for e in q if not e.acked and e.message() is None), None)
                    if gone is not None:
                        out[tp] = gone
                break
        return out

    def __len__(self) -> int:
        return sum(len(q) for q in self._handed.values())


def first_unacked_run_end(acked: list[int], committed: int | None) -> int | None:
    """The offset to commit for ``acked`` (sorted, unique) past ``committed``: one past the run of
    consecutive acked offsets that starts at ``committed`` (None: at the first acked offset, no
    commit yet); None when the run does not start there (the head is still in flight)."""
    if not acked or (committed is not None and acked[0] > committed):
        return None
    end = 0
    while end + 1 < len(acked) and acked[end + 1] == acked[end] + 1:
        end += 1
    return acked[end] + 1


class ShopstreamConsumer(Consumer):  # type: ignore[misc]
    on_jump: Any = None  # called with (tp, expected offset, offset) for each offset jump
    on_refetch: Any = None  # called with (tp, offset) for each dropped record read again
    # () -> async context manager: on entry the lock taken, the pending state and the records
    # sent so far taken; on exit the lock released, that state written, and all of it confirmed
    # (``streams.checkpoint``)
    checkpoint: Any = None

    async def _commit_tps(self, tps: Any, start_new_transaction: bool) -> bool:
        """faust's ``_commit_tps`` with the offsets computed inside the worker's checkpoint and
        committed once its records are acknowledged (module docstring)."""
        if self.checkpoint is None:
            return bool(await super()._commit_tps(tps, start_new_transaction=start_new_transaction))
        try:
            async with self.checkpoint():
                offsets = self._filter_committable_offsets(tps)
        except DeliveryFailed as exc:
            exit_fatally("checkpointing the tables before a commit", exc)
        except Exception:
            log.exception("checkpoint failed: offsets not committed (the events since are redelivered)")
            return False
        if not offsets:
            return False
        try:
            await self._handle_attached(offsets)  # faust's own buffered sends, as in its commit
        except ProducerSendError as exc:
            await self.crash(exc)
            return False
        return bool(await self._commit_offsets(offsets, start_new_transaction=start_new_transaction))

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        """Never called by ``_drain_messages`` below; kept inert should faust call it elsewhere."""

    _expected: dict[Any, int]  # acking partition -> next offset to hand on
    _handed_on: HandedOn
    _rewinds: dict[Any, int]  # partition -> dropped offset to seek back to (queues cleared)
    _n_acked: int  # faust's count of acks since the last commit
    _first: dict[Any, int]  # never-committed partition -> first offset it was sought to

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        for tp in revoked:
            self._expected_offsets().pop(tp, None)
            self._first_offsets().pop(tp, None)
            self._handed().forget(tp)
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any], generation_id: int = 0) -> None:
        """Forget what was handed on for the assigned partitions: records handed on after their
        revocation began (the fetch loop was mid-fetch) belong to the old assignment; reading
        starts afresh at the committed offset."""
        self._watch_queue_clearing()
        for tp in assigned:
            self._expected_offsets().pop(tp, None)
            self._first_offsets().pop(tp, None)
            self._handed().forget(tp)
            self._pending_rewinds().pop(tp, None)
        await super().on_partitions_assigned(assigned, generation_id)

    def _watch_queue_clearing(self) -> None:
        """Have faust's flow control tell this consumer each time it clears the stream queues."""
        flow = self.app.flow_control
        if getattr(flow, "shopstream_watched", False):
            return
        clear = flow.clear

        def clear_then_rewind() -> None:
            clear()
            self.on_queues_cleared()

        flow.clear = clear_then_rewind  # resume() calls self.clear()
        flow.shopstream_watched = True

    def on_queues_cleared(self) -> None:
        """faust dropped what its stream queues held: from now on each partition's next record
        to hand on is its oldest dropped one, at once, so that no later record is handed on
        before it is read again (the fetch loop seeks back to it)."""
        expected = self._expected_offsets()
        handed = self._handed()
        rewinds = self._pending_rewinds()
        for tp, offset in handed.dropped(everywhere=True).items():
            want = expected.get(tp)
            handed.forget(tp, offset)
            if want is None or offset >= want:
                continue  # revoked, or already sought back before it (perform_seek)
            expected[tp] = offset
            rewinds[tp] = offset
            self._refetching(tp, offset)

    async def perform_seek(self) -> None:
        """faust's seek to the committed offsets, then the same seek again for every partition
        it found a committed offset for: the fetcher may have run during faust's seek (its
        recovery resumes the stream partitions first), and what it handed on meanwhile is
        cleared from the queues when faust resumes the flow right after (faust-streaming#596).

        A partition without a committed offset is sought to its first offset (the worker's
        ``auto_offset_reset``, earliest), where faust leaves it wherever fetching got to: records
        aiokafka returned while faust had the partition paused, or while the flow was stopped,
        were consumed from aiokafka and dropped by faust's ``getmany`` unseen, and without this
        seek no stream ever read them (a partition taken over from a worker killed before its
        first commit went unanswered; faust-streaming#166)."""
        await super().perform_seek()  # sets the read offset of every assigned partition: None where no commit
        acks_enabled_for = self.app.topics.acks_enabled_for
        assigned = self.assignment()
        ours = [tp for tp in assigned if acks_enabled_for(tp.topic)]
        fresh = sorted(tp for tp in ours if self._read_offset.get(tp) is None)
        for tp in ours:
            offset = self._read_offset.get(tp)
            if offset is not None:
                await self.seek(tp, offset)
        if fresh:
            starts = await self.earliest_offsets(*fresh)
            for tp in fresh:
                position = self._kafka_position(tp)
                if position is not None and position > starts[tp]:
                    log.warning(
                        "%s[%d]: no committed offset, and fetching had got to %d before faust's seek; "
                        "reading again from the first offset %d (what faust took from aiokafka while "
                        "it had the partition paused was dropped unseen; what it handed on is cleared "
                        "with the queues)",
                        tp.topic,
                        tp.partition,
                        position,
                        starts[tp],
                    )
                    if self.on_refetch is not None:
                        self.on_refetch(tp, starts[tp])
                await self.seek(tp, starts[tp])
                self._first_offsets()[tp] = starts[tp]

    def _kafka_position(self, tp: Any) -> int | None:
        """aiokafka's position for ``tp`` as it stands (None: unknown, or awaiting its reset)."""
        states = self._kafka_states()
        state = states.state_value(tp) if states is not None else None
        return state._position if state is not None and state.has_valid_position else None

    def _kafka_states(self) -> Any:
        """aiokafka's per-partition fetch states of the current assignment (None: none yet)."""
        try:
            subscription = self._thread._ensure_consumer()._subscription.subscription
        except Exception:  # not started yet, or stopped
            return None
        return subscription.assignment if subscription is not None else None

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        """faust's fetch with a copy of its set of active partitions: aiokafka reads the set
        while it waits for records, faust pauses partitions by emptying that very set, and
        aiokafka takes an empty set for "every partition" (``fetched_records``: ``if partitions
        and tp not in partitions``): it then returned the records of every assigned partition,
        changelogs included, and faust dropped all those it had paused."""
        if active_partitions is not None:
            active_partitions = set(active_partitions)
        return await super()._getmany(active_partitions=active_partitions, timeout=timeout)

    async def _seek(self, partition: Any, offset: int) -> None:
        """aiokafka's seek, on the consumer's own thread. faust calls it from the worker's thread
        (``Consumer._seek``), where aiokafka's ``Fetcher.seek_to`` deletes the partition's buffered
        records while the consumer thread may be iterating them in ``fetched_records``: a
        ``KeyError`` there crashes the fetcher and the worker (robinhood/aiokafka#19; seen here in
        the two-worker takeover test, right after ``perform_seek``'s seeks). faust's other seeks
        (``seek_to_committed``, ``seek_wait``) already go through ``call_thread``."""
        await self._thread.call_thread(self._thread.seek, partition, offset)

    async def seek(self, partition: Any, offset: int) -> None:
        await super().seek(partition, offset)
        self._expected_offsets()[partition] = offset
        self._handed().forget(partition, offset)

    def ack(self, message: Any) -> bool:
        self._handed().ack(message.tp, message.offset)
        return bool(super().ack(message))

    def _new_offset(self, tp: Any) -> int | None:
        """faust's offset to commit, with the head of the run checked exactly: it must start at
        the committed offset (faust lets it start one past it, faust-streaming#606), or, for a
        partition never committed, at the first offset ``perform_seek`` sought it to (faust
        lets it start anywhere). No gaps are ever marked (``_add_gap``), so faust's gap
        handling has nothing to add here."""
        acked = self._acked[tp]
        if not acked:
            return None
        acked.sort()
        committed = self._committed_offset[tp]
        if committed is None:
            committed = self._first_offsets().get(tp)
        new = first_unacked_run_end(acked, committed)
        if new is None:
            return None
        done = [o for o in acked if o < new]
        del acked[: len(done)]
        self._acked_index[tp].difference_update(done)
        return new

    def _expected_offsets(self) -> dict[Any, int]:
        try:
            return self._expected
        except AttributeError:
            self._expected = {}
            return self._expected

    def _handed(self) -> HandedOn:
        try:
            return self._handed_on
        except AttributeError:
            self._handed_on = HandedOn()
            return self._handed_on

    def _first_offsets(self) -> dict[Any, int]:
        try:
            return self._first
        except AttributeError:
            self._first = {}
            return self._first

    def _pending_rewinds(self) -> dict[Any, int]:
        try:
            return self._rewinds
        except AttributeError:
            self._rewinds = {}
            return self._rewinds

    def _refetching(self, tp: Any, offset: int) -> None:
        log.warning(
            "%s[%d]: record %d was handed to a stream and dropped unprocessed (a queue cleared by "
            "faust); reading again from it",
            tp.topic,
            tp.partition,
            offset,
        )
        if self.on_refetch is not None:
            self.on_refetch(tp, offset)

    async def _seek_back_dropped(self, expected: dict[Any, int], rewound: dict[Any, int]) -> None:
        """Seek each partition with a record handed on and dropped unprocessed back to it: the
        ones found when faust cleared the queues (``on_queues_cleared``), and any released
        unacked since."""
        handed = self._handed()
        rewinds = self._pending_rewinds()
        dropped = handed.dropped()
        if not (dropped or rewinds):
            return
        assigned = self.assignment()
        for tp, offset in dropped.items():
            want = expected.get(tp)
            handed.forget(tp, offset)
            if tp not in assigned or want is None or offset >= want:
                continue  # revoked, or already sought back before it (perform_seek)
            expected[tp] = rewinds[tp] = offset
            self._refetching(tp, offset)
        for tp, offset in list(rewinds.items()):
            del rewinds[tp]
            if tp not in assigned or expected.get(tp) != offset:
                continue  # revoked, or sought elsewhere since
            rewound[tp] = offset
            await self.seek(tp, offset)

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
        handed = self._handed()
        rewinds = self._pending_rewinds()
        app = self.app
        n = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self._seek_back_dropped(expected, rewound)
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
                        # faust's getmany checked the flow and the generation before it yielded
                        # this record; a rebalance may have begun during the sleep
                        if not self.flow_active or message.generation_id != app.consumer_generation_id:
                            break
                    if tp in skip:
                        continue
                    offset = message.offset
                    if acks_enabled_for(message.topic):
                        want = expected.get(tp)
                        if want is not None and offset < want:
                            continue  # handed on before (faust: "DROPPED MESSAGE ROFF")
                        if want is not None and offset > want and rewound.get(tp) != want:
                            if rewinds.pop(tp, None) != want:  # else: on_queues_cleared said why
                                self._jumped(tp, want, offset)
                            rewound[tp] = want
                            skip.add(tp)
                            await self.seek(tp, want)
                            continue
                        rewound.pop(tp, None)
                        expected[tp] = offset + 1
                        handed.hand(tp, offset, message)
                    else:
                        r_offset = read_offset[tp]
                        if r_offset is not None and offset < r_offset:
                            continue
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                        if not self.flow_active or message.generation_id != app.consumer_generation_id:
                            break  # a rebalance began: the assignment starts these partitions afresh
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

    def state(self) -> dict[str, Any]:
        """Where fetching stands, per assigned partition (``/debug/consumer``): what a stalled
        partition is read against. faust's view (active, paused, buffered; committed, read and
        next offsets to hand on) beside aiokafka's (position, awaiting an offset reset, paused,
        last fetched highwater)."""
        faust_active = self._active_partitions or set()
        expected = self._expected_offsets()
        kassignment = self._kafka_states()
        parts = []
        for tp in sorted(self.assignment()):
            row: dict[str, Any] = {
                "topic": tp.topic,
                "partition": tp.partition,
                "active": tp in faust_active,
                "paused": tp in self._paused_partitions,
                "buffered": tp in self._buffered_partitions,
                "committed": self._committed_offset.get(tp),
                "read": self._read_offset.get(tp),
                "next": expected.get(tp),
                "highwater": self.highwater(tp),
            }
            ks = kassignment.state_value(tp) if kassignment is not None else None
            if ks is not None:
                row["kafka"] = {
                    "position": ks._position,
                    "awaiting_reset": ks.awaiting_reset,
                    "paused": ks.paused,
                    "highwater": ks.highwater,
                }
            parts.append(row)
        return {
            "flow_active": self.flow_active,
            "flow_control_active": self.app.flow_control.is_active(),
            "in_recovery": self.app.in_recovery,
            "generation": self.app.consumer_generation_id,
            "handed_unacked": len(self._handed()),
            "partitions": parts,
        }

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


def install(
    app: Any,
    on_jump: Callable[[Any, int, int], None] | None = None,
    checkpoint: Any = None,
    on_refetch: Callable[[Any, int], None] | None = None,
) -> None:
    """Make ``app`` create its consumer from ``ShopstreamConsumer`` (before it is first used),
    with this app's hooks (a class of its own: several apps may live in one process)."""
    hooks = {
        "on_jump": staticmethod(on_jump) if on_jump is not None else None,
        "checkpoint": staticmethod(checkpoint) if checkpoint is not None else None,
        "on_refetch": staticmethod(on_refetch) if on_refetch is not None else None,
    }
    app.transport.Consumer = type("ShopstreamConsumer", (ShopstreamConsumer,), hooks)
