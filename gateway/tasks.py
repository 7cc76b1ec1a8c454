"""Structured concurrency for one scan's steps: a task group and a stopwatch.

`task_group` is `asyncio.TaskGroup` raising the failing step's own error (an `InputError`, a
`BackendError`) instead of an `ExceptionGroup`, so callers and the gRPC status mapping see the
cause they always saw. `Stopwatch` adds up the milliseconds of each stage a scan spends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager


@asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An `asyncio.TaskGroup`: on the first failure its other tasks are cancelled and awaited;
    then the first error is raised as itself (the others are dropped: they are the cancelled
    steps' fallout or later failures of the same cause)."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as errors:
        error = _first_leaf(errors)
        # Raised as it was: its own cause and context, not the group's.
        context = error.__context__
        try:
            raise error
        finally:
            error.__context__ = context


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class Stopwatch:
    """Milliseconds per stage, added up over every `timed` block of that stage."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - started) * 1000.0)

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage] = self.ms.get(stage, 0.0) + ms

    def __getitem__(self, stage: str) -> float:
        return self.ms.get(stage, 0.0)


__all__ = ["Stopwatch", "task_group"]
