"""ctjoint/launch.py, the one launcher of serving processes (demo, bench, tests): a gateway
comes up on a port it picked, a stack stops what it started, and a gateway that cannot start
is reported with its exit status and its log."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from ctjoint.contracts import ENV_MODEL_DIR
from ctjoint.launch import GatewayProcess, LaunchError, serving_stack


def test_an_embedded_stack_serves_and_is_stopped_on_exit(
    contract_model_dir: Path, tmp_path: Path
) -> None:
    env = {ENV_MODEL_DIR: str(contract_model_dir)}
    args = ("--threads", "1", "--max-concurrent-scans", "1")  # one analysis worker to start
    with serving_stack(tmp_path, *args, backend="embedded", env=env) as stack:
        gateway = stack.gateway
        assert stack.address.startswith("127.0.0.1:") and stack.address != "127.0.0.1:0"
        assert gateway.health() == health_pb2.HealthCheckResponse.SERVING
        assert stack.pids == {"gateway": gateway.pid} and stack.triton_url is None
        assert "ctjoint_scans_total" in gateway.metrics()
    assert not gateway.alive() and gateway.process is not None
    assert gateway.process.returncode == 0  # SIGTERM: the graceful stop
    assert (tmp_path / "gateway.log").is_file()


def test_a_gateway_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with pytest.raises(LaunchError, match=f"exited with 2 while starting; see {log}") as caught:
        GatewayProcess(log, "--backend", "nonsense").start()
    assert "nonsense" in str(caught.value)  # the log's own words come with it
