"""Idle, slow and numerous clients cannot hold the gateway (issue 21): silent scans are ended
by the idle timeout and free their slots, a peer may be limited to a few slots, and a flood of
silent TCP connections leaves health and metrics answering. Real gateways on loopback."""

from __future__ import annotations

import asyncio
import re
import resource
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from dicom_factory import write_ct_series
from gateway_process import GatewayProcess, analyze, channel, file_bytes, metric_value
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctjoint.gateway.guards import idle_bounded
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

IDLE_TIMEOUT_S = 2.0
SLOTS = 4


def silent_scan(stop: threading.Event, *, header: bool) -> Iterator[scan_pb2.ScanRequest]:
    """A scan that sends its header (or nothing) and then stays silent until `stop`."""
    if header:
        yield scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model="jcs2d"))
    stop.wait()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return file_bytes(write_ct_series(tmp_path_factory.mktemp("guards") / "s", slices=4))


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("guards_gateway") / "gateway.log"
    process = GatewayProcess(
        contract_model_dir,
        log,
        "--idle-timeout",
        str(IDLE_TIMEOUT_S),
        "--max-concurrent-scans",
        str(SLOTS),
    ).start()
    try:
        yield process
    finally:
        process.stop()


def _in_flight(gateway: GatewayProcess) -> float:
    return metric_value(gateway.metrics(), "ctjoint_scans_in_flight")


def _wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.timeout(120)
def test_four_silent_scans_free_their_slots_within_the_idle_timeout(
    gateway: GatewayProcess, series: list[bytes]
) -> None:
    stop = threading.Event()
    with channel(gateway.address) as ch:
        stub = scan_pb2_grpc.ScanServiceStub(ch)
        # No deadline: only the gateway can end them. Two send a header, two nothing at all.
        calls = [
            stub.AnalyzeScan.future(silent_scan(stop, header=i % 2 == 0)) for i in range(SLOTS)
        ]
        try:
            _wait_for(lambda: _in_flight(gateway) == SLOTS, 10)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                analyze(gateway.address, series, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            codes = []
            for call in calls:
                with pytest.raises(grpc.RpcError) as ended:
                    call.result(timeout=IDLE_TIMEOUT_S + 10)
                codes.append(ended.value.code())
                assert "idle timeout" in (ended.value.details() or "")
            freed_after = time.monotonic() - started
        finally:
            stop.set()
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * SLOTS
    assert freed_after < IDLE_TIMEOUT_S + 3
    _wait_for(lambda: _in_flight(gateway) == 0, 5)
    result = analyze(gateway.address, series, timeout=30)
    assert len(result.slice_file_number) == len(series)


@pytest.mark.timeout(120)
def test_a_client_that_pauses_less_than_the_idle_timeout_is_served(
    gateway: GatewayProcess, series: list[bytes]
) -> None:
    def slow() -> Iterator[scan_pb2.ScanRequest]:
        yield scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model="jcs2d"))
        for content in series:
            time.sleep(IDLE_TIMEOUT_S / 4)
            yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))

    with channel(gateway.address) as ch:
        result = scan_pb2_grpc.ScanServiceStub(ch).AnalyzeScan(slow(), timeout=60)
    assert len(result.slice_file_number) == len(series)


@pytest.mark.timeout(120)
def test_a_client_over_its_scans_per_peer_is_refused(
    contract_model_dir: Path, tmp_path: Path, series: list[bytes]
) -> None:
    process = GatewayProcess(
        contract_model_dir, tmp_path / "gateway.log", "--max-scans-per-peer", "1"
    ).start()
    stop = threading.Event()
    try:
        with channel(process.address) as ch:
            stub = scan_pb2_grpc.ScanServiceStub(ch)
            held = stub.AnalyzeScan.future(silent_scan(stop, header=True))
            _wait_for(lambda: _in_flight(process) == 1, 10)
            with pytest.raises(grpc.RpcError) as refused:
                analyze(process.address, series, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.match(
                r"this client already has 1 scans in progress, the limit per client is 1",
                refused.value.details() or "",
            )
            stop.set()
            with pytest.raises(grpc.RpcError):
                held.result(timeout=10)  # its stream ended without a file: a clear error
        assert len(analyze(process.address, series, timeout=30).slice_file_number) == 4
    finally:
        stop.set()
        process.stop()


FLOOD = 1500
CAP = 200


def _health_port(process: GatewayProcess) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"health on \S+:(\d+)", process.log())
        if match:
            return int(match.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no health port in the log:\n{process.log()}")


def _open_fds(process: GatewayProcess) -> int:
    assert process.process is not None
    return len(list(Path(f"/proc/{process.process.pid}/fd").iterdir()))


@pytest.mark.timeout(180)
def test_a_flood_of_silent_connections_leaves_health_and_metrics_answering(
    contract_model_dir: Path, tmp_path: Path, series: list[bytes]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD + 600), hard))
    process = GatewayProcess(
        contract_model_dir,
        tmp_path / "gateway.log",
        "--health-port",
        "0",
        "--max-connections",
        str(CAP),
    ).start()
    assert process.process is not None
    # The gateway has FD headroom for its cap, and no more than the flood needs to exhaust
    # it when uncapped: 1,500 silent connections would take every descriptor.
    resource.prlimit(process.process.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    host, port = process.address.rsplit(":", 1)
    health_address = f"{host}:{_health_port(process)}"
    fds_before = _open_fds(process)
    flood: list[socket.socket] = []
    silent_metrics: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            sock = socket.create_connection((host, int(port)), timeout=5)
            flood.append(sock)
        metrics_host, metrics_port = process.metrics_url.split("/")[2].rsplit(":", 1)
        for _ in range(200):
            silent_metrics.append(socket.create_connection((metrics_host, int(metrics_port))))
        time.sleep(1.0)
        fds_during = _open_fds(process)
        with grpc.insecure_channel(health_address) as ch:
            answer = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        with urllib.request.urlopen(process.metrics_url, timeout=5) as response:
            assert b"ctjoint_scans_in_flight" in response.read()
        assert time.monotonic() - started < 2
        assert process.alive()
    finally:
        for sock in flood + silent_metrics:
            sock.close()
    try:
        # The scan port's connections stay under its cap, whatever the flood.
        assert fds_during - fds_before <= CAP + 200 + 20
        _wait_for(lambda: process.health() == health_pb2.HealthCheckResponse.SERVING, 15)
        assert len(analyze(process.address, series, timeout=30).slice_file_number) == 4
    finally:
        process.stop()


def test_a_huge_model_string_is_truncated_and_escaped_in_details_and_log(
    gateway: GatewayProcess, series: list[bytes]
) -> None:
    model = "x\nERROR forged log line " + "A" * (1024 * 1024)
    log_before = len(gateway.log())
    with pytest.raises(grpc.RpcError) as refused:
        analyze(gateway.address, series, timeout=30, model=model)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith("ScanHeader: model: unknown model 'x\\nERROR forged log line AAA")
    assert re.search(r"\.\.\. \(\d+ characters in all\)$", details)
    assert len(details) < 700
    time.sleep(0.2)
    logged = gateway.log()[log_before:]
    assert len(logged) < 4000
    assert "\nERROR forged log line" not in logged


def test_a_cancel_as_the_stream_ends_is_not_lost() -> None:
    """A client's cancel ends its request stream and cancels the RPC's task in the same loop
    turn. The idle bound must pass the cancel on: with Python 3.11's wait_for it returned the
    stream's end instead, the scan went on as a complete empty one, and its slot stayed taken
    until its analysis worker answered (seconds on a busy box, up to --scan-wall-seconds)."""

    async def run() -> None:
        ended = asyncio.Event()

        async def messages() -> AsyncIterator[bytes]:
            await ended.wait()
            return
            yield b""  # an async generator that ends once `ended` is set

        async def consume() -> str:
            async for _ in idle_bounded(messages(), 30.0):
                pass
            return "the stream ended"

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # consume() now waits for the next message
        ended.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
