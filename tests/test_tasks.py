"""gateway/tasks.py: a scan's task group raises the failing step's own error and leaves no
sibling running; the stopwatch adds up each stage."""

from __future__ import annotations

import asyncio
import time

import pytest

from ctjoint.gateway.errors import NotCtError
from ctjoint.gateway.tasks import Stopwatch, task_group


def test_the_failing_step_s_own_error_comes_out_and_its_siblings_are_cancelled() -> None:
    cancelled = []

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def failing() -> None:
        await asyncio.sleep(0)
        try:
            raise KeyError("cause")
        except KeyError as err:
            raise NotCtError("file 3 is not a CT image") from err

    async def scan() -> None:
        async with task_group() as tasks:
            tasks.create_task(slow())
            tasks.create_task(failing())

    with pytest.raises(NotCtError, match="file 3 is not a CT image") as caught:
        asyncio.run(scan())
    assert isinstance(caught.value.__cause__, KeyError)
    assert cancelled == [True]


def test_an_error_of_the_body_itself_comes_out_as_itself() -> None:
    async def scan() -> None:
        async with task_group() as tasks:
            tasks.create_task(asyncio.sleep(60))
            raise ValueError("bad plan")

    with pytest.raises(ValueError, match="bad plan"):
        asyncio.run(scan())


def test_the_stopwatch_adds_up_each_stage() -> None:
    clock = Stopwatch()
    clock.add("preprocess", 1.5)
    with clock.timed("preprocess"):
        time.sleep(0.02)  # at least 20 ms, whatever the machine's load
    clock.add("postprocess", 2.0)
    assert clock["preprocess"] >= 1.5 + 20.0
    assert clock["postprocess"] == 2.0
    assert clock["infer"] == 0.0
