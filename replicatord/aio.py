"""Two asyncio helpers of the package: run coroutines side by side, and tick without drift."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any, TypeVar

from replicatord.backoff import sleep_or_stop

T = TypeVar("T")


async def run_together(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently and return their results in order; if any fails, cancel the rest and
    raise its error itself (no group)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
        return [task.result() for task in tasks]
    except BaseExceptionGroup as failed:
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def poll(interval_s: float, stop: asyncio.Event, aligned: bool = False) -> AsyncIterator[None]:
    """Drift-free ticks every `interval_s` until `stop` is set (arq's `poll`). `aligned`: on
    multiples of `interval_s` of the loop's clock, so that loops of one process tick together."""
    loop = asyncio.get_running_loop()
    next_at = math.ceil(loop.time() / interval_s) * interval_s if aligned else loop.time()
    while not stop.is_set():
        yield
        next_at += interval_s
        if await sleep_or_stop(stop, max(0.0, next_at - loop.time())):
            return
