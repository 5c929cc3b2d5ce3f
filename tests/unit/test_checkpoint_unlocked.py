"""``streams.checkpoint.Checkpoints``: a commit takes the tables' changes under the lock and writes
them after releasing it; batches meanwhile read what it took, writes stay in the order taken, and
the offsets are committed only once every write and record taken is acknowledged. Through the
consumer's own ``_commit_tps`` and the real ``DirectChangelog``, against a fake aiokafka producer,
without Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from streams.baseline import partition_of_key
from streams.changelog import DirectChangelog
from streams.checkpoint import Checkpoints
from streams.delivery import Deliveries
from streams.writeback import WriteBack
from tests.unit.test_changelog import Producer, Store, table
from tests.unit.test_checkpoint import _Commits, _consumer


@contextmanager
def _scope(p: int) -> Iterator[None]:
    yield


class Refusing(Producer):
    """Refuses to send to ``partition`` (a closed producer, an oversized record)."""

    def __init__(self, partition: int) -> None:
        super().__init__()
        self.partition = partition

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        if partition == self.partition:
            raise RuntimeError("producer closed")
        return await super().send_batch(batch, topic, partition=partition)


def _setup(producer: Producer) -> tuple[Store, WriteBack, Deliveries, Checkpoints, asyncio.Lock]:
    store = Store()
    store.update({b"0/a": b"a0", b"1/b": b"b0", b"2/c": b"c0"})
    wb = WriteBack(store, partition_of_key)
    deliveries = Deliveries(5.0)
    work = asyncio.Lock()
    changelog = DirectChangelog(table(store), lambda: producer, deliveries)
    return store, wb, deliveries, Checkpoints([(wb, changelog)], _scope, work, [deliveries], 5.0), work


async def _turns(done: Callable[[], bool], each: Callable[[], None] = lambda: None) -> None:
    """Let the other tasks run, calling ``each()`` before every turn, until ``done()``: a bounded
    number of event-loop turns, never a clock."""
    for _ in range(1000):
        if done():
            return
        each()
        await asyncio.sleep(0)
    raise AssertionError("never done")


def _ack_all(producer: Producer) -> None:
    for n, (_, _, _, fut) in enumerate(producer.sent):
        if not fut.done():
            fut.set_result(type("Meta", (), {"offset": n})())


def test_a_batch_runs_while_the_checkpoint_writes_and_reads_what_it_took(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: list[str] = []
    _Commits(monkeypatch, steps, {"tp0": 9})
    producer = Producer()
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        store, wb, deliveries, ck, work = _setup(producer)
        output = loop.create_future()
        deliveries.add(output)  # an output of an event before the offsets
        for key in (b"0/a", b"1/b", b"2/c"):
            wb[key] = key[2:] + b"1"

        async def batch() -> None:
            async with work:  # free as soon as the offsets are computed
                steps.append("batch")
                seen["stored"] = {k: store.get(k) for k in (b"0/a", b"2/c")}
                seen["read"] = {k: wb[k] for k in (b"0/a", b"2/c")}
                wb[b"0/a"] = b"a2"  # changed again: the next checkpoint's, never overwritten
                wb[b"2/c"] = b"c2"
                deliveries.add(loop.create_future())  # a record of an event after the offsets

        commit = asyncio.ensure_future(_consumer(ck.checkpoint)._commit_tps(["tp0"], True))
        await asyncio.sleep(0)  # the commit takes the lock first
        waiting = asyncio.ensure_future(batch())
        await _turns(lambda: len(producer.sent) == 3 and waiting.done())
        assert not commit.done()  # nothing acknowledged yet
        _ack_all(producer)
        await asyncio.sleep(0)
        assert not commit.done()  # the output taken is not acknowledged yet
        output.set_result("ack")
        assert await commit is True
        assert store == {b"0/a": b"a1", b"1/b": b"b1", b"2/c": b"c1"}  # what was taken
        assert wb.pending == {b"0/a": b"a2", b"2/c": b"c2"} and wb.writing == {}
        assert wb[b"0/a"] == b"a2" and wb[b"1/b"] == b"b1"
        assert len(deliveries) == 1  # the batch's record waits for the next commit

    asyncio.run(scenario())
    # the batch ran in the middle of the write: partition 0 stored, partition 2 not yet; it read
    # the values taken, never the store's older ones
    assert seen["stored"] == {b"0/a": b"a1", b"2/c": b"c0"}
    assert seen["read"] == {b"0/a": b"a1", b"2/c": b"c1"}
    assert steps == ["offsets computed", "batch", "faust's attached sends", "commit [('tp0', 9)]"]


def test_an_early_write_waits_for_the_checkpoints_and_stores_the_newer_value() -> None:
    producer = Producer()

    async def scenario() -> None:
        store, wb, _, ck, work = _setup(producer)
        wb[b"0/a"], wb[b"2/c"] = b"a1", b"c1"
        order: list[str] = []

        async def commit() -> None:
            async with ck.checkpoint():
                pass
            order.append("checkpoint confirmed")

        async def batch() -> None:
            async with work:
                wb[b"2/c"] = b"c2"
                await ck.write_pending()  # a full buffer: written at once, after the checkpoint's
                order.append(f"early write stored {store[b'2/c']!r}")

        task = asyncio.ensure_future(commit())
        await asyncio.sleep(0)
        early = asyncio.ensure_future(batch())
        await _turns(early.done, lambda: _ack_all(producer))
        await _turns(task.done, lambda: _ack_all(producer))
        assert order.count("early write stored b'c2'") == 1
        assert store[b"2/c"] == b"c2" and wb.pending == {} and wb.writing == {}
        # the checkpoint's partition-2 record went out before the early write's
        sent = [records for _, p, records, _ in producer.sent if p == 2]
        assert sent == [[(b"2/c", b"c1")], [(b"2/c", b"c2")]]

    asyncio.run(scenario())


def test_a_failed_write_commits_nothing_keeps_the_changes_and_confirms_the_records_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: list[str] = []
    _Commits(monkeypatch, steps, {"tp0": 9})
    producer = Refusing(partition=1)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        _, wb, deliveries, ck, work = _setup(producer)
        output = loop.create_future()
        deliveries.add(output)
        wb[b"0/a"], wb[b"1/b"] = b"a1", b"b1"
        commit = asyncio.ensure_future(_consumer(ck.checkpoint)._commit_tps(["tp0"], True))

        def ack() -> None:
            if not output.done():
                output.set_result("ack")
            _ack_all(producer)

        await _turns(commit.done, ack)
        assert commit.result() is False  # logged by the consumer; the events are redelivered
        assert output.done() and len(deliveries) == 0  # the output was confirmed all the same
        # the changes are pending again (partition 0's was stored: written again, harmless)
        assert wb.pending == {b"0/a": b"a1", b"1/b": b"b1"} and wb.writing == {}
        assert not ck.writing.locked() and not work.locked()
        assert wb[b"1/b"] == b"b1"  # (the store took it before the send failed: rewritten later)

    asyncio.run(scenario())
    assert not [s for s in steps if s.startswith("commit")]


def test_offsets_that_fail_to_be_computed_give_back_everything_taken() -> None:
    producer = Producer()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        store, wb, deliveries, ck, work = _setup(producer)
        output = loop.create_future()
        deliveries.add(output)
        wb[b"0/a"] = b"a1"
        with pytest.raises(RuntimeError, match="offsets"):
            async with ck.checkpoint():
                raise RuntimeError("offsets")
        assert wb.pending == {b"0/a": b"a1"} and wb.writing == {} and store[b"0/a"] == b"a0"
        assert len(deliveries) == 1 and producer.sent == []
        assert not ck.writing.locked() and not work.locked()

    asyncio.run(scenario())


def test_written_leaves_a_newer_take_and_a_failure_never_overwrites_a_newer_change() -> None:
    store = Store()
    wb = WriteBack(store, partition_of_key)
    wb[b"0/a"], wb[b"0/b"] = b"a1", b"b1"
    first = wb.take()
    assert wb[b"0/a"] == b"a1" and sorted(wb) == [b"0/a", b"0/b"]  # read while being written
    wb[b"0/a"] = b"a2"
    del wb[b"0/b"]
    second = wb.take()  # taken again before the first write finished
    assert b"0/b" not in wb and wb.get(b"0/b") is None and sorted(wb) == [b"0/a"]
    wb.written(first)  # the first write done: the second's values stay readable
    assert wb[b"0/a"] == b"a2" and wb.writing == {b"0/a": b"a2", b"0/b": None}
    wb[b"0/a"] = b"a3"
    wb.written(second, stored=False)  # failed: pending again, but never over the newer a3
    assert wb.pending == {b"0/a": b"a3", b"0/b": None} and wb.writing == {}
