"""Deflated Explicit VR Little Endian files of every size read back exactly, and truncated
ones get a clear error, never a hang (issue 21: the inflated-size guard looped for ever on 5-6
of 10 pydicom-written 1024x1024 slices).

The files are written by pydicom itself, with noise on the phantom so that the deflate
streams have realistic lengths: odd and even ones (pydicom pads an odd stream with a byte),
inflated data sets below and above the guard's 1 MiB chunk, and the largest matrix accepted.
"""

from __future__ import annotations

import io
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import INTERCEPT, chest_volume, ct_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from ctjoint.gateway import dicom_io
from ctjoint.gateway.dicom_io import MAX_MATRIX, read_ct_slice
from ctjoint.gateway.errors import NotDicomError

# Seconds a read may take before pytest-timeout calls it a hang (a 4096x4096 read takes ~1 s).
HANG_S = 60


@cache
def deflated_slice(size: int, seed: int) -> tuple[bytes, np.ndarray]:
    """A deflated CT file of size x size pixels and the HU values it must read back as."""
    rng = np.random.default_rng(seed)
    hu = chest_volume(1, size)[0] + rng.normal(0.0, 20.0, (size, size)).astype(np.float32)
    hu = np.round(hu - INTERCEPT) + INTERCEPT  # what the 16-bit stored values can hold
    ds = ct_dataset(
        hu,
        index=1,
        position=(0.0, 0.0, 0.0),
        series_uid=generate_uid(),
        study_uid=generate_uid(),
        frame_uid=generate_uid(),
        pixel_spacing=(350.0 / size, 350.0 / size),  # a 350 mm field of view at any size
    )
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), hu


def stream_facts(data: bytes) -> tuple[int, int, int]:
    """(deflate stream length, bytes after its end, inflated size) of a deflated file."""
    meta_end, syntax = dicom_io._file_meta_syntax(data[: 64 * 1024])
    assert syntax == DeflatedExplicitVRLittleEndian
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = len(inflater.decompress(data[meta_end:]))
    assert inflater.eof
    after = len(inflater.unused_data)
    return len(data) - meta_end - after, after, inflated


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("size", [512, 513, 1023, 1024, 2047, MAX_MATRIX])
def test_a_deflated_slice_reads_back_exactly(size: int) -> None:
    data, hu = deflated_slice(size, seed=size)
    ct_slice = read_ct_slice(data, source="file 1")
    assert ct_slice.hu.shape == (size, size)
    np.testing.assert_array_equal(ct_slice.hu, hu)


@pytest.mark.timeout(HANG_S)
def test_the_ten_1024_slices_that_hung_the_size_guard_now_read() -> None:
    # On b3c1dff seeds 1, 2, 4, 7 and 9 looped for ever in _check_inflated_size.
    for seed in range(10):
        data, hu = deflated_slice(1024, seed)
        np.testing.assert_array_equal(read_ct_slice(data, source=f"file {seed}").hu, hu)


def test_the_files_cover_odd_and_even_streams_and_both_sides_of_the_chunk() -> None:
    facts = [stream_facts(deflated_slice(1024, seed)[0]) for seed in range(10)]
    facts += [stream_facts(deflated_slice(size, size)[0]) for size in (512, 513)]
    parities = {length % 2 for length, _, _ in facts}
    assert parities == {0, 1}
    # pydicom pads an odd stream to an even file length with one byte after the stream.
    assert {after for length, after, _ in facts if length % 2} == {1}
    assert {after for length, after, _ in facts if not length % 2} == {0}
    chunk = dicom_io._INFLATE_CHUNK
    inflated = [size for _, _, size in facts]
    assert min(inflated) < chunk < max(inflated)


@pytest.mark.timeout(HANG_S)
@pytest.mark.parametrize("size", [512, 1024])
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.99])
def test_a_truncated_deflate_stream_is_a_clear_error(size: int, keep: float) -> None:
    data, _ = deflated_slice(size, seed=3)
    meta_end, _ = dicom_io._file_meta_syntax(data[: 64 * 1024])
    length, _, _ = stream_facts(data)
    cut = data[: meta_end + int(length * keep)]
    with pytest.raises(NotDicomError, match=r"^file 1: its deflated data set is truncated"):
        read_ct_slice(cut, source="file 1")


@pytest.mark.timeout(HANG_S)
def test_a_stream_cut_by_its_last_byte_is_a_clear_error() -> None:
    data, _ = deflated_slice(1024, seed=1)
    meta_end, _ = dicom_io._file_meta_syntax(data[: 64 * 1024])
    length, _, _ = stream_facts(data)
    with pytest.raises(NotDicomError, match=r"^file 1: its deflated data set is truncated"):
        read_ct_slice(data[: meta_end + length - 1], source="file 1")


@pytest.mark.timeout(HANG_S)
def test_a_deflated_file_read_from_a_path_is_guarded_too(tmp_path: Path) -> None:
    data, hu = deflated_slice(1024, seed=2)
    path = tmp_path / "IM0001.dcm"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_ct_slice(path).hu, hu)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NotDicomError, match=r"^IM0001\.dcm: its deflated data set is truncated"):
        read_ct_slice(path)
