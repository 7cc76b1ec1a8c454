"""Real-data readiness: localizer (scout) images sent with a series are skipped, not fatal;
losslessly compressed series analyse exactly like the original."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from gateway_process import GatewayProcess
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    XRayRadiationDoseSRStorage,
)

from ctjoint.client.send import SELECTION_JSON, send_series
from ctjoint.client.series_choice import choose_series
from ctjoint.contracts import MODEL_JCS2D
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.analysis import analyze_directory
from ctjoint.gateway.errors import EmptySeriesError
from ctjoint.gateway.series import list_series_files


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = tmp_path_factory.mktemp("scout_phantom")
    write_phantom_case(case, kind="normal", seed=4, slices=6, size=32)
    return case / "series"


def test_a_localizer_in_the_series_is_skipped(
    phantom_series: Path, contract_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "with_scout"
    shutil.copytree(phantom_series, folder)
    scout = pydicom.dcmread(next(iter(sorted(folder.iterdir()))))
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal scout, not a slice
    scout.save_as(folder / "scout.dcm", enforce_file_format=True)
    analysis = analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir)
    assert analysis.volume.shape[0] == len(list_series_files(phantom_series))


def test_a_series_of_localizers_only_is_empty(
    phantom_series: Path, contract_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "scouts"
    folder.mkdir()
    scout = pydicom.dcmread(list_series_files(phantom_series)[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(folder / "scout.dcm", enforce_file_format=True)
    with pytest.raises(EmptySeriesError, match="only 1 localizer image"):
        analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_a_losslessly_compressed_series_is_analysed_like_the_original(
    syntax: UID, phantom_series: Path, contract_model_dir: Path, tmp_path: Path
) -> None:
    if not pydicom.pixels.get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder here to make the test series")
    folder = tmp_path / "compressed"
    folder.mkdir()
    for path in list_series_files(phantom_series):
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(folder / path.name, enforce_file_format=True)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == syntax
    original = analyze_directory(phantom_series, model=MODEL_JCS2D, model_dir=contract_model_dir)
    compressed = analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir)
    np.testing.assert_array_equal(compressed.volume_hu, original.volume_hu)
    np.testing.assert_array_equal(compressed.label_map, original.label_map)


def test_a_big_endian_series_is_analysed_like_the_original(
    phantom_series: Path, contract_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "big_endian"
    folder.mkdir()
    for path in list_series_files(phantom_series):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        # pydicom writes element values in the new byte order but leaves pixel bytes as given.
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
        dcmwrite(
            folder / path.name,
            ds,
            implicit_vr=False,
            little_endian=False,
            force_encoding=True,
        )
    assert (
        pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID.is_little_endian
        is False
    )
    original = analyze_directory(phantom_series, model=MODEL_JCS2D, model_dir=contract_model_dir)
    swapped = analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir)
    np.testing.assert_array_equal(swapped.volume_hu, original.volume_hu)
    np.testing.assert_array_equal(swapped.label_map, original.label_map)


# --- the right series out of a study (client/series_choice.py, issue 19) --------------------


def _variant(
    source: list[Path], folder: Path, number: int, *, count: int | None = None, **changes: Any
) -> str:
    """The series `source` (its first `count` files) copied into `folder` as series `number`
    with `changes` set in every file; returns its new Series Instance UID."""
    uid = pydicom.uid.generate_uid()
    for path in source[:count]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = uid, number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / f"s{number}_{path.name}", enforce_file_format=True)
    return uid


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One folder, one study: the series to choose (24 axial slices of 5 mm, lung kernel, with
    a localizer image inside), its soft-tissue and its 10 mm twins, a localizer series, a
    partial series, and a dose report."""
    root = tmp_path_factory.mktemp("study")
    write_phantom_case(root / "case", kind="covid19", seed=5, slices=24, size=32)
    source = list_series_files(root / "case" / "series")
    folder = root / "study"
    folder.mkdir()
    chosen = _variant(source, folder, 2, ConvolutionKernel="B70f")
    scout = pydicom.dcmread(folder / f"s2_{source[0].name}")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(folder / "s2_scout.dcm", enforce_file_format=True)
    _variant(source, folder, 3, ConvolutionKernel="B30f")
    _variant(source, folder, 4, ConvolutionKernel="B70f", SliceThickness="10")
    _variant(source, folder, 1, count=1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _variant(source, folder, 5, count=6, ConvolutionKernel="B70f")
    _variant(source, folder, 6, count=24, ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    dose = pydicom.dcmread(source[0], stop_before_pixels=True)
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = XRayRadiationDoseSRStorage
    dose.SeriesInstanceUID, dose.SeriesNumber, dose.Modality = pydicom.uid.generate_uid(), 99, "SR"
    dose.save_as(folder / "dose.dcm", enforce_file_format=True)
    return folder, chosen


def test_the_lung_kernel_series_is_chosen_and_every_other_is_skipped_with_its_reason(
    study: tuple[Path, str],
) -> None:
    folder, uid = study
    choice = choose_series(list_series_files(folder))
    assert choice.chosen is not None and choice.series_count == 7
    assert choice.chosen.number == 2 and len(choice.chosen.files) == 24
    assert choice.notes == ("1 localizer image(s) in the series dropped",)
    reasons = {c.number: why for c, why in choice.skipped}
    assert reasons == {
        3: "soft kernel; a lung kernel is preferred",
        4: "slice thickness 10.0 mm is further from 1.0-5.0 mm",
        1: "localizer images only",
        5: "too short to cover the lungs (6 slices over 25 mm; at least 20 over 100)",
        6: "not ORIGINAL images (derived or secondary)",
        99: "not CT Image Storage (a dose report, secondary capture or other object)",
    }
    described = json.dumps(choice.to_dict())
    assert uid not in described and choice.to_dict()["analysed"]["kernel"] == "lung"


def test_send_analyses_the_chosen_series_of_a_study(
    study: tuple[Path, str], contract_model_dir: Path, tmp_path: Path
) -> None:
    folder, _ = study
    process = GatewayProcess(contract_model_dir, tmp_path / "gateway.log").start()
    try:
        outcome = send_series(
            folder,
            gateway=process.address,
            model=MODEL_JCS2D,
            out_dir=tmp_path / "out",
            show_progress=False,
        )
    finally:
        process.stop()
    assert outcome.result["series"]["slices"] == 24
    selection = json.loads((tmp_path / "out" / SELECTION_JSON).read_text())
    assert selection["analysed"]["number"] == 2
    assert sorted(s["number"] for s in selection["skipped"]) == [1, 3, 4, 5, 6, 99]
