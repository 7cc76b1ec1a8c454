"""The overload gate, the scan CPU pool, the refusal log and the early refusal: during a burst
of refusals at the scan limit, CPU-bound scan work waits (bounded both ways), whether it was
submitted during the burst or queued before it; the refusals are logged once a second, and the
interceptor answers them before the servicer runs.

The gate runs on a simulated clock here: its sleeps advance the clock, and a burst of
refusals is simulated as one refusal per millisecond of that clock, so the figures do not
depend on how busy the test machine is."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from time import monotonic

import grpc
import grpc.aio
import pytest

from ctjoint.gateway import limits, logging_setup
from ctjoint.gateway.errors import AdmissionRefusedError, LimitExceededError
from ctjoint.gateway.interceptors import (
    REFUSAL_LOG_INTERVAL_S,
    REQUEST_ID_METADATA,
    RefusalLog,
    ScanServiceInterceptor,
)
from ctjoint.gateway.limits import (
    MAX_HOLD_S,
    MIN_RUN_S,
    QUIET_S,
    OverloadGate,
    ScanCpuPool,
    ScanSlots,
    cpu_bound,
)
from ctjoint.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

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

    def sleep_in_thread(self, seconds: float) -> None:
        asyncio.run(self.sleep(seconds))

    def waited_in_thread(self) -> float:
        """How long a job queued before now waits in its worker thread."""
        started = self.now
        self.gate.hold_in_thread(self.sleep_in_thread)
        return self.now - started

    def waited_by(self, where: str) -> float:
        return self.waited() if where == ON_THE_LOOP else self.waited_in_thread()


# Where a job meets the gate: on the event loop before it is queued, or in its worker thread.
ON_THE_LOOP = "on the loop"
WHERE = (ON_THE_LOOP, "in its thread")


def test_without_refusals_work_starts_at_once() -> None:
    time = SimulatedTime()
    assert time.waited() == 0.0
    assert time.gate.holds == 0


@pytest.mark.parametrize("where", WHERE)
def test_work_waits_until_a_burst_of_refusals_is_over(where: str) -> None:
    assert SimulatedTime().waited_by(where) == 0.0
    time = SimulatedTime(refusals_until=0.04)
    time.gate.note_refusal()
    waited = time.waited_by(where)
    # Held through the 40 ms burst, released one quiet period after its last refusal.
    assert 0.04 <= waited <= 0.04 + QUIET_S + 2 * STEP_S
    # Holds are counted on the loop (a job queued earlier waits in its thread, uncounted).
    assert time.gate.holds == (1 if where == ON_THE_LOOP else 0)
    # The burst is over: the next piece of work starts at once.
    assert time.waited_by(where) == 0.0


@pytest.mark.parametrize("where", WHERE)
def test_a_storm_that_never_ends_holds_work_at_most_max_hold_then_lets_it_run(where: str) -> None:
    time = SimulatedTime(refusals_until=float("inf"))
    time.gate.note_refusal()
    assert MAX_HOLD_S <= time.waited_by(where) <= MAX_HOLD_S + 2 * STEP_S
    # Inside the open window that follows, work starts at once despite the storm, wherever
    # it meets the gate.
    assert time.waited() == 0.0
    assert time.waited_in_thread() == 0.0
    time.now += MIN_RUN_S
    time.gate.note_refusal()
    # After it, the storm holds work back again, for at most MAX_HOLD_S once more.
    assert MAX_HOLD_S <= time.waited_by(where) <= MAX_HOLD_S + 2 * STEP_S


def test_scan_work_runs_on_the_pools_own_threads_and_sees_the_callers_context() -> None:
    pool = ScanCpuPool(2)

    async def run() -> set[str]:
        logging_setup.REQUEST_ID.set("ctx-1")

        def job() -> tuple[str, str]:
            return threading.current_thread().name, logging_setup.REQUEST_ID.get()

        answers = await asyncio.gather(*(pool.run(job) for _ in range(20)))
        assert {request_id for _, request_id in answers} == {"ctx-1"}
        return {name for name, _ in answers}

    try:
        names = asyncio.run(run())
    finally:
        pool.shutdown()
    assert 1 <= len(names) <= 2
    assert all(name.startswith("ctjoint-scan-cpu") for name in names)
    with pytest.raises(ValueError, match="at least 1 thread"):
        pool.configure(0)
    with pytest.raises(ValueError, match="at least 1 thread, got -1"):
        ScanCpuPool(-1)


def test_a_job_queued_before_a_refusal_waits_in_its_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The thread-side gate in the real pool: a job that passed the loop-side gate before the
    refusal, and sat in the queue behind a running one, starts one quiet period after it at
    the earliest (a bound from below, which a busy machine can only lengthen)."""
    gate = OverloadGate()
    monkeypatch.setattr(limits, "OVERLOAD_GATE", gate)
    pool = ScanCpuPool(1)
    release = threading.Event()

    async def run() -> tuple[float, float]:
        running = asyncio.ensure_future(pool.run(release.wait, 30))
        queued = asyncio.ensure_future(pool.run(monotonic))
        await asyncio.sleep(0.05)  # both past the loop-side gate, the second in the queue
        refused_at = monotonic()
        gate.note_refusal()
        release.set()
        assert await running
        return refused_at, await queued

    try:
        refused_at, started = asyncio.run(run())
    finally:
        pool.shutdown()
    assert started - refused_at >= QUIET_S


def test_cpu_bound_uses_the_pool_the_gateway_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ScanCpuPool()
    monkeypatch.setattr(limits, "SCAN_CPU", pool)
    pool.configure(1)

    async def run() -> list[str]:
        return await asyncio.gather(
            *(cpu_bound(lambda: threading.current_thread().name) for _ in range(8))
        )

    try:
        names = asyncio.run(run())
    finally:
        pool.shutdown()
    assert len(set(names)) == 1 and names[0].startswith("ctjoint-scan-cpu")


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


class _CountingServicer(scan_pb2_grpc.ScanServiceServicer):
    """Records every scan that reaches the servicer, and answers it with an empty result."""

    def __init__(self) -> None:
        self.reached = 0

    async def AnalyzeScan(  # noqa: N802 - the generated base class names it
        self, request_iterator: AsyncIterator[scan_pb2.ScanRequest], context: object
    ) -> scan_pb2.ScanResult:
        self.reached += 1
        return scan_pb2.ScanResult()

    async def AnalyzeScanWithProgress(  # noqa: N802 - the generated base class names it
        self, request_iterator: AsyncIterator[scan_pb2.ScanRequest], context: object
    ) -> AsyncIterator[scan_pb2.ScanEvent]:
        self.reached += 1
        yield scan_pb2.ScanEvent()


def test_the_interceptor_refuses_a_scan_past_the_limit_before_the_servicer_runs() -> None:
    """A real grpc.aio server: with every slot taken, both scan methods are answered
    RESOURCE_EXHAUSTED (with the request id, counted as an error) and the servicer is never
    called; with a slot free, the same call reaches it."""

    async def run() -> None:
        metrics = GatewayMetrics()
        slots = ScanSlots(1)
        servicer = _CountingServicer()
        server = grpc.aio.server(interceptors=[ScanServiceInterceptor(metrics, slots)])
        scan_pb2_grpc.add_ScanServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = scan_pb2_grpc.ScanServiceStub(channel)
                metadata = ((REQUEST_ID_METADATA, "burst-7"),)
                with slots.acquire():
                    unary = stub.AnalyzeScan(metadata=metadata, timeout=10)
                    streaming = stub.AnalyzeScanWithProgress(metadata=metadata, timeout=10)
                    for call in (unary, streaming):
                        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        assert await call.details() == (
                            "1 scans in progress, the limit is 1; retry later"
                        )
                        assert (REQUEST_ID_METADATA, "burst-7") in tuple(
                            await call.trailing_metadata() or ()
                        )
                    assert servicer.reached == 0
                refused = metrics.registry.get_sample_value(
                    "ctjoint_scans_total",
                    {"model": UNKNOWN_MODEL, "outcome": "error", "code": "RESOURCE_EXHAUSTED"},
                )
                assert refused == 2
                call = stub.AnalyzeScan(timeout=10)
                await call.done_writing()
                await call
                assert servicer.reached == 1
        finally:
            await server.stop(None)

    asyncio.run(run())
