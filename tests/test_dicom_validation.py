"""One DICOM file in, one validated CT slice (or one clear error naming file and attribute) out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import INTERCEPT, ct_dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedCTImageStorage,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from ctjoint.gateway.dicom_io import describe_source, read_ct_slice
from ctjoint.gateway.errors import (
    InputError,
    InvalidAttributeError,
    MissingAttributeError,
    NotCtError,
    NotDicomError,
    UnsupportedSopClassError,
    UnsupportedTransferSyntaxError,
)

SOURCE = describe_source(3, "IM00003.dcm")


def _dataset(size: int = 16) -> Dataset:
    hu = np.linspace(-1000, 400, size * size, dtype=np.float32).reshape(size, size)
    return ct_dataset(
        np.round(hu),
        index=3,
        position=(-10.0, -20.0, 30.0),
        series_uid=generate_uid(),
        study_uid=generate_uid(),
        frame_uid=generate_uid(),
    )


def _read(ds: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "IM00003.dcm"
    ds.save_as(path, enforce_file_format=True)
    read_ct_slice(path, source=SOURCE)


def test_pydicom_ct_small_reads_as_a_ct_slice_in_hu() -> None:
    path = get_testdata_file("CT_small.dcm")
    raw = pydicom.dcmread(path)
    ct = read_ct_slice(path)
    assert ct.hu.shape == (128, 128)
    assert ct.hu.dtype == np.float32
    expected = raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    np.testing.assert_array_equal(ct.hu, expected.astype(np.float32))
    assert ct.pixel_spacing == pytest.approx((0.661468, 0.661468))
    assert ct.position == pytest.approx((-158.135803, -179.035797, -75.699997))
    assert ct.normal == pytest.approx([0.0, 0.0, 1.0])
    assert ct.source == "CT_small.dcm"


def test_bytes_and_path_give_the_same_slice(tmp_path: Path) -> None:
    ds = _dataset()
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    from_path = read_ct_slice(path)
    from_bytes = read_ct_slice(path.read_bytes(), source="file 1")
    np.testing.assert_array_equal(from_path.hu, from_bytes.hu)
    assert from_bytes.sop_instance_uid == from_path.sop_instance_uid
    assert from_bytes.hu[0, 0] == -1000.0


def test_slice_pixels_are_read_only(tmp_path: Path) -> None:
    ds = _dataset()
    ct = read_ct_slice(ds_bytes(ds), source=SOURCE)
    with pytest.raises(ValueError):
        ct.hu[0, 0] = 0.0


def test_rescale_slope_is_applied() -> None:
    ds = _dataset()
    ds.RescaleSlope = "2"
    stored = np.frombuffer(ds.PixelData, dtype="<i2").reshape(16, 16)
    ct = read_ct_slice(ds_bytes(ds), source=SOURCE)
    np.testing.assert_array_equal(ct.hu, stored * 2.0 + INTERCEPT)


def test_a_text_file_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    with pytest.raises(NotDicomError, match=r"^file 3 \(IM00003\.dcm\): not a DICOM"):
        read_ct_slice(path, source=SOURCE)


def test_truncated_bytes_are_not_dicom() -> None:
    data = ds_bytes(_dataset())
    with pytest.raises(NotDicomError, match="file 3"):
        read_ct_slice(data[:200], source=SOURCE)


def test_an_mr_image_is_not_ct() -> None:
    with pytest.raises(NotCtError, match=r"file 3 \(IM00003\.dcm\): Modality: is 'MR'"):
        read_ct_slice(get_testdata_file("MR_small.dcm"), source=SOURCE)


def test_a_secondary_capture_with_modality_ct_is_not_a_ct_image() -> None:
    ds = _dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    with pytest.raises(NotCtError, match="SOPClassUID: is Secondary Capture"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_enhanced_ct_is_refused_as_unsupported() -> None:
    ds = _dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    with pytest.raises(UnsupportedSopClassError, match="Enhanced CT Image Storage"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_missing_pixel_data_is_named() -> None:
    ds = _dataset()
    del ds.PixelData
    with pytest.raises(MissingAttributeError, match=r"file 3 \(IM00003\.dcm\): PixelData: is"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_short_pixel_data_gives_the_expected_size() -> None:
    ds = _dataset()
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(InvalidAttributeError, match="PixelData: holds 100 bytes, expected 512"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


@pytest.mark.parametrize(
    "keyword",
    ["Rows", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope"],
)
def test_each_required_attribute_is_checked(keyword: str) -> None:
    ds = _dataset()
    delattr(ds, keyword)
    with pytest.raises(MissingAttributeError, match=f"file 3 .*: {keyword}: is absent"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_non_orthogonal_orientation_is_invalid() -> None:
    ds = _dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    with pytest.raises(InvalidAttributeError, match=r"ImageOrientationPatient: .* not two"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_zero_pixel_spacing_is_invalid() -> None:
    ds = _dataset()
    ds.PixelSpacing = [0, 0.7]
    with pytest.raises(InvalidAttributeError, match="PixelSpacing: must be positive"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_position_with_two_values_is_invalid() -> None:
    ds = _dataset()
    ds.ImagePositionPatient = [1, 2]
    with pytest.raises(InvalidAttributeError, match="ImagePositionPatient: has 2 values"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_colour_images_are_invalid() -> None:
    ds = _dataset()
    ds.SamplesPerPixel = 3
    with pytest.raises(InvalidAttributeError, match="SamplesPerPixel: is 3"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_a_transfer_syntax_without_decoder_is_unsupported() -> None:
    decoder = pydicom.pixels.get_decoder(JPEGLSLossless)
    if decoder.is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    ds = _dataset()
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not really jpeg-ls\xff\xd9"])
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"file 3 .*JPEG-LS"):
        read_ct_slice(ds_bytes(ds), source=SOURCE)


def test_a_compressed_ct_decodes_or_names_the_missing_decoder() -> None:
    # pydicom's JPEG 2000 CT: decoded where a plugin (Pillow, pylibjpeg, gdcm) is installed,
    # otherwise refused with a message that says which plugin would decode it.
    path = get_testdata_file("693_J2KI.dcm")
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if pydicom.pixels.get_decoder(syntax).is_available:
        assert read_ct_slice(path).hu.shape == (512, 512)
    else:
        with pytest.raises(UnsupportedTransferSyntaxError, match=r"JPEG 2000.*not installed"):
            read_ct_slice(path)


def test_errors_carry_no_patient_identifier() -> None:
    ds = _dataset()
    del ds.PixelData
    with pytest.raises(InputError) as info:
        read_ct_slice(ds_bytes(ds), source=SOURCE)
    text = str(info.value)
    for identifier in (str(ds.PatientName), ds.PatientID, ds.SOPInstanceUID, ds.StudyInstanceUID):
        assert identifier not in text


def ds_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
