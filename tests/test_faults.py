"""Faults against REAL processes: a gateway subprocess in front of a real tritonserver that is
slowed, killed under load and restarted, or whose python-backend stub is killed; and an
oversize gRPC message.

What must hold: a stalled Triton is DEADLINE_EXCEEDED on the caller's deadline; a dead Triton
ends in-flight scans UNAVAILABLE before their deadline and turns health NOT_SERVING within
2 s, and the gateway recovers within Triton's model load time + 5 s of a restart; a killed
python stub costs at most one scan; an oversize message is RESOURCE_EXHAUSTED and the next scan
succeeds. Every answer that does come back is checked to be its own scan's.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import figures
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from gateway_process import GatewayProcess, metric_value
from gateway_process import channel as sync_channel
from reliability_helpers import (
    Outcome,
    RunningTriton,
    Series,
    aio_channel,
    check_result,
    live_group_members,
    make_series,
    require_triton,
    running_triton,
    scan,
    scan_sync,
    triton_gateway,
    write_test_repository,
)

from ctjoint import contracts
from ctjoint.gateway.backends.triton import FAILOVER_WAIT_S
from ctjoint.gateway.limits import MESSAGE_OVERHEAD_BYTES
from ctjoint.v1 import scan_pb2_grpc

pytestmark = [pytest.mark.xdist_group("tritonserver"), pytest.mark.timeout(600)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CLIENT_DEADLINE_S = 1.0
MAX_DEADLINE_ERROR_S = 1.2
# The slow network model sleeps far past the client's deadline.
NETWORK_DELAY_S = 4.0
MAX_NOT_SERVING_S = 2.0
RECOVERY_MARGIN_S = 5.0
LOAD_DEADLINE_S = 20.0
LOAD_WORKERS = 4
BUSY_DELAY_S = 0.1
DOWN_S = FAILOVER_WAIT_S + 1.0
# Scans after a killed stub that must all succeed.
SCANS_AFTER_STUB_KILL = 10


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, contract_model_dir: Path) -> list[Series]:
    return make_series(tmp_path_factory.mktemp("fault-series"), 4, contract_model_dir)


@pytest.fixture
def triton(tmp_path: Path, contract_model_dir: Path) -> Iterator[RunningTriton]:
    require_triton()
    yield from running_triton(write_test_repository(tmp_path, contract_model_dir), tmp_path)


@pytest.fixture
def slow_triton(tmp_path: Path, contract_model_dir: Path) -> Iterator[RunningTriton]:
    """A Triton whose network model sleeps NETWORK_DELAY_S per batch (a stalled GPU)."""
    require_triton()
    repository = write_test_repository(
        tmp_path, contract_model_dir, network_delay_s=NETWORK_DELAY_S
    )
    yield from running_triton(repository, tmp_path)


@pytest.fixture
def busy_triton(tmp_path: Path, contract_model_dir: Path) -> Iterator[RunningTriton]:
    """A Triton taking BUSY_DELAY_S per batch (a GPU under load), so that scans in flight at
    the kill are, with near certainty, waiting on Triton rather than post-processing."""
    require_triton()
    repository = write_test_repository(tmp_path, contract_model_dir, network_delay_s=BUSY_DELAY_S)
    yield from running_triton(repository, tmp_path)


async def _until(predicate: Callable[[], bool], what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + 60.0
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(step)


async def _health(channel: grpc.aio.Channel) -> int | None:
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1.0
        )
    except grpc.aio.AioRpcError:
        return None
    return int(response.status)


def test_a_stalled_triton_is_deadline_exceeded_on_the_callers_deadline(
    slow_triton: RunningTriton, contract_model_dir: Path, series: list[Series], tmp_path: Path
) -> None:
    gateway = triton_gateway(slow_triton, contract_model_dir, tmp_path / "gateway.log")

    async def run() -> tuple[Outcome, float]:
        async with aio_channel(gateway.address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            outcome = await scan(stub, series[0], "stalled", timeout=CLIENT_DEADLINE_S)
        # The gateway lets go of the scan with the deadline, not when Triton finally answers.
        released = time.monotonic()
        while metric_value(gateway.metrics(), "ctjoint_scans_in_flight") != 0:
            assert time.monotonic() - released < NETWORK_DELAY_S, "the scan's slot was held"
            await asyncio.sleep(0.02)
        return outcome, outcome.seconds + time.monotonic() - released

    try:
        outcome, slot_free_s = asyncio.run(run())
        metrics = gateway.metrics()
    finally:
        gateway.stop()
    figures.record(
        "faults: stalled Triton, 1 s client deadline",
        code=outcome.code.name,
        error_s=round(outcome.seconds, 3),
        slot_free_s=round(slot_free_s, 3),
    )
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
    assert outcome.seconds <= MAX_DEADLINE_ERROR_S
    assert slot_free_s <= MAX_DEADLINE_ERROR_S
    assert 'code="DEADLINE_EXCEEDED"' in metrics


class _Load:
    """Scans run back to back by a few workers (threads on one synchronous channel, see
    scan_sync), every outcome kept with its start time and its series."""

    def __init__(self, stub: scan_pb2_grpc.ScanServiceStub, series: list[Series]) -> None:
        self.stub = stub
        self.series = series
        self.outcomes: list[tuple[float, Series, str, Outcome]] = []
        self.stop = asyncio.Event()
        self._count = 0

    async def worker(self) -> None:
        while not self.stop.is_set():
            number = self._count
            self._count += 1
            chosen = self.series[number % len(self.series)]
            request_id = f"fault-{number}"
            started = time.monotonic()
            outcome = await asyncio.to_thread(
                scan_sync, self.stub, chosen, request_id, timeout=LOAD_DEADLINE_S
            )
            self.outcomes.append((started, chosen, request_id, outcome))
            if outcome.code != grpc.StatusCode.OK:
                await asyncio.sleep(0.05)  # a real client backs off; don't spin on refusals

    def ok_since(self, moment: float) -> int:
        return sum(
            1 for s, _, _, o in self.outcomes if s >= moment and o.code == grpc.StatusCode.OK
        )


def test_a_killed_triton_fails_scans_fast_and_the_gateway_recovers_after_restart(
    busy_triton: RunningTriton, contract_model_dir: Path, series: list[Series], tmp_path: Path
) -> None:
    triton = busy_triton
    gateway = triton_gateway(
        triton, contract_model_dir, tmp_path / "gateway.log", "--max-concurrent-scans", "8"
    )

    async def run() -> dict[str, float]:
        with sync_channel(gateway.address) as sync:
            async with aio_channel(gateway.address) as channel:
                return await scenario(channel, scan_pb2_grpc.ScanServiceStub(sync))

    async def scenario(
        channel: grpc.aio.Channel, stub: scan_pb2_grpc.ScanServiceStub
    ) -> dict[str, float]:
        load = _Load(stub, series)
        workers = [asyncio.create_task(load.worker()) for _ in range(LOAD_WORKERS)]
        try:
            await _until(lambda: load.ok_since(0) >= 2 * LOAD_WORKERS, "no scan succeeded")
            # Kill while scans are in the gateway (in flight towards Triton).
            await _until(
                lambda: metric_value(gateway.metrics(), "ctjoint_scans_in_flight") >= 1,
                "no scan in flight",
                step=0.005,
            )
            killed_pid = triton.pid
            os.kill(killed_pid, signal.SIGKILL)
            killed = time.monotonic()
            while await _health(channel) != NOT_SERVING:
                assert time.monotonic() - killed < 10, "health never left SERVING"
                await asyncio.sleep(0.02)
            not_serving_s = time.monotonic() - killed
            await asyncio.to_thread(triton.stop)
            # Its python-backend stubs went with it (they would otherwise live on under init).
            await _until(lambda: not live_group_members(killed_pid), "tritonserver's stubs live on")
            # Down for longer than a scan waits for a replica to come back: the scans that
            # were in flight must give up with UNAVAILABLE, new ones are refused.
            await asyncio.sleep(DOWN_S)

            restarted = time.monotonic()
            await asyncio.to_thread(triton.start)
            load_s = await asyncio.to_thread(triton.wait_ready)
            while not (await _health(channel) == SERVING and load.ok_since(restarted)):
                assert time.monotonic() - restarted < 120, "the gateway never recovered"
                await asyncio.sleep(0.02)
            recovered_s = time.monotonic() - restarted
            steady = time.monotonic()
            await _until(lambda: load.ok_since(steady) >= 2 * LOAD_WORKERS, "not steady")
        finally:
            load.stop.set()
            await asyncio.gather(*workers)
        in_flight_at_kill = [(s, o) for s, _, _, o in load.outcomes if s < killed < s + o.seconds]
        failed = [o for _, _, _, o in load.outcomes if o.code != grpc.StatusCode.OK]
        for _, chosen, request_id, outcome in load.outcomes:
            if outcome.code == grpc.StatusCode.OK:
                check_result(outcome, chosen, request_id)
        assert in_flight_at_kill, "no scan was in flight when Triton was killed"
        assert any(o.code == grpc.StatusCode.UNAVAILABLE for _, o in in_flight_at_kill)
        for _, outcome in in_flight_at_kill:
            if outcome.code != grpc.StatusCode.OK:
                assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
                assert outcome.seconds < LOAD_DEADLINE_S
        others = [o for o in failed if o.code != grpc.StatusCode.UNAVAILABLE]
        assert not others, others[:3]
        in_flight_failed = [o.seconds for _, o in in_flight_at_kill if o.code != grpc.StatusCode.OK]
        return {
            "scans": len(load.outcomes),
            "ok": len(load.outcomes) - len(failed),
            "unavailable": len(failed),
            "in_flight_at_kill": len(in_flight_at_kill),
            "in_flight_failed_max_s": round(max(in_flight_failed, default=0.0), 3),
            "not_serving_s": round(not_serving_s, 3),
            "model_load_s": round(load_s, 3),
            "recovery_s": round(recovered_s, 3),
        }

    try:
        measured = asyncio.run(run())
    finally:
        gateway.stop()
    figures.record("faults: tritonserver killed under load", **measured)
    assert measured["not_serving_s"] <= MAX_NOT_SERVING_S
    assert measured["recovery_s"] <= measured["model_load_s"] + RECOVERY_MARGIN_S


def _stub_pids(triton_pid: int, model: str) -> list[int]:
    """The python-backend stub processes of `model` under this tritonserver."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
        if (
            parent
            and int(parent.group(1)) == triton_pid
            and "triton_python_backend_stub" in command
            and f"/{model}/" in command
        ):
            found.append(int(entry.name))
    return found


@pytest.fixture
def second_triton(tmp_path: Path, contract_model_dir: Path) -> Iterator[RunningTriton]:
    require_triton()
    root = tmp_path / "second"
    root.mkdir()
    yield from running_triton(write_test_repository(root, contract_model_dir), root)


def test_a_killed_postprocess_stub_costs_at_most_one_scan(
    triton: RunningTriton,
    second_triton: RunningTriton,
    contract_model_dir: Path,
    series: list[Series],
    tmp_path: Path,
) -> None:
    """Triton 2.51 never restarts a dead python stub and keeps reporting the model READY, so
    the gateway must notice from the failed inference, move the scan to the other replica and
    keep the broken one out until it answers a real inference again."""
    gateway = GatewayProcess(
        contract_model_dir,
        tmp_path / "gateway.log",
        "--backend",
        "triton",
        "--triton-url",
        f"{triton.config.grpc_url},{second_triton.config.grpc_url}",
        "--model",
        contracts.MODEL_JCS2D,
    ).start()
    postprocess = contracts.triton_postprocess_name(contracts.MODEL_JCS2D)
    stubs = _stub_pids(triton.pid, postprocess)
    assert stubs, f"no python stub of {postprocess} under tritonserver {triton.pid}"

    async def run() -> tuple[list[tuple[Series, str, Outcome]], float]:
        outcomes = []
        async with aio_channel(gateway.address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            # Both replicas take work before the kill.
            for number in range(4):
                outcome = await scan(stub, series[number % 4], f"before-{number}")
                check_result(outcome, series[number % 4], f"before-{number}")
            for pid in stubs:
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            for number in range(SCANS_AFTER_STUB_KILL):
                chosen = series[number % len(series)]
                request_id = f"after-kill-{number}"
                outcome = await scan(stub, chosen, request_id, timeout=LOAD_DEADLINE_S)
                outcomes.append((chosen, request_id, outcome))
            seconds = time.monotonic() - killed
        return outcomes, seconds

    try:
        outcomes, seconds = asyncio.run(run())
        # Still out after all those scans: its probe does not let a READY-but-broken model back.
        ejected = metric_value(gateway.metrics(), 'ctjoint_triton_replicas{state="ejected"}')
    finally:
        gateway.stop()
    failed = [o for _, _, o in outcomes if o.code != grpc.StatusCode.OK]
    figures.record(
        "faults: postprocess python stub killed (2 replicas)",
        scans_after_kill=len(outcomes),
        failed=len(failed),
        seconds=round(seconds, 2),
        replicas_ejected=ejected,
    )
    for chosen, request_id, outcome in outcomes:
        if outcome.code == grpc.StatusCode.OK:
            check_result(outcome, chosen, request_id)
    assert len(failed) <= 1, [f"{o.code.name}: {o.details}" for o in failed]
    assert outcomes[-1][2].code == grpc.StatusCode.OK
    assert ejected == 1


def test_with_one_replica_a_killed_stub_is_unavailable_until_triton_restarts(
    triton: RunningTriton, contract_model_dir: Path, series: list[Series], tmp_path: Path
) -> None:
    """No replica to move to: one scan fails UNAVAILABLE (not INTERNAL), health turns
    NOT_SERVING and later scans are refused at once, instead of each failing after a second
    inside Triton; once Triton is restarted (its supervisor's job) scans succeed again."""
    gateway = triton_gateway(triton, contract_model_dir, tmp_path / "gateway.log")
    postprocess = contracts.triton_postprocess_name(contracts.MODEL_JCS2D)

    async def run() -> tuple[Outcome, int | None, list[Outcome], int | None, float]:
        async with aio_channel(gateway.address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            check_result(await scan(stub, series[0], "before"), series[0], "before")
            stubs = _stub_pids(triton.pid, postprocess)
            assert stubs, f"no python stub of {postprocess} under tritonserver {triton.pid}"
            for pid in stubs:
                os.kill(pid, signal.SIGKILL)
            first = await scan(stub, series[1], "first-after-kill")
            health = await _health(channel)
            refused = [await scan(stub, series[n % 4], f"refused-{n}") for n in range(3)]
            # Still out a few probe rounds later: the test inference keeps failing.
            await asyncio.sleep(3.0)
            still = await _health(channel)
            # A model with a dead stub holds a graceful stop for 30 s: kill it outright.
            os.kill(triton.pid, signal.SIGKILL)
            await asyncio.to_thread(triton.stop)
            restarted = time.monotonic()
            await asyncio.to_thread(triton.start)
            await asyncio.to_thread(triton.wait_ready)
            while await _health(channel) != SERVING:
                assert time.monotonic() - restarted < 60, "never SERVING again"
                await asyncio.sleep(0.05)
            recovered_s = time.monotonic() - restarted
            after = await scan(stub, series[2], "after-restart")
        check_result(after, series[2], "after-restart")
        return first, health, refused, still, recovered_s

    try:
        first, health, refused, still, recovered_s = asyncio.run(run())
    finally:
        gateway.stop()
    figures.record(
        "faults: postprocess python stub killed (1 replica)",
        first=first.code.name,
        refused_ms_max=round(max(o.seconds for o in refused) * 1000, 1),
        recovery_after_restart_s=round(recovered_s, 2),
    )
    assert first.code == grpc.StatusCode.UNAVAILABLE, first
    assert health == NOT_SERVING and still == NOT_SERVING
    assert all(o.code == grpc.StatusCode.UNAVAILABLE for o in refused), refused
    assert all(o.seconds < 0.5 for o in refused), [o.seconds for o in refused]


def test_an_oversize_message_is_resource_exhausted_and_the_next_scan_succeeds(
    contract_model_dir: Path, series: list[Series], tmp_path: Path
) -> None:
    max_file_bytes = 64 * 1024
    # One slot: the refused scan must give it back for the next one to run.
    gateway = GatewayProcess(
        contract_model_dir,
        tmp_path / "gateway.log",
        "--model",
        contracts.MODEL_JCS2D,
        "--max-file-bytes",
        str(max_file_bytes),
        "--max-concurrent-scans",
        "1",
    ).start()
    oversize = Series(
        "oversize",
        (*series[0].contents[:2], b"\0" * (max_file_bytes + MESSAGE_OVERHEAD_BYTES + 1)),
        series[0].voxels,
    )

    async def run() -> tuple[Outcome, Outcome]:
        async with aio_channel(gateway.address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            refused = await scan(stub, oversize, "oversize")
            after = await scan(stub, series[1], "after-oversize")
        return refused, after

    try:
        refused, after = asyncio.run(run())
    finally:
        gateway.stop()
    figures.record(
        "faults: oversize message",
        code=refused.code.name,
        refused_s=round(refused.seconds, 3),
        next_scan=after.code.name,
    )
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    check_result(after, series[1], "after-oversize")
