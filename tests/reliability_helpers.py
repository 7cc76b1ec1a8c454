"""Helpers for the load and fault tests (test_load.py, test_faults.py): a small real Triton
repository (optionally with a deliberately slow network), distinct small series whose lesion
volumes identify them, a grpc.aio scan call that reports its status and timing, a refusal
burst against a gateway with every slot at work, and the gateway process's resident memory and
CPU time read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from dicom_factory import CONSOLIDATION_HU, GROUND_GLASS_HU, Lesion, write_ct_series
from gateway_process import GatewayProcess, metric_value, scans_by_code
from lean_burst import Burst, fire

from ctjoint import contracts
from ctjoint.contracts import ADMITTED_METADATA
from ctjoint.export.triton_repository import write_repository
from ctjoint.gateway.analysis import ScanAnalyzer
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.triton_server import (
    TritonServer,
    TritonServerConfig,
    TritonServerError,
    find_install,
    free_ports,
)
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

MODEL = contracts.MODEL_JCS2D
READY_DEADLINE_S = 120.0
# Small scans, so a thousand of them fit in a test run: 16 slices of 64x64.
SLICES = 16
SIZE = 64
MAX_RESULT_BYTES = 64 * 1024 * 1024
STOP_GRACE_S = 5.0


def require_triton() -> None:
    try:
        find_install()
    except TritonServerError as err:
        pytest.skip(f"no tritonserver here: {err}")


def write_test_repository(
    root: Path, contract_model_dir: Path, *, network_delay_s: float = 0.0
) -> Path:
    """A CPU repository of jcs2d around the contract model; with `network_delay_s`, the
    network model sleeps that long per batch (a test-only stand-in for a stalled GPU)."""
    repository = root / "repository"
    write_repository(repository, target="cpu", models=(MODEL,), onnx_dir=contract_model_dir)
    if network_delay_s > 0:
        network = repository / contracts.triton_model_name(MODEL, contracts.TRITON_VARIANT_CPU)
        source = network / "1" / contracts.TRITON_PYTHON_FILE
        # Wrap the generated model's execute: the same outputs, only later.
        source.write_text(
            source.read_text()
            + "\n\n_real_execute = TritonPythonModel.execute\n\n\n"
            + "def _slow_execute(self, requests):\n"
            + f"    time.sleep({float(network_delay_s)!r})\n"
            + "    return _real_execute(self, requests)\n\n\n"
            + "TritonPythonModel.execute = _slow_execute\n"
        )
    return repository


@dataclass
class RunningTriton:
    """A tritonserver child on free loopback ports that a test may kill and start again."""

    config: TritonServerConfig
    log_dir: Path
    server: TritonServer | None = None
    starts: int = 0

    @classmethod
    def on(cls, repository: Path, log_dir: Path) -> RunningTriton:
        grpc_port, http_port, metrics_port = free_ports(3)
        config = TritonServerConfig(
            repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port
        )
        return cls(config, log_dir)

    def start(self) -> None:
        self.starts += 1
        self.server = TritonServer(
            self.config, install=find_install(), log_file=self.log_dir / f"triton{self.starts}.log"
        )
        self.server.start()

    def wait_ready(self) -> float:
        """Seconds from now until Triton reports ready (its model load time, after start)."""
        if self.server is None:
            raise AssertionError("tritonserver was not started")
        return self.server.wait_ready(READY_DEADLINE_S)

    def stop(self) -> None:
        if self.server is not None:
            # A model with a dead python stub keeps Triton's shutdown waiting for its full
            # exit timeout (30 s); the test has no use for a graceful stop.
            self.server.stop(grace=STOP_GRACE_S)
            self.server = None
        # A SIGKILLed Triton leaves its python backend's shared-memory regions behind; their
        # names carry this process's id and the port (see server_args), so they are ours.
        for region in Path("/dev/shm").glob(f"ctjoint{os.getpid()}p{self.config.grpc_port}_*"):
            region.unlink(missing_ok=True)

    @property
    def pid(self) -> int:
        if self.server is None or self.server.pid is None:
            raise AssertionError("tritonserver is not running")
        return self.server.pid


def running_triton(repository: Path, log_dir: Path) -> Iterator[RunningTriton]:
    """Fixture body: a started, ready Triton, stopped on teardown."""
    triton = RunningTriton.on(repository, log_dir)
    triton.start()
    try:
        triton.wait_ready()
        yield triton
    finally:
        triton.stop()


def triton_gateway(
    triton: RunningTriton, contract_model_dir: Path, log: Path, *args: str
) -> GatewayProcess:
    """A started gateway process serving jcs2d through `triton` (extra CLI flags in args)."""
    return GatewayProcess(
        contract_model_dir,
        log,
        "--backend",
        "triton",
        "--triton-url",
        triton.config.grpc_url,
        "--model",
        contracts.MODEL_JCS2D,
        *args,
    ).start()


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are still alive (zombies do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class Series:
    """One scan's files and what a correct answer says about them: its lesion voxel counts
    per class, as the embedded backend finds them (each series has its own)."""

    name: str
    contents: tuple[bytes, ...]
    voxels: tuple[tuple[str, int], ...]


def make_series(folder: Path, count: int, contract_model_dir: Path) -> list[Series]:
    """`count` series, each with its own ground-glass box size, so its lesion volume tells
    its answer from any other's; the expected answer is the embedded backend's."""
    made = []
    for index in range(count):
        side = 4 + 3 * index
        lesions = (
            Lesion(4, 10, 12, 12 + side, 14, 14 + side, GROUND_GLASS_HU),
            Lesion(6, 7, 30, 36, 40, 46, CONSOLIDATION_HU),
        )
        paths = write_ct_series(
            folder / f"series{index}", slices=SLICES, size=SIZE, lesions=lesions
        )
        contents = tuple(p.read_bytes() for p in paths)
        made.append(
            Series(f"series{index}", contents, _embedded_voxels(contents, contract_model_dir))
        )
    signatures = {s.voxels for s in made}
    assert len(signatures) == count, f"series answers are not distinct: {signatures}"
    return made


def _embedded_voxels(
    contents: tuple[bytes, ...], contract_model_dir: Path
) -> tuple[tuple[str, int], ...]:
    async def run() -> tuple[tuple[str, int], ...]:
        backend = EmbeddedBackend((MODEL,), model_dir=contract_model_dir, intra_op_threads=1)
        async with backend:
            analysis = await ScanAnalyzer(backend).analyze_files([("", c) for c in contents], MODEL)
        return tuple(sorted((k, int(v)) for k, v in analysis.result.lesions.voxels.items()))

    return asyncio.run(run())


def scan_requests(
    contents: tuple[bytes, ...], request_id: str, *, model: str = MODEL
) -> Iterator[scan_pb2.ScanRequest]:
    header = scan_pb2.ScanHeader(request_id=request_id, model=model)
    header.expected_files = len(contents)
    yield scan_pb2.ScanRequest(header=header)
    for content in contents:
        yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))


def aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", MAX_RESULT_BYTES)]
    )


@dataclass(frozen=True)
class Outcome:
    """One AnalyzeScan call as the client saw it."""

    code: grpc.StatusCode
    seconds: float
    result: scan_pb2.ScanResult | None = None
    details: str = ""


async def scan(
    stub: scan_pb2_grpc.ScanServiceStub,
    series: Series,
    request_id: str,
    *,
    timeout: float | None = 60.0,
) -> Outcome:
    """One AnalyzeScan over grpc.aio: the status instead of an exception, and the time taken.

    Like a careful scanner client, it waits for the gateway's admission (ADMITTED_METADATA)
    before streaming files, so a refused scan uploads nothing.
    """
    started = time.perf_counter()
    call = stub.AnalyzeScan(timeout=timeout)
    try:
        metadata = await call.initial_metadata()
        if not call.done() and (ADMITTED_METADATA, "1") in tuple(metadata or ()):
            for request in scan_requests(series.contents, request_id):
                await call.write(request)
            await call.done_writing()
        result = await call
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        code = await call.code()
        return Outcome(code, time.perf_counter() - started, None, await call.details() or "")
    return Outcome(grpc.StatusCode.OK, time.perf_counter() - started, result)


def scan_sync(
    stub: scan_pb2_grpc.ScanServiceStub,
    series: Series,
    request_id: str,
    *,
    timeout: float | None = 60.0,
) -> Outcome:
    """One AnalyzeScan on the synchronous API (run it in a thread). Used where the gateway may
    end a scan while its files are still being sent: grpc.aio clients then report INTERNAL
    instead of the gateway's status (a write into a finished call), the synchronous API
    reports the gateway's own status."""
    started = time.perf_counter()
    try:
        result = stub.AnalyzeScan(scan_requests(series.contents, request_id), timeout=timeout)
    except grpc.RpcError as err:
        return Outcome(err.code(), time.perf_counter() - started, None, err.details() or "")
    return Outcome(grpc.StatusCode.OK, time.perf_counter() - started, result)


def check_result(outcome: Outcome, series: Series, request_id: str) -> None:
    """The answer belongs to this very scan: its request id and its own lesion volumes."""
    result = outcome.result
    assert result is not None, f"{request_id}: {outcome.code.name} {outcome.details}"
    assert result.request_id == request_id
    voxels = tuple(sorted((c.name, int(c.voxels)) for c in result.lesions.classes))
    assert voxels == series.voxels, f"{request_id} answered {voxels}, its scan has {series.voxels}"


def rss_bytes(pid: int) -> int:
    """Resident set size of a process and its descendants (a gateway analyses scans in worker
    processes), from /proc (no psutil needed)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) * 1024
            break
    else:
        raise AssertionError(f"no VmRSS for pid {pid}")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            with contextlib.suppress(OSError, AssertionError):
                total += rss_bytes(int(child))
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` so far, all its threads, to the nanosecond (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


@dataclass(frozen=True)
class BurstAtWork:
    """A refusal burst against a full gateway: what h2load saw, how the gateway counted every
    scan that ended meanwhile (the admitted ones included), and its CPU during the burst."""

    burst: Burst
    codes: Counter[str]
    gateway_cpu_s: float


async def burst_at_work(
    gateway: GatewayProcess,
    stub: scan_pb2_grpc.ScanServiceStub,
    series: list[Series],
    admitted: int,
    excess: int,
    name: str,
) -> BurstAtWork:
    """`admitted` real scans (ids `name-N`) take every slot and send their files; then h2load
    fires `excess` more at once (lean_burst.fire). Each admitted scan's answer is checked to be
    its own. h2load cannot read gRPC trailers: the gateway's metrics say how calls ended."""
    pid = gateway.process.pid if gateway.process is not None else 0
    before = await asyncio.to_thread(gateway.metrics)

    async def one(number: int) -> None:
        chosen, request_id = series[number % len(series)], f"{name}-{number}"
        check_result(await scan(stub, chosen, request_id), chosen, request_id)

    scans = [asyncio.create_task(one(n)) for n in range(admitted)]
    await wait_until(
        lambda: metric_value(gateway.metrics(), "ctjoint_scans_in_flight") >= admitted, 30, 0.002
    )
    # Every slot is taken and the admitted scans are sending their files.
    request = scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model=MODEL))
    cpu = cpu_seconds(pid)
    burst = await asyncio.to_thread(fire, gateway.address, excess, request)
    cpu = cpu_seconds(pid) - cpu
    await asyncio.gather(*scans)
    after = await asyncio.to_thread(gateway.metrics)
    return BurstAtWork(burst, scans_by_code(after) - scans_by_code(before), cpu)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


async def wait_until(predicate: object, timeout: float, step: float = 0.02) -> float:
    """Seconds until `predicate()` is true; AssertionError after `timeout`."""
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - started
