"""`ctjoint analyze`: each bad input gives one clear error (file and problem), no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from ctjoint.cli import app


def _analyze(folder: Path, model_dir: Path, *extra: str) -> tuple[int, str]:
    runner = CliRunner()
    result = runner.invoke(
        app, ["analyze", str(folder), "--model-dir", str(model_dir), *extra], catch_exceptions=False
    )
    return result.exit_code, result.output


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def _assert_one_clean_error(code: int, output: str, *fragments: str) -> None:
    assert code != 0
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_a_valid_series_is_analysed_and_written(
    ct_series_dir: Path, contract_model_dir: Path, tmp_path: Path
) -> None:
    json_out, png_out = tmp_path / "out" / "result.json", tmp_path / "out" / "overlay.png"
    code, output = _analyze(
        ct_series_dir, contract_model_dir, "--json", str(json_out), "--png", str(png_out)
    )
    assert code == 0, output
    assert "covid19" in output
    assert json.loads(json_out.read_text())["label"] == "covid19"
    assert png_out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_empty_folder(tmp_path: Path, contract_model_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, output = _analyze(tmp_path / "empty", contract_model_dir)
    _assert_one_clean_error(code, output, "empty", "no DICOM file")


def test_non_dicom_file(ct_series_dir: Path, contract_model_dir: Path) -> None:
    (ct_series_dir / "README.txt").write_text("scanner export notes\n")
    code, output = _analyze(ct_series_dir, contract_model_dir)
    _assert_one_clean_error(code, output, "README.txt", "not a DICOM")


def test_non_ct_modality(ct_series_dir: Path, contract_model_dir: Path) -> None:
    shutil.copy(get_testdata_file("MR_small.dcm"), ct_series_dir / "MR_small.dcm")
    code, output = _analyze(ct_series_dir, contract_model_dir)
    _assert_one_clean_error(code, output, "(MR_small.dcm)", "Modality", "'MR'")


def test_two_studies(ct_series_dir: Path, contract_model_dir: Path) -> None:
    # Several series of one study are chosen among (tests/test_series_choice_study.py).
    _edit(
        ct_series_dir / "IM0006.dcm",
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
    )
    code, output = _analyze(ct_series_dir, contract_model_dir)
    _assert_one_clean_error(code, output, "(IM0006.dcm)", "StudyInstanceUID", "another study")


def test_missing_pixel_data(ct_series_dir: Path, contract_model_dir: Path) -> None:
    _edit(ct_series_dir / "IM0002.dcm", PixelData=None)
    code, output = _analyze(ct_series_dir, contract_model_dir)
    _assert_one_clean_error(code, output, "(IM0002.dcm)", "PixelData", "absent")


def test_inconsistent_orientation(ct_series_dir: Path, contract_model_dir: Path) -> None:
    _edit(ct_series_dir / "IM0007.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    code, output = _analyze(ct_series_dir, contract_model_dir)
    _assert_one_clean_error(code, output, "(IM0007.dcm)", "ImageOrientationPatient", "differs")


def test_inconsistent_spacing(ct_series_dir: Path, contract_model_dir: Path) -> None:
    (ct_series_dir / "IM0005.dcm").unlink()
    code, output = _analyze(ct_series_dir, contract_model_dir)
    _assert_one_clean_error(code, output, "(IM0004.dcm)", "(IM0006.dcm)", "not uniform", "5 mm")


def test_missing_model_file(ct_series_dir: Path, tmp_path: Path) -> None:
    code, output = _analyze(ct_series_dir, tmp_path)
    _assert_one_clean_error(code, output, "jcs2d", "make onnx")


@pytest.mark.parametrize("fragment", ["Test^Phantom", "TEST0001"])
def test_errors_never_show_patient_identifiers(
    ct_series_dir: Path, contract_model_dir: Path, fragment: str
) -> None:
    _edit(ct_series_dir / "IM0002.dcm", PixelData=None)
    _, output = _analyze(ct_series_dir, contract_model_dir)
    assert fragment not in output
