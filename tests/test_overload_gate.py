"""The overload gate and the refusal log: during a burst of refusals at the scan limit, new
CPU-bound scan work waits (bounded both ways) and the refusals are logged once a second.

The gate runs on a simulated clock here: its sleeps advance the clock, and a burst of
refusals is simulated as one refusal per millisecond of that clock, so the figures do not
depend on how busy the test machine is."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ctjoint.gateway import limits
from ctjoint.gateway.errors import AdmissionRefusedError, LimitExceededError
from ctjoint.gateway.interceptors import REFUSAL_LOG_INTERVAL_S, RefusalLog
from ctjoint.gateway.limits import MAX_HOLD_S, MIN_RUN_S, QUIET_S, OverloadGate, ScanSlots

STEP_S = 0.001


class SimulatedTime:
    """A clock that only sleeps move; refusals every STEP_S until `refusals_until`."""

    def __init__(self, refusals_until: float = 0.0) -> None:
        self.now = 0.0
        self.refusals_until = refusals_until
        self.gate = OverloadGate(clock=lambda: self.now, sleep=self.sleep)

    async def sleep(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + STEP_S)
            if self.now < self.refusals_until:
                self.gate.note_refusal()
        await asyncio.sleep(0)

    def waited(self) -> float:
        started = self.now
        asyncio.run(self.gate.wait())
        return self.now - started


def test_without_refusals_work_starts_at_once() -> None:
    time = SimulatedTime()
    assert time.waited() == 0.0
    assert time.gate.holds == 0


def test_work_waits_until_a_burst_of_refusals_is_over() -> None:
    time = SimulatedTime(refusals_until=0.04)
    time.gate.note_refusal()
    waited = time.waited()
    # Held through the 40 ms burst, released one quiet period after its last refusal.
    assert 0.04 <= waited <= 0.04 + QUIET_S + 2 * STEP_S
    assert time.gate.holds == 1
    # The burst is over: the next piece of work starts at once.
    assert time.waited() == 0.0


def test_a_storm_that_never_ends_holds_work_at_most_max_hold_then_lets_it_run() -> None:
    time = SimulatedTime(refusals_until=float("inf"))
    time.gate.note_refusal()
    assert MAX_HOLD_S <= time.waited() <= MAX_HOLD_S + 2 * STEP_S
    # Inside the open window that follows, work starts at once despite the storm.
    assert time.waited() == 0.0
    time.now += MIN_RUN_S
    time.gate.note_refusal()
    # After it, the storm holds work back again, for at most MAX_HOLD_S once more.
    assert MAX_HOLD_S <= time.waited() <= MAX_HOLD_S + 2 * STEP_S


def test_a_refusal_at_the_slot_limit_closes_the_process_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    time = SimulatedTime()
    monkeypatch.setattr(limits, "OVERLOAD_GATE", time.gate)
    slots = ScanSlots(1)
    with (
        slots.acquire(),
        pytest.raises(AdmissionRefusedError, match="retry later") as caught,
        slots.acquire(),
    ):
        pass
    assert isinstance(caught.value, LimitExceededError)
    # The refusal just happened: the next piece of work waits one quiet period.
    assert QUIET_S <= time.waited() <= QUIET_S + 2 * STEP_S


def test_refusals_are_logged_once_per_interval_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ctjoint.gateway.interceptors")
    refusals = RefusalLog()

    async def run() -> None:
        for _ in range(50):
            refusals.note("2 scans in progress, the limit is 2; retry later")
        # Timers fire in deadline order, so the flush comes first however late the loop is.
        await asyncio.sleep(REFUSAL_LOG_INTERVAL_S + 0.2)

    asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == [
        "refused 1 scan(s) code=RESOURCE_EXHAUSTED: 2 scans in progress, the limit is 2; "
        "retry later",
        "refused 49 scan(s) code=RESOURCE_EXHAUSTED: 2 scans in progress, the limit is 2; "
        "retry later",
    ]
