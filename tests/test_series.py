"""Series assembly: slices sorted along the normal, consistency and spacing checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import SMALL_SERIES_LESIONS, chest_volume, write_ct_series
from pydicom.uid import generate_uid

from ctjoint.gateway.dicom_io import describe_source, read_ct_slice
from ctjoint.gateway.errors import (
    DuplicateSliceError,
    EmptySeriesError,
    InconsistentGeometryError,
    LimitExceededError,
    MixedSeriesError,
)
from ctjoint.gateway.series import (
    CtVolume,
    SeriesAssembler,
    list_series_files,
    load_series_dir,
    permute_in_place,
)


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def test_files_are_sorted_along_the_slice_normal(ct_series_dir: Path) -> None:
    volume = load_series_dir(ct_series_dir)
    assert volume.shape == (8, 32, 32)
    # Files are named in reverse slice order: the lowest position is the last name.
    assert volume.source_names[0] == "file 8 (IM0008.dcm)"
    assert volume.origin[2] == pytest.approx(0.0)
    expected = chest_volume(8, 32, SMALL_SERIES_LESIONS)
    np.testing.assert_array_equal(volume.hu, expected)


def test_geometry_and_identity_come_back(ct_series_dir: Path) -> None:
    volume = load_series_dir(ct_series_dir)
    first = pydicom.dcmread(ct_series_dir / "IM0008.dcm")
    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert volume.voxel_volume_ml == pytest.approx(2.5 * 0.7 * 0.7 / 1000)
    assert volume.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert volume.sop_instance_uids[0] == first.SOPInstanceUID
    assert volume.series_uid == first.SeriesInstanceUID
    assert volume.slice_thickness_mm == pytest.approx(2.5)
    assert not volume.hu.flags.writeable


def test_streamed_bytes_assemble_like_the_folder(ct_series_dir: Path) -> None:
    # No expected count: the buffer has to grow as slices arrive.
    assembler = SeriesAssembler()
    for index, path in enumerate(sorted(ct_series_dir.iterdir()), start=1):
        assembler.add(read_ct_slice(path.read_bytes(), source=describe_source(index)))
    streamed = assembler.finish()
    np.testing.assert_array_equal(streamed.hu, load_series_dir(ct_series_dir).hu)


@pytest.mark.parametrize("direct", [True, False], ids=["into-the-volume", "copied"])
@pytest.mark.parametrize(
    "expected", [8, 6, 12, None], ids=["exact", "too-few", "too-many", "unknown"]
)
@pytest.mark.parametrize("order", ["head-to-foot", "foot-to-head", "shuffled"])
def test_any_arrival_order_and_count_give_the_same_volume(
    ct_series_dir: Path, order: str, expected: int | None, direct: bool
) -> None:
    # IM0008 is the lowest slice, IM0001 the highest.
    paths = sorted(ct_series_dir.iterdir())
    if order == "foot-to-head":
        paths.reverse()
    elif order == "shuffled":
        paths = [paths[i] for i in (3, 0, 7, 5, 1, 6, 2, 4)]
    assembler = SeriesAssembler(expected_slices=expected)
    for index, path in enumerate(paths, start=1):
        hu_out = assembler.next_slot if direct else None
        ct_slice = read_ct_slice(path.read_bytes(), source=describe_source(index), hu_out=hu_out)
        assembler.add(ct_slice)
    volume = assembler.finish()
    np.testing.assert_array_equal(volume.hu, chest_volume(8, 32, SMALL_SERIES_LESIONS))
    arrived = [paths[slot].name for slot in assembler.sorted_slots]
    assert arrived == [f"IM000{n}.dcm" for n in range(8, 0, -1)]


def test_a_second_series_in_the_folder_is_named(ct_series_dir: Path, tmp_path: Path) -> None:
    other = write_ct_series(tmp_path / "other", slices=2, size=32)
    (ct_series_dir / "ZZ0001.dcm").write_bytes(other[0].read_bytes())
    _edit(
        ct_series_dir / "ZZ0001.dcm",
        StudyInstanceUID=pydicom.dcmread(ct_series_dir / "IM0001.dcm").StudyInstanceUID,
    )
    with pytest.raises(
        MixedSeriesError, match=r"file 9 \(ZZ0001\.dcm\): SeriesInstanceUID: belongs to another"
    ):
        load_series_dir(ct_series_dir)


def test_another_study_is_named(ct_series_dir: Path) -> None:
    _edit(ct_series_dir / "IM0004.dcm", StudyInstanceUID=generate_uid())
    with pytest.raises(MixedSeriesError, match=r"IM0004\.dcm\): StudyInstanceUID"):
        load_series_dir(ct_series_dir)


def test_inconsistent_orientation_is_named(ct_series_dir: Path) -> None:
    _edit(ct_series_dir / "IM0005.dcm", ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    with pytest.raises(
        InconsistentGeometryError, match=r"file 5 \(IM0005\.dcm\): ImageOrientationPatient"
    ):
        load_series_dir(ct_series_dir)


def test_inconsistent_pixel_spacing_is_named(ct_series_dir: Path) -> None:
    _edit(ct_series_dir / "IM0002.dcm", PixelSpacing=[0.8, 0.8])
    with pytest.raises(InconsistentGeometryError, match=r"IM0002\.dcm\): PixelSpacing"):
        load_series_dir(ct_series_dir)


def test_a_different_matrix_size_is_named(ct_series_dir: Path, tmp_path: Path) -> None:
    small = write_ct_series(tmp_path / "small", slices=1, size=16)[0]
    _edit(
        small,
        SeriesInstanceUID=pydicom.dcmread(ct_series_dir / "IM0001.dcm").SeriesInstanceUID,
        StudyInstanceUID=pydicom.dcmread(ct_series_dir / "IM0001.dcm").StudyInstanceUID,
        FrameOfReferenceUID=pydicom.dcmread(ct_series_dir / "IM0001.dcm").FrameOfReferenceUID,
    )
    (ct_series_dir / "IM0009.dcm").write_bytes(small.read_bytes())
    with pytest.raises(InconsistentGeometryError, match=r"IM0009\.dcm\): Rows/Columns: is 16x16"):
        load_series_dir(ct_series_dir)


def test_a_missing_slice_is_reported_with_its_neighbours(ct_series_dir: Path) -> None:
    (ct_series_dir / "IM0004.dcm").unlink()  # slice at z = 4 * 2.5 mm
    with pytest.raises(
        InconsistentGeometryError,
        match=r"5 mm between file 4 \(IM0005\.dcm\) and file 3 \(IM0003\.dcm\).*missing",
    ):
        load_series_dir(ct_series_dir)


def test_a_duplicate_position_is_refused(ct_series_dir: Path) -> None:
    position = pydicom.dcmread(ct_series_dir / "IM0003.dcm").ImagePositionPatient
    _edit(ct_series_dir / "IM0004.dcm", ImagePositionPatient=position)
    with pytest.raises(DuplicateSliceError, match="same position along the slice normal"):
        load_series_dir(ct_series_dir)


def test_the_same_file_twice_is_refused(ct_series_dir: Path) -> None:
    (ct_series_dir / "copy.dcm").write_bytes((ct_series_dir / "IM0002.dcm").read_bytes())
    with pytest.raises(DuplicateSliceError, match=r"copy\.dcm\): SOPInstanceUID: is the same"):
        load_series_dir(ct_series_dir)


def test_an_empty_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(EmptySeriesError, match=f"{tmp_path}: no DICOM file in this folder$"):
        load_series_dir(tmp_path)


def test_an_empty_folder_with_subfolders_says_so(tmp_path: Path) -> None:
    (tmp_path / "series").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"hidden files do not count")
    with pytest.raises(EmptySeriesError, match="1 subfolder"):
        list_series_files(tmp_path)


def test_hidden_files_and_subfolders_are_ignored(ct_series_dir: Path) -> None:
    (ct_series_dir / ".hidden").write_text("not dicom")
    (ct_series_dir / "sub").mkdir()
    (ct_series_dir / "sub" / "x.txt").write_text("not dicom")
    assert len(list_series_files(ct_series_dir)) == 8


def test_the_slice_limit_is_enforced(ct_series_dir: Path) -> None:
    with pytest.raises(LimitExceededError, match="more than 5 slices"):
        load_series_dir(ct_series_dir, max_slices=5)


def test_finish_without_slices_is_an_empty_series() -> None:
    with pytest.raises(EmptySeriesError):
        SeriesAssembler().finish()


def test_in_place_permutation_matches_fancy_indexing() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(17, 3, 2)).astype(np.float32)
    slots = list(rng.permutation(17))
    expected = volume[slots]
    permute_in_place(volume, slots)
    np.testing.assert_array_equal(volume, expected)


def test_in_place_permutation_of_row_extents_matches_fancy_indexing() -> None:
    # Each slice zero outside its rows (None: zero everywhere), as a lung map by slot is.
    rng = np.random.default_rng(1)
    count, height = 23, 9
    volume = np.zeros((count, height, 4), dtype=np.uint8)
    rows: list[slice | None] = []
    for index in range(count):
        if index % 5 == 0:
            rows.append(None)
            continue
        first = int(rng.integers(0, height - 1))
        extent = slice(first, int(rng.integers(first + 1, height + 1)))
        volume[index, extent] = rng.integers(1, 4, size=(extent.stop - extent.start, 4))
        rows.append(extent)
    for seed in range(4):
        slots = list(np.random.default_rng(seed).permutation(count))
        moved = volume.copy()
        permute_in_place(moved, slots, rows)
        np.testing.assert_array_equal(moved, volume[slots])


def test_nifti_arrays_are_reordered_to_z_y_x() -> None:
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (x, y, z)
    volume = CtVolume.from_nifti_array(data, (0.5, 0.6, 2.0))
    assert volume.shape == (4, 3, 2)
    assert volume.spacing_mm == (2.0, 0.6, 0.5)
    assert volume.hu[3, 2, 1] == data[1, 2, 3]
    assert volume.series_uid == "" and volume.sop_instance_uids == ()


def test_a_phantom_series_lines_up_with_its_truth(tmp_path: Path) -> None:
    from ctjoint.contracts import CASE_SERIES_DIR, SEG_GROUND_GLASS
    from ctjoint.export.phantom import read_truth, write_phantom_case

    case = write_phantom_case(tmp_path / "case", kind="covid19", seed=3, slices=12, size=64)
    volume = load_series_dir(tmp_path / "case" / CASE_SERIES_DIR)
    lesions, lungs, _ = read_truth(tmp_path / "case")
    assert volume.shape == lesions.shape == (12, 64, 64)
    assert volume.spacing_mm == pytest.approx(case.spacing_mm, rel=1e-3)
    # Slice order and in-plane axes agree with the truth maps: lung and ground-glass HU sit
    # where the truth says they are.
    assert float(np.median(volume.hu[(lungs > 0) & (lesions == 0)])) < -700
    assert -800 < float(np.median(volume.hu[lesions == SEG_GROUND_GLASS])) < -300
