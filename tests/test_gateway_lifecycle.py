"""The gateway process's life: SIGTERM drains in-flight scans, bad start-up is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gateway_process import GatewayProcess, channel, file_bytes, requests
from grpc_health.v1 import health_pb2

from ctjoint.contracts import CLASS_NAMES, ENV_MODEL_DIR
from ctjoint.v1 import scan_pb2, scan_pb2_grpc


def _slow_scan(
    contents: list[bytes], half_sent: threading.Event, release: threading.Event
) -> Iterator[scan_pb2.ScanRequest]:
    """Half the files, then a pause until released, then the rest."""
    half = len(contents) // 2
    stream = requests(contents, expected=len(contents))
    yield next(stream)
    for _ in range(half):
        yield next(stream)
    half_sent.set()
    release.wait(30)
    yield from stream


def test_sigterm_during_a_scan_lets_it_finish(
    contract_model_dir: Path, ct_series_dir: Path, tmp_path: Path
) -> None:
    gateway = GatewayProcess(contract_model_dir, tmp_path / "gateway.log", "--grace", "20")
    gateway.start()
    try:
        half_sent, release = threading.Event(), threading.Event()
        contents = file_bytes(sorted(ct_series_dir.iterdir()))
        with channel(gateway.address) as ch:
            stub = scan_pb2_grpc.ScanServiceStub(ch)
            future = stub.AnalyzeScan.future(_slow_scan(contents, half_sent, release), timeout=60)
            assert half_sent.wait(10)
            time.sleep(0.2)  # let the gateway take in the first half
            gateway.signal()
            deadline = time.monotonic() + 10
            while gateway.health() == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
                time.sleep(0.05)
            assert gateway.alive(), "the gateway quit with a scan in flight"
            release.set()
            result = future.result(30)
        assert result.label in CLASS_NAMES
        assert result.geometry.slices == len(contents)
        assert gateway.wait(30) == 0
        log = gateway.log()
        assert "received SIGTERM" in log and "scan done" in log and "stopped" in log
    finally:
        release.set()
        gateway.stop()


def test_a_new_scan_after_sigterm_is_refused(
    contract_model_dir: Path, ct_series_dir: Path, tmp_path: Path
) -> None:
    gateway = GatewayProcess(contract_model_dir, tmp_path / "gateway.log").start()
    try:
        gateway.signal()
        assert gateway.wait(30) == 0
        with channel(gateway.address) as ch, pytest.raises(grpc.RpcError) as info:
            stub = scan_pb2_grpc.ScanServiceStub(ch)
            stub.AnalyzeScan(requests(file_bytes(sorted(ct_series_dir.iterdir()))), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop()


def _serve(*args: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctjoint.cli", "gateway", "serve", "--port", "0", *args],
        env={**os.environ, ENV_MODEL_DIR: str(model_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_model_stops_start_up_with_one_clear_line(tmp_path: Path) -> None:
    done = _serve("--model", "jcs2d", model_dir=tmp_path / "empty")
    assert done.returncode == 2
    assert "error: model 'jcs2d': no ONNX file at" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_the_triton_backend_without_its_url_is_one_clear_line(tmp_path: Path) -> None:
    done = _serve("--backend", "triton", model_dir=tmp_path)
    assert done.returncode == 2
    assert "error: the triton backend needs --triton-url" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_without_model_options_it_serves_whichever_models_exist(
    contract_model_dir: Path, tmp_path: Path
) -> None:
    only = tmp_path / "models"
    only.mkdir()
    (only / "deepsc3d.onnx").write_bytes((contract_model_dir / "deepsc3d.onnx").read_bytes())
    gateway = GatewayProcess(only, tmp_path / "gateway.log").start()
    try:
        with channel(gateway.address) as ch:
            info = scan_pb2_grpc.ScanServiceStub(ch).GetModelInfo(scan_pb2.GetModelInfoRequest())
        assert [m.name for m in info.models] == ["deepsc3d"]
        assert info.default_model == "deepsc3d"
    finally:
        gateway.stop()


def test_with_no_model_at_all_start_up_stops_with_one_clear_line(tmp_path: Path) -> None:
    done = _serve(model_dir=tmp_path / "empty")
    assert done.returncode == 2
    assert "no ONNX file at" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
