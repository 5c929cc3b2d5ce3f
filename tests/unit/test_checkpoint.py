"""Table writes checkpointed once per changed key per commit, and offsets committed only inside
the checkpoint (``streams.writeback``, ``streams.consumer``), without Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import faust.transport.consumer
import orjson
import pytest

from streams import consumer as consumer_module
from streams.baseline import CovisitBaseline, partition_of_key
from streams.consumer import install
from streams.delivery import Deliveries
from streams.errors import DeliveryFailed
from streams.pipeline import Message, local_pipeline
from streams.settings import Settings
from streams.state import user_partition
from streams.writeback import WriteBack


class Recording(dict[bytes, bytes]):
    """A dict that counts its writes and deletes (a changelogged table's records)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.writes.append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: bytes) -> None:
        self.writes.append(key)
        super().__delitem__(key)


def _first_byte(key: bytes) -> int:
    return key[0] - ord("0")


def test_reads_see_pending_writes_and_deletes_before_the_table_does() -> None:
    table = Recording()
    table[b"1/a"] = b"old"
    table.writes.clear()
    wb = WriteBack(table, _first_byte)
    wb[b"1/a"] = b"new"
    wb[b"2/b"] = b"x"
    assert wb[b"1/a"] == b"new" and wb.get(b"2/b") == b"x" and table[b"1/a"] == b"old"
    del wb[b"2/b"]
    assert b"2/b" not in wb and wb.get(b"2/b", b"none") == b"none"
    with pytest.raises(KeyError):
        wb[b"2/b"]
    with pytest.raises(KeyError):
        del wb[b"3/never"]
    assert sorted(wb) == [b"1/a"] and len(wb) == 1
    assert table.writes == []


def test_flush_writes_each_changed_key_once_inside_its_partition_scope() -> None:
    table = Recording()
    table[b"2/gone"] = b"v"
    table.writes.clear()
    wb = WriteBack(table, _first_byte)
    for i in range(5):
        wb[b"1/a"] = b"%d" % i
    wb[b"2/born-and-deleted"] = b"v"
    del wb[b"2/born-and-deleted"]
    del wb[b"2/gone"]
    scopes: list[int] = []

    @contextmanager
    def scope(p: int) -> Iterator[None]:
        scopes.append(p)
        yield

    assert wb.flush(scope) == 3
    assert table == {b"1/a": b"4"}
    # one write for five changes; a delete of a key the table never held writes nothing
    assert sorted(table.writes) == [b"1/a", b"2/gone"]
    assert sorted(scopes) == [1, 2, 2] and wb.pending == {}
    assert wb.flush(scope) == 0


def test_flush_and_discard_by_partition_or_key() -> None:
    table = Recording()
    wb = WriteBack(table, _first_byte)
    for key in (b"1/a", b"1/b", b"2/c", b"3/d"):
        wb[key] = b"v"
    assert wb.flush(partitions={1}, keys={b"1/a", b"2/c"}) == 1
    assert table == {b"1/a": b"v"}
    assert wb.flush(partitions={2}) == 1 and b"2/c" in table
    assert wb.discard({3}) == 1 and b"3/d" not in wb
    assert set(wb.pending) == {b"1/b"}


def _events(n_batches: int) -> list[list[Message]]:
    t0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    batches = []
    for b in range(n_batches):
        batch = []
        for u in ("u1", "u2"):
            raw = {
                "schema_version": 1,
                "type": "view",
                "event_id": f"{u}-{b}",
                "user_id": u,
                "event_time": (t0 + timedelta(seconds=b)).isoformat(),
                "item_id": f"sku-{b % 3}",
            }
            key = u.encode()
            batch.append(Message(user_partition(key, 8), key, orjson.dumps(raw), None))
        batches.append(batch)
    return batches


def test_a_pipeline_on_write_back_tables_stores_what_a_direct_one_does_with_fewer_writes() -> None:
    """Known answer: the same batches through a pipeline writing its tables directly (once per
    batch) and through write-back views flushed once leave identical tables and outputs; the
    write-back one wrote each key once."""
    settings = Settings(promotions=False)
    direct = local_pipeline(settings, 100.0, clock=lambda: 1_800_000_000.0)
    viewed = local_pipeline(settings, 100.0, clock=lambda: 1_800_000_000.0)
    users, items = Recording(), Recording()
    direct_users, direct_items = Recording(), Recording()
    direct.users = direct_users
    direct.recommender = CovisitBaseline(direct_items, neighbors=50, window=3)
    users_wb = WriteBack(users, lambda k: user_partition(k, 8))
    items_wb = WriteBack(items, partition_of_key)
    viewed.users = users_wb
    viewed.recommender = CovisitBaseline(items_wb, neighbors=50, window=3)
    out_direct, out_viewed = [], []
    for batch in _events(4):
        out_direct += direct.process(batch).outputs
        out_viewed += viewed.process(batch).outputs
    assert users == {} and items == {}  # nothing written before the checkpoint
    users_wb.flush()
    items_wb.flush()

    def strip(outputs: list[Any]) -> list[Any]:
        return [(o.topic, o.key, {**orjson.loads(o.value), "generated_at": None}) for o in outputs]

    assert strip(out_viewed) == strip(out_direct)
    assert dict(users) == dict(direct_users) and dict(items) == dict(direct_items)
    assert len(direct_users.writes) == 8 and sorted(users.writes) == [b"u1", b"u2"]
    assert len(items.writes) == len(items) < len(direct_items.writes)


def _consumer(checkpoint: Any) -> Any:
    app = SimpleNamespace(transport=SimpleNamespace(Consumer=None))
    install(app, checkpoint=checkpoint)
    return object.__new__(app.transport.Consumer)


class _Commits:
    """faust's steps around ``_commit_tps`` recorded, with ``offsets`` as the committable ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, steps: list[str], offsets: dict[str, int]) -> None:
        cls = faust.transport.consumer.Consumer

        def filter_committable(consumer: Any, tps: Any) -> dict[str, int]:
            steps.append("offsets computed")
            return dict(offsets)

        async def handle_attached(consumer: Any, offsets: Any) -> None:
            steps.append("faust's attached sends")

        async def commit_offsets(consumer: Any, offsets: Any, start_new_transaction: bool = True) -> bool:
            steps.append(f"commit {sorted(offsets.items())}")
            return True

        monkeypatch.setattr(cls, "_filter_committable_offsets", filter_committable)
        monkeypatch.setattr(cls, "_handle_attached", handle_attached)
        monkeypatch.setattr(cls, "_commit_offsets", commit_offsets)


def test_offsets_are_computed_under_the_lock_and_committed_once_confirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: list[str] = []
    _Commits(monkeypatch, steps, {"tp0": 7})

    @asynccontextmanager
    async def checkpoint() -> AsyncIterator[None]:
        steps.append("lock taken, state and records taken")
        yield
        steps.append("lock released")
        steps.append("state written, it and the records confirmed")

    assert asyncio.run(_consumer(checkpoint)._commit_tps(["tp0"], True)) is True
    assert steps == [
        "lock taken, state and records taken",
        "offsets computed",
        "lock released",
        "state written, it and the records confirmed",
        "faust's attached sends",
        "commit [('tp0', 7)]",
    ]
    steps.clear()
    _Commits(monkeypatch, steps, {})  # nothing acked: the state is still checkpointed
    assert asyncio.run(_consumer(checkpoint)._commit_tps([], True)) is False
    assert steps == [
        "lock taken, state and records taken",
        "offsets computed",
        "lock released",
        "state written, it and the records confirmed",
    ]


def test_a_batch_runs_while_the_checkpoint_waits_for_acknowledgements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's checkpoint shape (``streams.checkpoint``, tested whole in
    ``test_checkpoint_unlocked``): the lock is free during the wait, and the offsets computed
    under it are committed only once the records taken then are acknowledged; a record sent by a
    batch during the wait is not among them."""
    steps: list[str] = []
    _Commits(monkeypatch, steps, {"tp0": 3})

    def exit_fatally(what: str, exc: BaseException) -> None:  # were the lock held: a timeout
        raise SystemExit(f"{what}: {exc}")

    monkeypatch.setattr(consumer_module, "exit_fatally", exit_fatally)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()
        deliveries = Deliveries(timeout_s=5.0)
        before = loop.create_future()
        deliveries.add(before)  # an output of an event before the offsets

        @asynccontextmanager
        async def checkpoint() -> AsyncIterator[None]:
            async with lock:
                taken = deliveries.take()
                yield
            steps.append(f"confirmed {await taken.confirm()}")

        async def batch() -> None:
            async with lock:
                steps.append("batch")
                deliveries.add(loop.create_future())  # never acknowledged: not the commit's
                before.set_result("ack")  # the broker acknowledges the earlier record meanwhile

        commit = asyncio.ensure_future(_consumer(checkpoint)._commit_tps(["tp0"], True))
        await asyncio.sleep(0)  # the commit takes the lock first
        await batch()
        assert await commit is True
        assert len(deliveries) == 1

    asyncio.run(scenario())
    assert steps == [
        "offsets computed",
        "batch",
        "confirmed 1",
        "faust's attached sends",
        "commit [('tp0', 3)]",
    ]


def test_a_failed_checkpoint_commits_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[str] = []
    _Commits(monkeypatch, steps, {"tp0": 7})

    def failing(exc: Exception, where: str) -> Any:
        @asynccontextmanager
        async def checkpoint() -> AsyncIterator[None]:
            if where == "writing":
                raise exc
            yield
            raise exc  # the records' acknowledgements, after the lock

        return checkpoint

    # a store closed at shutdown: this commit is skipped, the events since are redelivered
    assert (
        asyncio.run(_consumer(failing(RuntimeError("store closed"), "writing"))._commit_tps(["tp0"], True))
        is False
    )

    def exit_fatally(what: str, exc: BaseException) -> None:
        raise SystemExit(f"{what}: {exc}")

    monkeypatch.setattr(consumer_module, "exit_fatally", exit_fatally)
    for where in ("writing", "confirming"):  # a lost output or changelog write ends the process
        with pytest.raises(SystemExit, match=r"checkpointing.*1 of 3 records not delivered"):
            checkpoint = failing(DeliveryFailed("1 of 3 records not delivered"), where)
            asyncio.run(_consumer(checkpoint)._commit_tps(["tp0"], True))
    assert not [s for s in steps if s.startswith("commit")]
