"""Plausibility bounds (issue 21): absurd geometry, rescale values and UIDs are refused with
INVALID_ARGUMENT naming the attribute and the allowed range, while every phantom the project
generates, unusual but legal ones included, stays inside the bounds."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from dicom_factory import chest_volume, ct_dataset, write_ct_series
from gateway_process import GatewayProcess, analyze, file_bytes
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ctjoint.export.phantom import MIN_SIZE, write_phantom_case
from ctjoint.export.phantom_families import TRAINING_FAMILY
from ctjoint.export.phantom_scanner import PIXEL_MM_RANGE, Scanner
from ctjoint.gateway import dicom_io, series
from ctjoint.gateway.dicom_io import read_ct_slice
from ctjoint.gateway.errors import InconsistentGeometryError, InvalidAttributeError
from ctjoint.gateway.series import load_series_dir

SOURCE = "file 3"


def _dataset(size: int = 32, **attributes: object) -> Dataset:
    ds = ct_dataset(
        chest_volume(1, size)[0],
        index=3,
        position=(0.0, 0.0, 7.5),
        series_uid=generate_uid(),
        study_uid=generate_uid(),
        frame_uid=generate_uid(),
    )
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"PixelSpacing": ["1e30", "1e30"]}, r"PixelSpacing: is \[1e\+30, 1e\+30\] mm, outside "),
        ({"PixelSpacing": ["0.01", "0.7"]}, r"PixelSpacing: .* range 0\.05 to 30 mm"),
        ({"RescaleSlope": "1e30"}, r"RescaleSlope: is 1e\+30, outside the plausible range 0\.01"),
        ({"RescaleSlope": "-1"}, r"RescaleSlope: is -1, outside the plausible range 0\.01 to 100"),
        ({"RescaleSlope": "0"}, r"RescaleSlope: is 0, outside"),
        ({"RescaleIntercept": "-1e9"}, r"RescaleIntercept: is -1e\+09, outside .* -10000 to"),
        ({"SliceThickness": "1e30"}, r"SliceThickness: is 1e\+30 mm, outside .* 0\.1 to 20 mm"),
    ],
)
def test_an_absurd_value_is_refused_naming_the_attribute_and_the_range(
    attributes: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidAttributeError, match=f"^{SOURCE}: {message}"):
        read_ct_slice(_bytes(_dataset(**attributes)), source=SOURCE)


def test_a_field_of_view_of_metres_is_refused() -> None:
    ds = _dataset(size=64, PixelSpacing=["20", "20"])  # 64 x 20 mm = 1.28 m
    with pytest.raises(InvalidAttributeError, match=r"PixelSpacing: gives a field of view of 1280"):
        read_ct_slice(_bytes(ds), source=SOURCE)


@pytest.mark.parametrize("size", [1, 15])
def test_a_slice_smaller_than_the_minimum_matrix_is_refused(size: int) -> None:
    with pytest.raises(InvalidAttributeError, match=rf"Rows: is {size}, expected 16\.\.4096"):
        read_ct_slice(_bytes(_dataset(size=size)), source=SOURCE)


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"]
)
@pytest.mark.parametrize("value", ["../../x", "1.2.3/4", "1.2." + "3" * 70, "1.2.3a"])
def test_a_uid_that_is_not_a_uid_is_refused(keyword: str, value: str) -> None:
    with pytest.raises(
        InvalidAttributeError, match=f"^{SOURCE}: {keyword}: is not a valid UID"
    ) as e:
        read_ct_slice(_bytes(_dataset(**{keyword: value})), source=SOURCE)
    assert value not in str(e.value)


def test_legal_unusual_values_are_read() -> None:
    # Unsigned pixels with intercept -1024, 0.5 mm pixels, 0.6 mm slices, slope 0.5.
    ds = _dataset(PixelSpacing=["0.5", "0.98"], SliceThickness="0.6", RescaleSlope="0.5")
    ds.PixelRepresentation = 0
    ct_slice = read_ct_slice(_bytes(ds), source=SOURCE)
    assert ct_slice.pixel_spacing == (0.5, 0.98)
    assert ct_slice.slice_thickness == 0.6


def _series(tmp_path: Path, *, slices: int, spacing_z: float = 2.5) -> Path:
    folder = tmp_path / "series"
    write_ct_series(folder, slices=slices, spacing_z=spacing_z)
    return folder


def test_a_series_of_two_slices_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        InconsistentGeometryError, match=r"^series: slices: has 2 slice\(s\), expected at least 3"
    ):
        load_series_dir(_series(tmp_path, slices=2))


@pytest.mark.parametrize("spacing", [0.05, 50.0])
def test_a_slice_spacing_outside_the_bounds_is_refused(tmp_path: Path, spacing: float) -> None:
    folder = _series(tmp_path, slices=4, spacing_z=spacing)
    thickness = min(max(spacing, 0.1), 20.0)  # in its own range: only the spacing is absurd
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SliceThickness = f"{thickness:g}"
        ds.save_as(path)
    with pytest.raises(
        InconsistentGeometryError, match=r"ImagePositionPatient: slices are .* 0\.1 to 20 mm"
    ):
        load_series_dir(folder)


def test_a_thickness_out_of_proportion_to_the_spacing_is_refused(tmp_path: Path) -> None:
    folder = _series(tmp_path, slices=4, spacing_z=10.0)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SliceThickness = "0.2"  # a fiftieth of the spacing
        ds.save_as(path)
    with pytest.raises(InconsistentGeometryError, match=r"SliceThickness: is 0\.2 mm for slices"):
        load_series_dir(folder)


def test_every_scanner_the_phantom_generator_draws_is_inside_the_bounds() -> None:
    rng = np.random.default_rng(21)
    worst_pixel = PIXEL_MM_RANGE[1] * 512 / MIN_SIZE  # the largest pixel, at the smallest size
    assert dicom_io.PIXEL_SPACING_MM[0] <= 0.5 and worst_pixel <= dicom_io.PIXEL_SPACING_MM[1]
    assert worst_pixel * MIN_SIZE <= dicom_io.MAX_FIELD_OF_VIEW_MM
    for _ in range(2000):
        scanner = Scanner.sample(rng, half_width=170.0, half_depth=120.0, z_span=(0.0, 280.0))
        low, high = dicom_io.SLICE_THICKNESS_MM
        assert low <= scanner.thickness_mm <= high
        low, high = series.SLICE_SPACING_MM
        assert low <= scanner.slice_mm <= high
        low, high = series.THICKNESS_TO_SPACING
        assert low <= scanner.thickness_mm / scanner.slice_mm <= high
        low, high = dicom_io.RESCALE_INTERCEPT
        assert low <= scanner.intercept <= high


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_generated_phantoms_load_inside_the_bounds(tmp_path: Path, seed: int) -> None:
    kind = ("covid19", "cap", "normal", "covid19")[seed]
    write_phantom_case(
        tmp_path / "case", kind=kind, seed=seed, slices=None, size=MIN_SIZE, family=TRAINING_FAMILY
    )
    volume = load_series_dir(tmp_path / "case" / "series")
    assert volume.shape[0] >= series.MIN_SLICES


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("bounds_gateway") / "gateway.log"
    process = GatewayProcess(contract_model_dir, log).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("PixelSpacing", ["1e30", "1e30"], r"^file 2: PixelSpacing: is \[1e\+30, 1e\+30\] mm"),
        ("RescaleSlope", "1e30", r"^file 2: RescaleSlope: is 1e\+30, outside the plausible"),
        ("StudyInstanceUID", "../../x", r"^file 2: StudyInstanceUID: is not a valid UID"),
    ],
)
def test_the_gateway_answers_invalid_argument_for_an_absurd_value(
    gateway: GatewayProcess, tmp_path: Path, keyword: str, value: object, message: str
) -> None:
    paths = write_ct_series(tmp_path / "series", slices=4)
    contents = file_bytes(paths)
    ds = pydicom.dcmread(io.BytesIO(contents[1]))
    setattr(ds, keyword, value)
    contents[1] = _bytes(ds)
    with pytest.raises(grpc.RpcError) as info:
        analyze(gateway.address, contents, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() is not None
    assert re.match(message, info.value.details())
    # The gateway serves the next, plausible scan.
    assert len(analyze(gateway.address, file_bytes(paths), timeout=30).slice_file_number) == 4
