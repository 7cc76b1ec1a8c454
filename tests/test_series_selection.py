"""Real-data readiness: localizer (scout) images sent with a series are skipped, not fatal;
losslessly compressed series analyse exactly like the original."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRBigEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

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
