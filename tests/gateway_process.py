"""A real `ctjoint gateway serve` process on 127.0.0.1 for integration tests, plus small
gRPC helpers to talk to it. The process picks a free port itself (--port 0) and logs it;
start() waits for health SERVING with a deadline and fails fast, with the log, if it dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctjoint.contracts import ENV_MODEL_DIR
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

START_DEADLINE_S = 60.0
_LISTENING = re.compile(r"listening on (\S+):(\d+) ")
_METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


class GatewayProcess:
    """One gateway subprocess; its log goes to a file (a pipe could fill and block it)."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.metrics_url = ""

    def start(self) -> GatewayProcess:
        env = {**os.environ, ENV_MODEL_DIR: str(self.model_dir)}
        command = [
            sys.executable,
            "-m",
            "ctjoint.cli",
            "gateway",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            # The test machine is shared: one ONNX Runtime thread is plenty for 32x32 models.
            "--threads",
            "1",
            *self.args,
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            self._fail_if_dead("while starting")
            text = self.log()
            listening, metrics = _LISTENING.search(text), _METRICS.search(text)
            if listening and metrics:
                self.address = f"{listening.group(1)}:{listening.group(2)}"
                self.metrics_url = f"http://{metrics.group(1)}:{metrics.group(2)}/metrics"
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"gateway not SERVING within {START_DEADLINE_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail_if_dead(self, when: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"gateway exited with {self.process.returncode} {when}:\n{self.log()}"
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self, service: str = "") -> int | None:
        """The health status, or None when the server does not answer."""
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return None

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        if self.process is None:
            raise AssertionError("the gateway was never started")
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    )


def requests(
    contents: Iterable[bytes], *, model: str = "jcs2d", masks: bool = False, expected: int = 0
) -> Iterator[scan_pb2.ScanRequest]:
    header = scan_pb2.ScanHeader(
        request_id="test", model=model, outputs=scan_pb2.OutputOptions(masks=masks)
    )
    header.expected_files = expected
    yield scan_pb2.ScanRequest(header=header)
    for content in contents:
        yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))


def file_bytes(paths: Sequence[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def analyze(
    address: str, contents: Iterable[bytes], *, timeout: float = 60.0, **header: object
) -> scan_pb2.ScanResult:
    """One AnalyzeScan call; raises grpc.RpcError on a status other than OK."""
    with channel(address) as ch:
        stub = scan_pb2_grpc.ScanServiceStub(ch)
        return stub.AnalyzeScan(requests(contents, **header), timeout=timeout)


def ctjoint(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter (optionally after `code`, e.g. an import blocker)."""
    program = code + "import sys\nfrom ctjoint.cli import main\nsys.argv[0] = 'ctjoint'\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def metric_value(metrics: str, name: str) -> float:
    """One sample of a Prometheus text page; `name` may carry its labels
    ('x{state="ejected"}'), or be a bare name whose first labelled sample is taken."""
    for line in metrics.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name or (key.startswith(name + "{") and "{" not in name):
            return float(value)
    raise AssertionError(f"no {name} in the gateway's metrics")


def scans_by_code(metrics: str) -> Counter[str]:
    """Scans the gateway has finished, by gRPC status code (summed over models, outcomes)."""
    counts: Counter[str] = Counter()
    for line in metrics.splitlines():
        if line.startswith("ctjoint_scans_total{"):
            code = line.split('code="', 1)[1].split('"', 1)[0]
            counts[code] += int(float(line.rpartition(" ")[2]))
    return counts
