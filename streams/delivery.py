"""Delivery confirmation: nothing a batch published is taken for granted.

In: the futures of every record a batch (or a timer) handed to the producer - outputs, dead
letters, re-keyed forwards, and the changelog writes of the tables. Out: ``confirm()`` returns
once the broker acknowledged all of them, or raises ``DeliveryFailed`` with the first reason.

Why: faust commits the offsets of acked events after ``producer.flush()``, and aiokafka's
``flush()`` waits for pending sends without ever raising; the error of a failed send only reaches
its future (faust-streaming 0.15.3, faust-notes trap 8). The worker therefore awaits the futures
itself before any offset is committed: a commit's checkpoint takes every record sent so far
(``Deliveries.take``) under the lock where the offsets are computed, and waits for them before the
offsets go to the broker (``streams.consumer``). A failed delivery is fatal (``exit_fatally``):
the process exits before committing, so the events since the last commit are redelivered after
the restart and every output is produced again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Awaitable
from typing import Any, NoReturn

from streams.errors import DeliveryFailed

log = logging.getLogger(__name__)

EXIT_FATAL = 70  # EX_SOFTWARE: the worker stopped itself; its unacked input is redelivered


class Deliveries:
    """Collects the futures of records sent since the last ``confirm()``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pending: list[tuple[Awaitable[Any], str | None]] = []
        self._records = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, fut: Awaitable[Any], topic: str | None = None, records: int = 1) -> None:
        """``topic`` names the record's topic in a timeout's report: aiokafka's futures do not
        carry it (faust's ``FutureMessage`` does). ``records``: how many records the future
        stands for (a record batch's future stands for all of its records)."""
        self._pending.append((fut, topic))
        self._records += records

    def take(self) -> Taken:
        """The pending records, handed over to be confirmed later (``Taken.confirm``); records
        added from now on are not among them."""
        taken = Taken(self._pending, self._records, self.timeout_s)
        self._pending, self._records = [], 0
        return taken

    def put_back(self, taken: Taken) -> None:
        """Records taken and never confirmed (their commit failed): pending again."""
        self._pending[:0] = taken._pending
        self._records += taken.records

    async def confirm(self) -> int:
        """Wait for every pending record's acknowledgement; returns how many records were
        confirmed."""
        return await self.take().confirm()


class Taken:
    """Records taken from ``Deliveries`` at one moment, to be confirmed once."""

    def __init__(
        self, pending: list[tuple[Awaitable[Any], str | None]], records: int, timeout_s: float
    ) -> None:
        self._pending = pending
        self.records = records
        self.timeout_s = timeout_s

    def __len__(self) -> int:
        return len(self._pending)

    async def confirm(self) -> int:
        """Wait for the acknowledgement of every record taken; their count, or ``DeliveryFailed``
        with the first reason (a timeout names the topics still waiting)."""
        pending = self._pending
        if not pending:
            return 0
        futs = [f for f, _ in pending]
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*futs, return_exceptions=True), timeout=self.timeout_s
            )
        except TimeoutError:
            waiting = Counter(topic or _topic_of(f) for f, topic in pending if not _acknowledged(f))
            raise DeliveryFailed(
                f"{len(pending)} records not acknowledged by the broker within {self.timeout_s:g}s "
                f"(still waiting, by topic: {dict(waiting)})"
            ) from None
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise DeliveryFailed(f"{len(failed)} of {len(pending)} records not delivered: {failed[0]!r}")
        return self.records


def _acknowledged(fut: Awaitable[Any]) -> bool:
    """Done and not cancelled (the timeout cancels the ones still waiting)."""
    done, cancelled = getattr(fut, "done", None), getattr(fut, "cancelled", None)
    return bool(callable(done) and done() and not (callable(cancelled) and cancelled()))


def _topic_of(fut: Awaitable[Any]) -> str:
    """The topic a faust ``FutureMessage`` was sent to, for the error message ("?" if unknown)."""
    channel = getattr(getattr(fut, "message", None), "channel", None)
    name = getattr(channel, "get_topic_name", None)
    try:
        return str(name()) if callable(name) else "?"
    except Exception:  # a channel without one topic name
        return "?"


def exit_fatally(what: str, exc: BaseException) -> NoReturn:
    """Log why and end the process at once, before faust can ack or commit anything more.

    A clean shutdown would close the running batch's ``take_events`` generator, whose ``finally``
    acks the batch (faust-streaming 0.15.3), and commit offsets of events whose outputs were not
    delivered. Exiting here leaves them uncommitted: the restarted worker reprocesses them."""
    log.critical(
        "%s: %r; exiting with %d so that the unacknowledged input is redelivered", what, exc, EXIT_FATAL
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # a broken handler must not keep us alive
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FATAL)
