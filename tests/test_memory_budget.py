"""A memory budget per scan (issue 21): 40 deflated 4096 x 4096 slices (1.35 MB uploaded) took
a gateway to 3.6 GB, 60 got it OOM-killed. The decoded volume is now budgeted from each file's
Rows and Columns (and the header's expected_files) before it is allocated: such a scan gets
RESOURCE_EXHAUSTED, the gateway's memory stays bounded, and it goes on serving."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import figures
import grpc
import numpy as np
import pytest
from dicom_factory import INTERCEPT, chest_volume, ct_dataset, write_ct_series
from gateway_process import GatewayProcess, analyze, file_bytes
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from ctjoint.gateway.errors import LimitExceededError
from ctjoint.gateway.series import DEFAULT_MAX_SCAN_BYTES, SeriesAssembler

MIB = 1024 * 1024
BIG = 4096
SLICES = 60


def deflated_series(slices: int, size: int) -> list[bytes]:
    """`slices` Deflated Explicit VR files of size x size pixels, made fast: the pixel data
    element is deflated once and appended, after a full flush, to each file's own header."""
    plane = chest_volume(1, 64)[0]
    plane = np.kron(plane, np.ones((size // 64, size // 64), dtype=np.float32))
    pixels = np.round(plane - INTERCEPT).astype("<i2").tobytes()
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixel_part = packer.compress(element) + packer.flush()
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    files = []
    for z in range(slices):
        ds = ct_dataset(
            np.zeros((16, 16), dtype=np.float32),
            index=z + 1,
            position=(0.0, 0.0, 2.5 * z),
            series_uid=series_uid,
            study_uid=study_uid,
            frame_uid=frame_uid,
            pixel_spacing=(0.1, 0.1),
        )
        ds.Rows = ds.Columns = size
        del ds.PixelData
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        write_dataset(head, ds)
        packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(head.getvalue()) + packer.flush(zlib.Z_FULL_FLUSH) + pixel_part
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, ds.file_meta)
        data = b"\0" * 128 + b"DICM" + meta.getvalue() + body
        files.append(data + b"\0" * (len(data) % 2))
    return files


def test_the_fast_deflated_files_are_real_dicom() -> None:
    from ctjoint.gateway.dicom_io import read_ct_slice

    small = deflated_series(3, 256)
    ct_slice = read_ct_slice(small[1], source="file 2")
    assert ct_slice.hu.shape == (256, 256)
    assert ct_slice.position == (0.0, 0.0, 2.5)


def test_expected_files_over_the_budget_are_refused_before_anything_is_allocated() -> None:
    assembler = SeriesAssembler(expected_slices=SLICES, max_bytes=DEFAULT_MAX_SCAN_BYTES)
    tracemalloc.start()
    try:
        with pytest.raises(
            LimitExceededError, match=r"^at slice 1: a scan of 60 slices of 4096x4096"
        ):
            assembler.next_slot(BIG, BIG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MIB


def test_slices_past_the_budget_are_refused_and_the_buffer_stays_within_it() -> None:
    budget = 10 * 64 * 64 * 4  # ten 64 x 64 slices
    assembler = SeriesAssembler(max_bytes=budget)
    from ctjoint.gateway.dicom_io import read_ct_slice

    files = deflated_series(12, 64)
    for index, data in enumerate(files[:10], start=1):
        assembler.add(read_ct_slice(data, source=f"file {index}", hu_out=assembler.next_slot))
    assert assembler._buffer is not None and assembler._buffer.nbytes <= budget
    with pytest.raises(LimitExceededError, match=r"^at slice 11: .* budget of 163840 bytes"):
        read_ct_slice(files[10], source="file 11", hu_out=assembler.next_slot)


def _tree_rss_hwm(pid: int) -> int:
    """The summed peak resident set (VmHWM) of `pid` and its children, in bytes."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


CGROUP_LIMIT = 3 * 1024 * MIB  # the limit in which 60 such slices got a gateway OOM-killed
CGROUP_ARGS = ("--max-concurrent-scans", "2")


class MemoryGroup:
    """A cgroup v1 memory group limited to `limit` bytes that a gateway is started in (so that
    it sizes its default budget from that limit), where this machine lets us make one (root).
    The test process joins it only while it starts the gateway."""

    root = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.path = self.root / f"ctjoint-test-{os.getpid()}"

    @classmethod
    def make(cls, limit: int) -> MemoryGroup | None:
        group = cls(limit)
        if not (cls.root / "cgroup.procs").exists() or os.geteuid() != 0:
            return None
        try:
            group.path.mkdir(exist_ok=True)
            (group.path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError:
            return None
        return group

    def start(self, gateway: GatewayProcess) -> GatewayProcess:
        home = self._own_group()
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            return gateway.start()
        finally:
            (home / "cgroup.procs").write_text(str(os.getpid()))

    def high_water(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def _own_group(self) -> Path:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            if "memory" in controllers.split(","):
                return self.root / group.lstrip("/")
        return self.root


def _budget_under_the_limit() -> int:
    """The budget a gateway of CGROUP_ARGS computes inside CGROUP_LIMIT (gateway/memory.py)."""
    from ctjoint.gateway.memory import (
        ANALYSIS_BYTES_PER_DECODED_BYTE,
        PROCESS_BASE_BYTES,
        WORKER_SLACK_BYTES,
    )

    free = CGROUP_LIMIT - 3 * PROCESS_BASE_BYTES - 2 * WORKER_SLACK_BYTES
    return free // ANALYSIS_BYTES_PER_DECODED_BYTE


@pytest.fixture
def limited_gateway(
    contract_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, MemoryGroup | None]]:
    """A gateway of two scan slots in a 3 GiB memory cgroup at its default memory budget;
    where no cgroup can be made, the same budget is given as --memory-budget (and the
    high-water mark is still measured against the limit)."""
    group = MemoryGroup.make(CGROUP_LIMIT)
    args: tuple[str, ...] = CGROUP_ARGS
    if group is None:
        args += ("--memory-budget", str(_budget_under_the_limit()))
    process = GatewayProcess(contract_model_dir, tmp_path / "gateway.log", *args)
    try:
        yield (group.start(process) if group is not None else process.start()), group
    finally:
        process.stop()
        if group is not None:
            group.remove()


def _oversize(
    gateway: GatewayProcess, group: MemoryGroup | None, tmp_path: Path, expected: int
) -> tuple[grpc.RpcError, int]:
    """Send the 60-slice scan; its error and the memory high-water mark (the cgroup's, else
    the gateway's and its workers' summed peaks); then check the gateway serves a scan."""
    files = deflated_series(SLICES, BIG)
    assert sum(len(f) for f in files) < 8 * MIB  # a small upload ...
    assert gateway.process is not None
    with pytest.raises(grpc.RpcError) as refused:
        analyze(gateway.address, files, timeout=120, expected=expected)
    high_water = group.high_water() if group is not None else _tree_rss_hwm(gateway.process.pid)
    assert gateway.alive()
    series = file_bytes(write_ct_series(tmp_path / "after", slices=4))
    assert len(analyze(gateway.address, series, timeout=60).slice_file_number) == 4
    return refused.value, high_water


@pytest.mark.timeout(300)
def test_the_60_slice_deflated_4096_scan_is_refused_and_the_gateway_keeps_serving(
    limited_gateway: tuple[GatewayProcess, MemoryGroup | None], tmp_path: Path
) -> None:
    gateway, group = limited_gateway
    # Announced in the header: refused at the first file, before any volume is allocated.
    error, high_water = _oversize(gateway, group, tmp_path, expected=SLICES)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget of 1610612736 bytes per scan" in (error.details() or "")
    assert high_water < CGROUP_LIMIT
    figures.record(
        "oversize deflated scan (60 x 4096^2, expected_files) refused",
        high_water_mb=round(high_water / MIB),
        limit_mb=CGROUP_LIMIT // MIB,
    )


@pytest.mark.timeout(300)
def test_without_expected_files_the_scan_is_refused_at_the_gateway_budget(
    limited_gateway: tuple[GatewayProcess, MemoryGroup | None], tmp_path: Path
) -> None:
    """Unannounced, its volume grows as slices come: the slice that would take the scans in
    flight past the gateway's budget (sized from the cgroup's limit) is refused, before its
    buffer is allocated; on b3c1dff the worker was OOM-killed and the client got INTERNAL."""
    gateway, group = limited_gateway
    kills = group.oom_kills() if group is not None else 0
    error, high_water = _oversize(gateway, group, tmp_path, expected=0)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    budget = _budget_under_the_limit()
    slice_bytes = BIG * BIG * 4
    refused_at = budget // slice_bytes + 1
    assert (error.details() or "").startswith(f"at slice {refused_at}: the scan needs "), (
        error.details()
    )
    assert f"of the gateway's memory budget of {budget} bytes; retry later" in (
        error.details() or ""
    )
    assert high_water < CGROUP_LIMIT
    if group is not None:
        assert group.oom_kills() == kills
    assert "memory budget (decoded bytes): 1536 MiB per scan, " in gateway.log()
    figures.record(
        "oversize deflated scan (60 x 4096^2, no expected_files) refused",
        high_water_mb=round(high_water / MIB),
        limit_mb=CGROUP_LIMIT // MIB,
        budget_mb=budget // MIB,
        refused_at_slice=refused_at,
    )


@pytest.fixture
def overcommitted_gateway(
    contract_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, MemoryGroup]]:
    """A gateway told a budget far above its cgroup's limit (an operator's mistake)."""
    group = MemoryGroup.make(CGROUP_LIMIT)
    if group is None:
        pytest.fail("this test needs a cgroup v1 memory group (root on Linux, as in CI)")
    args = (*CGROUP_ARGS, "--max-scan-bytes", str(8 * 1024 * MIB))
    process = GatewayProcess(
        contract_model_dir, tmp_path / "gateway.log", *args, "--memory-budget", str(16 << 30)
    )
    try:
        yield group.start(process), group
    finally:
        process.stop()
        group.remove()


@pytest.mark.timeout(300)
def test_a_worker_killed_for_memory_ends_its_scan_resource_exhausted(
    overcommitted_gateway: tuple[GatewayProcess, MemoryGroup], tmp_path: Path
) -> None:
    """Past every budget, the kernel's OOM killer ends the worker: the scan gets
    RESOURCE_EXHAUSTED naming the memory limit (not INTERNAL 'died'), the worker is replaced
    and the gateway serves the next scan."""
    gateway, group = overcommitted_gateway
    kills = group.oom_kills()
    error, _ = _oversize(gateway, group, tmp_path, expected=0)
    assert group.oom_kills() > kills
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert (error.details() or "").startswith(
        "the process analysing this scan was killed by the kernel for memory (the gateway's "
        f"memory limit is {CGROUP_LIMIT} bytes"
    )


def test_the_ledger_refuses_a_reservation_past_the_budget_across_processes() -> None:
    from ctjoint.gateway.memory import MemoryLedger, ScanMemory

    ledger = MemoryLedger.create(4)
    try:
        # Another process (a worker) holds 300 MiB in slot 2 of the same ledger.
        code = (
            "import sys; from ctjoint.gateway.memory import MemoryLedger; "
            f"MemoryLedger({ledger.fd}, 4).reserve(2, {300 * MIB}, {1024 * MIB})"
        )
        subprocess.run([sys.executable, "-c", code], pass_fds=(ledger.fd,), check=True)
        assert ledger.held(2) == 300 * MIB
        scan = ScanMemory(1024 * MIB, ledger=ledger, slot=0, budget_bytes=512 * MIB)
        scan.reserve(200 * MIB, "at slice 4")
        with pytest.raises(
            LimitExceededError,
            match=rf"^at slice 9: the scan needs {400 * MIB} bytes decoded, and the scans in "
            rf"flight hold {300 * MIB} of the gateway's memory budget of {512 * MIB} bytes; "
            "retry later$",
        ):
            scan.reserve(400 * MIB, "at slice 9")
        assert ledger.in_use() == 500 * MIB
        scan.release()
        assert ledger.in_use() == 300 * MIB
    finally:
        ledger.close()


def test_an_analysis_past_its_worker_bound_gets_memory_error_then_resource_exhausted() -> None:
    """RLIMIT_DATA, as a worker sets it for its scan: an allocation past base + slack + 6 x
    the reservation fails in the allocator (MemoryError), and the scan's error names the
    bound; after the scan the bound is lifted. Run in a process of its own."""
    code = """
import numpy as np
from ctjoint.gateway.memory import ScanMemory, WORKER_SLACK_BYTES
memory = ScanMemory(1 << 30, bound=True)
memory.reserve(64 << 20, "at slice 1")
try:
    np.ones(WORKER_SLACK_BYTES + 7 * (64 << 20), dtype=np.uint8)
except MemoryError:
    print(memory.out_of_memory())
memory.release()
print(np.ones(WORKER_SLACK_BYTES + 7 * (64 << 20), dtype=np.uint8).nbytes)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    message, after = done.stdout.strip().splitlines()
    assert message.startswith(
        f"the analysis of a scan of {64 * MIB} bytes decoded needed more than its worker's "
        "memory bound of "
    )
    assert message.endswith(
        "bytes (6 x its decoded volume, plus 512 MiB for decoding a file); the scan was ended"
    )
    assert int(after) == 512 * MIB + 7 * 64 * MIB
