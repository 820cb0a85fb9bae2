"""Background tasks: how they are stopped, and how loops tell cancellation from failure.

Invariants every background task keeps:
- `CancelledError` is never swallowed. A driver call interrupted by cancellation may surface as a driver
  error (redis-py turns some into ConnectionError): a loop that retries on errors asks `cancelling()`
  first and re-raises, so a cancelled task always ends.
- Tasks are stopped through `stop_task`, which waits a bounded time: a stop never hangs on a task that
  does not end (it is reported and abandoned instead), so SIGTERM always ends the process.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Coroutine
from types import FrameType
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tasks started with `spawn` are kept here until done (the event loop holds only weak references).
_background: set[asyncio.Task[Any]] = set()


def cancelling() -> bool:
    """True when the current task has been asked to cancel (even if the request was caught below us)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancelling() -> None:
    """Turn a driver error that hides a cancellation back into the cancellation."""
    if cancelling():
        raise asyncio.CancelledError


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start a fire-and-forget task that is kept alive until it ends; its failure is logged."""
    task = asyncio.create_task(coro, name=name)
    _background.add(task)
    task.add_done_callback(_forget)
    return task


def _forget(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


async def stop_task(task: asyncio.Task[Any] | None, timeout_s: float) -> bool:
    """Cancel `task` and wait for it up to `timeout_s`. True when it ended; False when it did not end in
    time (it is logged and left behind). Its own exception, if any, is logged, never raised here."""
    if task is None:
        return True
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=max(0.0, timeout_s))
        if not task.done():
            log.error("task %s did not stop %.1fs after cancel; leaving it", task.get_name(), timeout_s)
            return False
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with an error", task.get_name(), exc_info=task.exception())
    return True


async def bounded(coro: Awaitable[T], timeout_s: float, *, what: str) -> T | None:
    """Run a shutdown step for at most `timeout_s`; None (logged) when it did not finish in time or failed.

    Not `asyncio.wait_for`: that waits for the cancelled step to end, forever if the step ignores it."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.wait({task}, timeout=max(0.0, timeout_s))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        log.error("%s did not finish within %.1fs; going on", what, timeout_s)
        await stop_task(task, 1.0)
        return None
    if task.cancelled():
        return None
    error = task.exception()
    if error is not None:
        log.error("%s failed; going on", what, exc_info=error)
        return None
    return task.result()


def awaiting_stack(task: asyncio.Task[Any]) -> str:
    """Where a suspended task waits: each coroutine (or async generator) of its await chain at its current
    line, outermost first (Task.get_stack shows only the outermost)."""
    frames: list[tuple[FrameType, int]] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        frame = frame or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        awaited = (
            getattr(awaited, "cr_await", None)
            or getattr(awaited, "ag_await", None)
            or getattr(awaited, "gi_yieldfrom", None)
        )
    return "".join(traceback.format_list(traceback.StackSummary.extract(frames)))
