"""Small synthetic CT series written with pydicom, for tests that need DICOM files quickly.

A crude chest: air, an elliptic body (40 HU), two lungs (-850 HU) and optional lesion blocks
at known places (ground-glass -600 HU; "consolidation" -250 HU, lower than real consolidation
so the band-rule test models can tell it from soft tissue), so tests can check both the
geometry that comes back and the lesion volumes an analysis finds. The phantom generator in
export/ makes the realistic series; this one is minimal and fast on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

INTERCEPT = -1024.0
GROUND_GLASS_HU = -600.0
CONSOLIDATION_HU = -250.0  # inside the test models' consolidation band


@dataclass(frozen=True)
class Lesion:
    """A box lesion: slices [z0, z1), rows [y0, y1), columns [x0, x1) and its HU value."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int
    hu: float


# Lesions of the small default series (8 slices of 32x32): 3 slices of 6x6 ground-glass and
# 1 slice of 4x4 consolidation.
SMALL_SERIES_LESIONS = (
    Lesion(2, 5, 10, 16, 8, 14, GROUND_GLASS_HU),
    Lesion(3, 4, 10, 14, 20, 24, CONSOLIDATION_HU),
)
SMALL_SERIES_GROUND_GLASS_VOXELS = 3 * 6 * 6
SMALL_SERIES_CONSOLIDATION_VOXELS = 4 * 4


def chest_volume(slices: int, size: int, lesions: Sequence[Lesion] = ()) -> np.ndarray:
    """A HU volume [slices, size, size] float32 with body, lungs and the given lesions."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1.0
    right = ((xx - 0.3) / 0.14) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1.0
    left = ((xx - 0.7) / 0.14) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1.0
    plane = np.full((size, size), -1000.0, dtype=np.float32)
    plane[body] = 40.0
    plane[right | left] = -850.0
    volume = np.repeat(plane[None], slices, axis=0)
    for lesion in lesions:
        volume[lesion.z0 : lesion.z1, lesion.y0 : lesion.y1, lesion.x0 : lesion.x1] = lesion.hu
    return volume


def ct_dataset(
    hu: np.ndarray,
    *,
    index: int,
    position: Sequence[float],
    series_uid: str,
    study_uid: str,
    frame_uid: str,
    pixel_spacing: Sequence[float] = (0.7, 0.7),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    thickness: float = 2.5,
) -> Dataset:
    """One CT Image Storage dataset (signed 16-bit, intercept -1024) holding `hu`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "TEST0001"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.InstanceNumber = index
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.SliceThickness = f"{thickness:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = np.round(hu - INTERCEPT).astype("<i2")
    ds.PixelData = stored.tobytes()
    return ds


def write_ct_series(
    folder: Path,
    *,
    slices: int = 8,
    size: int = 32,
    spacing_z: float = 2.5,
    pixel_spacing: Sequence[float] = (0.7, 0.7),
    lesions: Sequence[Lesion] = (),
    reverse_names: bool = False,
) -> list[Path]:
    """Write a series as IM0001.dcm... (slice 1 at the lowest z unless `reverse_names`)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = chest_volume(slices, size, lesions)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for z in range(slices):
        number = slices - z if reverse_names else z + 1
        ds = ct_dataset(
            volume[z],
            index=number,
            position=(
                -0.5 * size * pixel_spacing[1],
                -0.5 * size * pixel_spacing[0],
                z * spacing_z,
            ),
            series_uid=series_uid,
            study_uid=study_uid,
            frame_uid=frame_uid,
            pixel_spacing=pixel_spacing,
            thickness=spacing_z,
        )
        path = folder / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
