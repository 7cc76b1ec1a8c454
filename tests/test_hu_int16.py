"""Whole-HU series are kept in int16 (half float32's bytes), with the same numbers and the same
analysis; a slice that needs float32 widens the volume (issue 22, points 3 and 4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_ct_series

from ctjoint.contracts import MODEL_NAMES
from ctjoint.gateway.analysis import ScanAnalysis, ScanAnalyzer
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.dicom_io import describe_source, read_ct_slice
from ctjoint.gateway.series import CtVolume, SeriesAssembler, list_series_files, load_series_dir


def _plain(folder: Path) -> np.ndarray:
    """The plain definition: each file's float32 HU, sorted along z (the names are)."""
    return np.stack([read_ct_slice(p).hu for p in list_series_files(folder)])


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def _streamed(folder: Path, expected: int | None) -> CtVolume:
    assembler = SeriesAssembler(expected_slices=expected)
    for index, path in enumerate(list_series_files(folder), start=1):
        assembler.add(
            read_ct_slice(
                path.read_bytes(), source=describe_source(index), hu_out=assembler.next_slot
            )
        )
    return assembler.finish()


def test_a_whole_hu_series_is_int16_with_the_same_numbers(tmp_path: Path) -> None:
    write_ct_series(tmp_path, slices=6, size=32)
    plain = _plain(tmp_path)
    assert plain.dtype == np.float32
    for volume in (load_series_dir(tmp_path), _streamed(tmp_path, None)):
        assert volume.hu.dtype == np.int16
        assert volume.hu.nbytes == plain.nbytes // 2
        np.testing.assert_array_equal(volume.hu.astype(np.float32), plain)
        assert not volume.hu.flags.writeable


@pytest.mark.parametrize("which", [0, 3, 5])
@pytest.mark.parametrize("expected", [6, None])
def test_a_fractional_slice_widens_the_volume_to_float32(
    tmp_path: Path, which: int, expected: int | None
) -> None:
    paths = write_ct_series(tmp_path, slices=6, size=32)
    # Stored -1024 + 0.5 * stored: HU that are not whole numbers.
    _edit(paths[which], RescaleSlope="0.5", RescaleIntercept="-512.25")
    plain = _plain(tmp_path)
    assert not np.array_equal(plain, np.round(plain))
    volume = _streamed(tmp_path, expected)
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, plain)


def test_hu_past_int16_are_float32(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, slices=4, size=32)
    # A stored 32000 (signed 16-bit) with an intercept of +1000 is 33000 HU.
    ds = pydicom.dcmread(paths[2])
    stored = ds.pixel_array.copy()
    stored[5, 7] = 32000
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.RescaleIntercept = "1000"
    ds.save_as(paths[2], enforce_file_format=True)
    plain = _plain(tmp_path)
    assert plain.max() == 33000.0
    volume = load_series_dir(tmp_path)
    assert volume.hu.dtype == np.float32
    np.testing.assert_array_equal(volume.hu, plain)


def test_volumes_from_arrays_keep_int16_and_make_the_rest_float32() -> None:
    whole = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 1000
    assert CtVolume.from_array(whole, (1.0, 1.0, 1.0)).hu.dtype == np.int16
    for dtype in (np.float64, np.int32, np.uint16):
        volume = CtVolume.from_array(whole.astype(dtype), (1.0, 1.0, 1.0))
        assert volume.hu.dtype == np.float32


def _analyses(volumes: list[CtVolume], model: str, model_dir: Path) -> list[ScanAnalysis]:
    async def run() -> list[ScanAnalysis]:
        async with EmbeddedBackend([model], model_dir=model_dir) as backend:
            analyzer = ScanAnalyzer(backend)
            return [await analyzer.analyze_volume(v, model) for v in volumes]

    return asyncio.run(run())


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_int16_and_float32_volumes_give_the_same_analysis(
    model: str, ct_series_dir: Path, contract_model_dir: Path
) -> None:
    whole = load_series_dir(ct_series_dir)
    assert whole.hu.dtype == np.int16
    wide = CtVolume.from_array(whole.hu.astype(np.float32), whole.spacing_mm)
    a, b = _analyses([whole, wide], model, contract_model_dir)
    np.testing.assert_array_equal(a.label_map, b.label_map)
    assert a.lung_map is not None and b.lung_map is not None
    np.testing.assert_array_equal(a.lung_map, b.lung_map)
    assert a.result.probabilities == b.result.probabilities
    assert a.result.lesions == b.result.lesions
    assert a.result.quantification == b.result.quantification
    assert a.result.lesions.total_voxels > 0
