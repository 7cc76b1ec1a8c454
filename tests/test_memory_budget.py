"""A memory budget per scan (issue 21): 40 deflated 4096 x 4096 slices (1.35 MB uploaded) took
a gateway to 3.6 GB, 60 got it OOM-killed. The decoded volume is now budgeted from each file's
Rows and Columns (and the header's expected_files) before it is allocated: such a scan gets
RESOURCE_EXHAUSTED, the gateway's memory stays bounded, and it goes on serving."""

from __future__ import annotations

import os
import struct
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


def _memory_cgroup(limit: int) -> Path | None:
    """A cgroup v1 memory group limited to `limit` bytes, where this machine lets us make one
    (root); None elsewhere (the high-water mark is still measured and bounded)."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").exists() or os.geteuid() != 0:
        return None
    group = root / f"ctjoint-test-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        return None
    return group


@pytest.fixture
def limited_gateway(contract_model_dir: Path, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(contract_model_dir, tmp_path / "gateway.log").start()
    assert process.process is not None
    pid = process.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    # What the gateway and its workers hold now, plus room for one scan at its budget.
    group = _memory_cgroup(_tree_rss_hwm(pid) + int(1.5 * DEFAULT_MAX_SCAN_BYTES) + 512 * MIB)
    if group is not None:
        for each in [str(pid), *children]:
            (group / "cgroup.procs").write_text(each)
    try:
        yield process
    finally:
        process.stop()
        if group is not None:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.mark.timeout(300)
def test_the_60_slice_deflated_4096_scan_is_refused_and_the_gateway_keeps_serving(
    limited_gateway: GatewayProcess, tmp_path: Path
) -> None:
    files = deflated_series(SLICES, BIG)
    uploaded = sum(len(f) for f in files)
    assert uploaded < 8 * MIB  # a small upload ...
    assert limited_gateway.process is not None
    pid = limited_gateway.process.pid
    base = _tree_rss_hwm(pid)
    # Announced in the header: refused at the first file, before any volume is allocated.
    with pytest.raises(grpc.RpcError) as refused:
        analyze(limited_gateway.address, files, timeout=120, expected=SLICES)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget of 1610612736 bytes per scan" in (refused.value.details() or "")
    high_water = _tree_rss_hwm(pid)
    assert limited_gateway.alive()
    series = file_bytes(write_ct_series(tmp_path / "after", slices=4))
    assert len(analyze(limited_gateway.address, series, timeout=60).slice_file_number) == 4
    # ... that would have needed 60 x 64 MiB = 3.75 GiB decoded; the budget keeps the
    # gateway's peak growth below 1.5 x DEFAULT_MAX_SCAN_BYTES plus one inflated file.
    growth = high_water - base
    figures.record(
        "oversize deflated scan (60 x 4096^2) refused",
        uploaded_mb=round(uploaded / MIB, 2),
        high_water_mb=round(high_water / MIB),
        growth_mb=round(growth / MIB),
        budget_mb=DEFAULT_MAX_SCAN_BYTES // MIB,
    )
    assert growth < 1.5 * DEFAULT_MAX_SCAN_BYTES + 128 * MIB
