"""Hedging: if the first backend has not answered after `delay`, ask the next one too; first answer wins."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def hedged(first: Callable[[], Awaitable[T]], second: Callable[[], Awaitable[T]] | None, delay: float) -> T:
    """`first()`, and `second()` too once `delay` passes without an answer; the first success wins.

    The loser is cancelled. When both fail, the first call's error is raised (the second may only
    have found nobody to ask).
    """
    primary = asyncio.ensure_future(first())
    pending: set[asyncio.Future[T]] = {primary}
    try:
        done, _ = await asyncio.wait(pending, timeout=delay if second is not None else None)
        if not done and second is not None:
            pending.add(asyncio.ensure_future(second()))
        error: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    return task.result()
                error = error or task.exception()
        first_error = primary.exception() if primary.done() and not primary.cancelled() else None
        raise first_error or error or RuntimeError("hedged call ended without an outcome")
    finally:
        for task in pending:  # the loser, or everything when we are cancelled
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
