"""A progress stream cancelled while it waits for the next event leaves no task behind.

The gateway-level test (test_worker_isolation.py) can only read the log, where a getter left
pending shows up late or never (the gateway freezes its heap after start-up, so the orphan is
rarely collected). This test looks at the event loop itself: after the stream is cancelled,
no `Queue.get` task is pending. At b3c1dff the getter stayed pending and this test failed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ctjoint.gateway.service import _drain_while_running
from ctjoint.v1 import scan_pb2


def _pending_getters() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "Queue.get" in repr(task.get_coro())
    ]


def test_a_cancelled_progress_stream_leaves_no_pending_getter() -> None:
    async def run() -> tuple[int, int]:
        queue: asyncio.Queue[scan_pb2.ScanEvent] = asyncio.Queue()
        analysis = asyncio.get_running_loop().create_future()
        events = _drain_while_running(queue, analysis)
        reader = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.01)  # the stream now waits for an event or the analysis
        while_waiting = len(_pending_getters())
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await asyncio.sleep(0)  # let a cancelled getter finish
        after = len(_pending_getters())
        analysis.cancel()
        await events.aclose()
        return while_waiting, after

    while_waiting, after = asyncio.run(run())
    assert while_waiting == 1
    assert after == 0


def test_events_queued_before_the_analysis_ends_are_all_delivered() -> None:
    async def run() -> list[int]:
        queue: asyncio.Queue[scan_pb2.ScanEvent] = asyncio.Queue()
        analysis = asyncio.get_running_loop().create_future()
        for done in (1, 2, 3):
            queue.put_nowait(scan_pb2.ScanEvent(progress=scan_pb2.Progress(done=done)))
        analysis.set_result(None)
        return [event.progress.done async for event in _drain_while_running(queue, analysis)]

    assert asyncio.run(run()) == [1, 2, 3]
