"""``streams.app.awaiting``: the whole chain a task waits in (what ``/debug/tasks`` shows of a
wedged worker), not the one frame ``Task.get_stack`` gives for a suspended coroutine."""

from __future__ import annotations

import asyncio

from streams.app import awaiting


def test_a_waiting_task_shows_every_coroutine_it_waits_through() -> None:
    async def inner() -> None:
        await asyncio.sleep(10)

    async def outer() -> None:
        await inner()

    async def main() -> list[str]:
        task = asyncio.ensure_future(outer())
        await asyncio.sleep(0.01)
        try:
            return [f.f_code.co_name for f in awaiting(task)]
        finally:
            task.cancel()

    assert asyncio.run(main()) == ["outer", "inner", "sleep"]
