"""The overload gate and the refusal log: during a burst of refusals at the scan limit, new
CPU-bound scan work waits (bounded both ways) and the refusals are logged once a second."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ctjoint.gateway import limits
from ctjoint.gateway.errors import AdmissionRefusedError, LimitExceededError
from ctjoint.gateway.interceptors import REFUSAL_LOG_INTERVAL_S, RefusalLog
from ctjoint.gateway.limits import MAX_HOLD_S, MIN_RUN_S, QUIET_S, OverloadGate, ScanSlots


async def _waited(gate: OverloadGate) -> float:
    started = time.monotonic()
    await gate.wait()
    return time.monotonic() - started


def test_without_refusals_work_starts_at_once() -> None:
    gate = OverloadGate()
    assert asyncio.run(_waited(gate)) < QUIET_S
    assert gate.holds == 0


def test_work_waits_until_refusals_stop() -> None:
    gate = OverloadGate()

    async def run() -> float:
        async def refuse_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                gate.note_refusal()
                await asyncio.sleep(0.001)

        burst = asyncio.create_task(refuse_for(0.04))
        await asyncio.sleep(0)
        waited = await _waited(gate)
        await burst
        return waited

    waited = asyncio.run(run())
    # Held through the 40 ms burst, released within a few quiet periods after it.
    assert 0.03 <= waited < 0.04 + MAX_HOLD_S
    assert gate.holds == 1


def test_a_storm_that_never_ends_holds_work_back_at_most_max_hold_then_lets_it_run() -> None:
    gate = OverloadGate()

    async def run() -> tuple[float, float]:
        stop = asyncio.Event()

        async def storm() -> None:
            while not stop.is_set():
                gate.note_refusal()
                await asyncio.sleep(0.001)

        task = asyncio.create_task(storm())
        await asyncio.sleep(0)
        first = await _waited(gate)
        # Inside the open window that follows, work starts at once despite the storm.
        second = await _waited(gate)
        stop.set()
        await task
        return first, second

    first, second = asyncio.run(run())
    assert MAX_HOLD_S * 0.9 <= first < MAX_HOLD_S + 0.05
    assert second < min(MIN_RUN_S, 0.01)


def test_a_full_slot_table_closes_the_process_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = OverloadGate()
    monkeypatch.setattr(limits, "OVERLOAD_GATE", gate)
    slots = ScanSlots(1)
    with (
        slots.acquire(),
        pytest.raises(AdmissionRefusedError, match="retry later") as caught,
        slots.acquire(),
    ):
        pass
    assert isinstance(caught.value, LimitExceededError)

    async def run() -> float:
        return await _waited(gate)

    # The refusal just happened: the next piece of work waits for the quiet period.
    assert asyncio.run(run()) >= QUIET_S * 0.5


def test_refusals_are_logged_once_per_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ctjoint.gateway.interceptors")
    refusals = RefusalLog()

    async def run() -> None:
        for _ in range(50):
            refusals.note("2 scans in progress, the limit is 2; retry later")
        await asyncio.sleep(REFUSAL_LOG_INTERVAL_S + 0.2)

    asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == [
        "refused 1 scan(s) code=RESOURCE_EXHAUSTED: 2 scans in progress, the limit is 2; "
        "retry later",
        "refused 49 scan(s) code=RESOURCE_EXHAUSTED: 2 scans in progress, the limit is 2; "
        "retry later",
    ]
