"""Scan analysis runs in supervised worker processes (gateway/scan_workers.py): a runaway,
killed or wedged analysis costs its own scan, and the gateway keeps serving.

Each test drives a real `ctjoint gateway serve` process and acts on its workers the way the
world would: a scan too heavy for a tiny CPU bound, SIGKILL (the OOM killer's signal) and
SIGSTOP (a process that no longer answers) sent to a worker by pid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dicom_factory import write_ct_series
from gateway_process import GatewayProcess, analyze, channel, file_bytes, requests
from grpc_health.v1 import health_pb2

from ctjoint.contracts import CLASS_NAMES
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def worker_pids(gateway: GatewayProcess) -> set[int]:
    """The gateway's child processes (its analysis workers; decode workers are theirs)."""
    assert gateway.process is not None
    pids: set[int] = set()
    tasks = Path(f"/proc/{gateway.process.pid}/task")
    for task in tasks.iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def _paused_scan(
    contents: list[bytes], half_sent: threading.Event, release: threading.Event
) -> Iterator[scan_pb2.ScanRequest]:
    """Half the files, then a pause until released, then the rest."""
    stream = requests(contents, expected=len(contents))
    yield next(stream)
    for _ in range(len(contents) // 2):
        yield next(stream)
    half_sent.set()
    release.wait(30)
    yield from stream


@pytest.fixture
def small(ct_series_dir: Path) -> list[bytes]:
    return file_bytes(sorted(ct_series_dir.iterdir()))


def test_a_runaway_analysis_is_ended_and_the_gateway_keeps_serving(
    contract_model_dir: Path, small: list[bytes], tmp_path: Path
) -> None:
    # Well over the limit: about 7 ms of CPU a 512x512 slice (docs/performance.md), 48 slices
    # no longer were once the lung and lesion steps stopped making whole-volume passes.
    heavy = file_bytes(write_ct_series(tmp_path / "heavy", slices=160, size=512))
    gateway = GatewayProcess(
        contract_model_dir,
        tmp_path / "gateway.log",
        # Two workers: while the runaway's is replaced, the other keeps the gateway serving.
        "--max-concurrent-scans",
        "2",
        "--scan-cpu-seconds",
        "0.5",
    ).start()
    try:
        assert analyze(gateway.address, small).label in CLASS_NAMES
        before = worker_pids(gateway)
        with pytest.raises(grpc.RpcError) as caught:
            analyze(gateway.address, heavy)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details() == (
            "the analysis used more than 0.5 s of CPU time and was ended"
        )
        assert gateway.health() == SERVING
        assert analyze(gateway.address, small).label in CLASS_NAMES
        wait_for(lambda: len(worker_pids(gateway) - before) == 1, 10, "a replacement worker")
        assert analyze(gateway.address, small).label in CLASS_NAMES
    finally:
        gateway.stop()


def test_a_worker_killed_mid_scan_fails_that_scan_and_the_next_scan_succeeds(
    contract_model_dir: Path, small: list[bytes], tmp_path: Path
) -> None:
    gateway = GatewayProcess(
        contract_model_dir, tmp_path / "gateway.log", "--max-concurrent-scans", "1"
    ).start()
    release = threading.Event()
    try:
        (worker,) = worker_pids(gateway)
        half_sent = threading.Event()
        with channel(gateway.address) as ch:
            stub = scan_pb2_grpc.ScanServiceStub(ch)
            future = stub.AnalyzeScan.future(_paused_scan(small, half_sent, release), timeout=60)
            assert half_sent.wait(10)
            time.sleep(0.3)  # the worker has the first half
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as caught:
                future.result(30)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == (
            "the process analysing this scan died (SIGKILL); the scan was not analysed"
        )
        # Its replacement starts at once and takes the next scan once it is ready.
        wait_for(lambda: worker_pids(gateway) - {worker}, 10, "a replacement process")
        (replacement,) = worker_pids(gateway) - {worker}
        ready = f"analysis worker pid {replacement} ready"
        wait_for(lambda: ready in gateway.log(), 60, "the replacement ready")
        assert analyze(gateway.address, small).geometry.slices == len(small)
        assert worker not in worker_pids(gateway)
    finally:
        release.set()
        gateway.stop()


def test_sigterm_ends_the_gateway_within_its_grace_whatever_a_worker_does(
    contract_model_dir: Path, small: list[bytes], tmp_path: Path
) -> None:
    grace = 2.0
    gateway = GatewayProcess(
        contract_model_dir, tmp_path / "gateway.log", "--grace", str(grace)
    ).start()
    release = threading.Event()
    stopped: list[int] = []
    try:
        half_sent = threading.Event()
        with channel(gateway.address) as ch:
            stub = scan_pb2_grpc.ScanServiceStub(ch)
            future = stub.AnalyzeScan.future(_paused_scan(small, half_sent, release), timeout=60)
            assert half_sent.wait(10)
            time.sleep(0.3)
            # Every worker wedged: stopped processes answer nothing and exit on no signal
            # but SIGKILL, the one that has the scan in flight included.
            for pid in worker_pids(gateway):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            release.set()
            sent = time.monotonic()
            gateway.signal(signal.SIGTERM)
            assert gateway.wait(grace + 5.0) == 0
            took = time.monotonic() - sent
            with pytest.raises(grpc.RpcError):
                future.result(10)
        assert took < grace + 5.0
        for pid in stopped:
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 5, f"worker {pid} gone")
    finally:
        release.set()
        for pid in stopped:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        gateway.stop()


def test_health_is_not_serving_while_no_worker_can_take_work(
    contract_model_dir: Path, small: list[bytes], tmp_path: Path
) -> None:
    gateway = GatewayProcess(
        contract_model_dir, tmp_path / "gateway.log", "--max-concurrent-scans", "1"
    ).start()
    replacement: list[int] = []
    try:
        (worker,) = worker_pids(gateway)
        os.kill(worker, signal.SIGKILL)
        # Its replacement is held before it can report ready: no worker can take work.
        wait_for(lambda: bool(worker_pids(gateway) - {worker}), 10, "a replacement process")
        replacement.extend(worker_pids(gateway) - {worker})
        for pid in replacement:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: gateway.health() == NOT_SERVING, 5, "health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as caught:
            analyze(gateway.address, small, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "no analysis worker can take work right now"
        for pid in replacement:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: gateway.health() == SERVING, 60, "health SERVING again")
        assert analyze(gateway.address, small).geometry.slices == len(small)
    finally:
        for pid in replacement:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)
        gateway.stop()


def test_cancelling_a_progress_stream_leaves_no_pending_task(
    contract_model_dir: Path, small: list[bytes], tmp_path: Path
) -> None:
    gateway = GatewayProcess(contract_model_dir, tmp_path / "gateway.log").start()
    release = threading.Event()
    try:
        half_sent = threading.Event()
        with channel(gateway.address) as ch:
            stub = scan_pb2_grpc.ScanServiceStub(ch)
            call = stub.AnalyzeScanWithProgress(_paused_scan(small, half_sent, release), timeout=60)
            first = next(call)
            assert first.WhichOneof("event") == "progress"
            assert half_sent.wait(10)
            time.sleep(0.3)
            call.cancel()
        release.set()
        assert analyze(gateway.address, small).geometry.slices == len(small)
    finally:
        release.set()
        gateway.stop()
    assert gateway.wait(30) == 0
    log = gateway.log()
    assert "Task was destroyed but it is pending" not in log
    assert " ERROR " not in log, log
