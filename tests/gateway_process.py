"""A real `ctjoint gateway serve` process on 127.0.0.1 for integration tests (the launcher of
ctjoint/launch.py that the demo and the bench use), plus small gRPC helpers to talk to it.
start() waits for health SERVING with a deadline and fails fast, with the log, if it dies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc

from ctjoint import launch
from ctjoint.contracts import ENV_MODEL_DIR
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

START_DEADLINE_S = 60.0
_LISTENING = re.compile(r"listening on (\S+):(\d+) ")
_METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


class GatewayProcess(launch.GatewayProcess):
    """ctjoint/launch.py's gateway process with the tests' settings: the test models, one ONNX
    Runtime thread (the test machine is shared and the models are 32x32) and an
    AssertionError with the log when it does not come up."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str) -> None:
        super().__init__(
            log_path,
            "--threads",
            "1",
            *args,
            env={ENV_MODEL_DIR: str(model_dir)},
            start_timeout_s=START_DEADLINE_S,
        )
        self.model_dir = model_dir

    def start(self, *, wait_serving: bool = True) -> GatewayProcess:
        try:
            super().start(wait_serving=wait_serving)
        except launch.LaunchError as err:
            raise AssertionError(str(err)) from None
        return self


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
