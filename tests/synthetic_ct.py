"""Tiny synthetic chest-CT data sets in the NIfTI layout, for model and training tests.

Not the phantom generator (that writes DICOM at realistic size); just enough anatomy for a
network to learn something in a few steps: air, body, two lungs, and class-typical lesions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from ctjoint.contracts import CLASS_NAMES, SEG_CONSOLIDATION, SEG_GROUND_GLASS

# RAS+ voxel axes (nibabel's canonical form): the loader has to flip x and y to reach the
# DICOM patient axes (LPS), so tests see the reorientation happen.
RAS_AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def synthetic_case(label: str, rng: np.random.Generator, size: int = 48, slices: int = 12):
    """HU volume and lesion label map, both [Z, Y, X]."""
    z, y, x = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    hu = np.full((slices, size, size), -1000.0, dtype=np.float32)
    c = size / 2
    body = ((y - c) / (0.45 * size)) ** 2 + ((x - c) / (0.48 * size)) ** 2 < 1
    hu[body] = 40.0
    lungs = []
    for side in (-1, 1):
        lung = ((y - c) / (0.3 * size)) ** 2 + ((x - c - side * 0.22 * size) / (0.15 * size)) ** 2
        lungs.append(lung < 1)
        hu[lung < 1] = -850.0
    lesions = np.zeros_like(hu, dtype=np.uint8)
    if label != "normal":
        sides = (0, 1) if label == "covid19" else (int(rng.integers(2)),)
        for side in sides:
            cz = rng.uniform(3, slices - 3)
            cy = c + rng.uniform(-0.1, 0.1) * size
            cx = c + (-1 if side == 0 else 1) * 0.22 * size
            r = size * 0.08
            blob = ((z - cz) / 2.0) ** 2 + ((y - cy) ** 2 + (x - cx) ** 2) / r**2 < 1
            blob &= lungs[side]
            value = SEG_GROUND_GLASS if label == "covid19" else SEG_CONSOLIDATION
            lesions[blob] = value
            hu[blob] = -600.0 if label == "covid19" else 20.0
    hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    return hu, lesions


def to_ras_nifti(volume_zyx: np.ndarray, dtype: type) -> nib.Nifti1Image:
    """Store a [Z, Y, X] DICOM-axes array as a RAS+ NIfTI (x, y flipped)."""
    xyz = volume_zyx.transpose(2, 1, 0)[::-1, ::-1, :]
    return nib.Nifti1Image(np.ascontiguousarray(xyz).astype(dtype), RAS_AFFINE)


def write_nifti_set(
    root: Path,
    per_class: int = 4,
    seed: int = 0,
    size: int = 48,
    slices: int = 12,
    with_split: bool = True,
) -> Path:
    """DIR/images, DIR/masks, DIR/labels.csv; splits cycle train, train, val, test."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    splits = ("train", "train", "val", "test")
    for label in CLASS_NAMES:
        for i in range(per_class):
            case = f"{label}-{i:02d}"
            hu, lesions = synthetic_case(label, rng, size, slices)
            nib.save(to_ras_nifti(hu, np.int16), root / "images" / f"{case}.nii.gz")
            nib.save(to_ras_nifti(lesions, np.uint8), root / "masks" / f"{case}.nii.gz")
            rows.append((case, label, splits[i % len(splits)]))
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "label", "split"] if with_split else ["case", "label"])
        for case, label, split in rows:
            writer.writerow([case, label, split] if with_split else [case, label])
    return root


def write_dicom_series_set(
    root: Path, per_class: int = 4, seed: int = 0, size: int = 48, slices: int = 12
) -> Path:
    """The DICOM series layout: DIR/series/<case>/*.dcm, DIR/masks/<case>.nii.gz (RAS+, like
    a mask exported from a viewer), DIR/labels.csv; the same cases as `write_nifti_set`."""
    from dicom_factory import ct_dataset
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    (root / "masks").mkdir(parents=True)
    rows = []
    splits = ("train", "train", "val", "test")
    spacing = (RAS_AFFINE[2, 2], RAS_AFFINE[1, 1], RAS_AFFINE[0, 0])
    for label in CLASS_NAMES:
        for i in range(per_class):
            case = f"{label}-{i:02d}"
            hu, lesions = synthetic_case(label, rng, size, slices)
            folder = root / "series" / case
            folder.mkdir(parents=True)
            uids = generate_uid(), generate_uid(), generate_uid()
            for z in range(slices):
                ds = ct_dataset(
                    np.rint(hu[z]).astype(np.int16),
                    index=z + 1,
                    position=(0.0, 0.0, z * spacing[0]),
                    series_uid=uids[0],
                    study_uid=uids[1],
                    frame_uid=uids[2],
                    pixel_spacing=(spacing[1], spacing[2]),
                    thickness=spacing[0],
                )
                ds.save_as(folder / f"{generate_uid()}.dcm", enforce_file_format=True)
            nib.save(to_ras_nifti(lesions, np.uint8), root / "masks" / f"{case}.nii.gz")
            rows.append((case, label, splits[i % len(splits)]))
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "label", "split"])
        writer.writerows(rows)
    return root
