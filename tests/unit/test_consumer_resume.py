"""``streams.consumer._resume``: a callback that had to wait finishes exactly as ``await`` would
have finished it (its value, its exception, a cancellation passed on), without Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from streams.consumer import _finish


async def _started(coro: Any) -> Any:
    """Run ``coro`` to its first wait as ``_drain_messages`` does, then await the rest."""
    waiting_on = coro.send(None)
    finishing = _finish(coro, waiting_on)
    assert isinstance(finishing, Awaitable)  # what mode's ``wait_first`` requires
    return await finishing


def test_a_waiting_callback_gets_what_it_waited_for_and_returns_its_value() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        seen: list[Any] = []

        async def callback() -> str:
            seen.append(await first)
            seen.append(await second)
            return "done"

        task = asyncio.ensure_future(_started(callback()))
        loop.call_soon(first.set_result, 1)
        loop.call_later(0.01, second.set_result, 2)
        return [await task, seen]

    assert asyncio.run(main()) == ["done", [1, 2]]


def test_an_exception_after_the_wait_reaches_the_caller() -> None:
    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()

        async def callback() -> None:
            await fut
            raise ValueError("bad message")

        task = asyncio.ensure_future(_started(callback()))
        fut.set_result(None)
        await task

    with pytest.raises(ValueError, match="bad message"):
        asyncio.run(main())


def test_a_cancellation_reaches_the_waiting_callback() -> None:
    async def main() -> list[str]:
        fut = asyncio.get_running_loop().create_future()
        log: list[str] = []

        async def callback() -> None:
            try:
                await fut
            except asyncio.CancelledError:
                log.append("cancelled inside")
                raise
            finally:
                log.append("cleaned up")

        task = asyncio.ensure_future(_started(callback()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled() or not fut.done()
        return log

    assert asyncio.run(main()) == ["cancelled inside", "cleaned up"]


def test_a_callback_that_never_waits_finishes_on_the_first_step() -> None:
    async def callback() -> str:
        return "handed on"

    coro = callback()
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    assert stop.value.value == "handed on"
