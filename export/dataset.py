"""Training and evaluation data: case discovery in two layouts, reading, and a cache of
preprocessed arrays so that epochs never re-read DICOM.

Layouts (the training and evaluation commands accept each, detected from the folder):

- DICOM / phantom layout: ``SET/labels.csv`` (case,label,split) and per case
  ``SET/<case>/series/*.dcm`` plus ``SET/<case>/truth/lesions.nii.gz`` (see contracts). The
  series is read by the gateway's own reader, so training sees exactly what serving sees.
- NIfTI layout (real data, e.g. COVID-19-CT-Seg, MosMedData): ``DIR/images/<case>.nii.gz``,
  ``DIR/masks/<case>.nii.gz`` and ``DIR/labels.csv`` with case,label[,split]. A missing split
  column (or an empty cell) is filled deterministically, 70/15/15 by a hash of the case name.
  Images are HU after the NIfTI scaling; both image and mask are reoriented to the DICOM
  patient axes (columns towards the patient's left, rows towards posterior, slices towards
  head), the grid a DICOM series of the same scan is served on. A mask may be binary (lesion
  = 1 is then trained as ground-glass) or use the SEG classes (1 ground-glass, 2
  consolidation).
- DICOM series layout (real data exported from a PACS): ``DIR/series/<case>/`` (one folder of
  DICOM files per case, any file names), ``DIR/masks/<case>.nii.gz`` and ``DIR/labels.csv``.
  The series is read by the gateway's reader; the mask follows its own affine and is
  reoriented onto the same DICOM patient axes, so it must cover the series' grid.

In every layout a normal case may come without a mask (lesion-free); a covid19 or cap case
without one is an error, not a lesion-free case: its lesions would be trained as background.

Labels are CLASS_NAMES (covid19, cap, normal), case-insensitive, with a few common spellings.
Preprocessing is `ctjoint.gateway.preprocess`, never a copy of it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from ctjoint.contracts import (
    CASE_SERIES_DIR,
    CASE_TRUTH_DIR,
    CLASS_NAMES,
    SEG_CLASS_NAMES,
    SET_LABELS_CSV,
    SPLITS,
    TRUTH_LESIONS,
)
from ctjoint.export.errors import DatasetError
from ctjoint.gateway.preprocess import (
    PreprocessPlan,
    context_stack,
    preprocess_volume,
    resample_labels,
    resize_inplane,
)
from ctjoint.gateway.resample import resample_matrix
from ctjoint.gateway.series import CtVolume, load_series_dir

logger = logging.getLogger(__name__)

Layout = Literal["dicom", "nifti", "dicom-series"]
NIFTI_IMAGES_DIR = "images"
NIFTI_MASKS_DIR = "masks"
SERIES_DIR = "series"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# DICOM patient axes of the served grid, as nibabel axis codes of the (x, y, z) array.
DICOM_AXCODES = ("L", "P", "S")
SPLIT_FRACTIONS = (0.70, 0.15)  # train, val; the rest is test
CACHE_FORMAT = 2  # 2: lesion fractions stored beside the labels

LABEL_ALIASES = {
    "covid19": "covid19",
    "covid-19": "covid19",
    "covid_19": "covid19",
    "covid": "covid19",
    "cap": "cap",
    "pneumonia": "cap",
    "normal": "normal",
    "non-pneumonia": "normal",
    "healthy": "normal",
}


@dataclass(frozen=True)
class CaseRef:
    """Where one case lives and what it is. `label` indexes CLASS_NAMES."""

    case_id: str
    label: int
    split: str
    layout: Layout
    image: Path  # series folder (dicom) or NIfTI image file
    mask: Path | None  # lesion label map (NIfTI); None: no lesions

    @property
    def label_name(self) -> str:
        return CLASS_NAMES[self.label]


@dataclass(frozen=True)
class LoadedCase:
    """A case on its source grid: the CT volume and its lesion label map [Z, Y, X]."""

    ref: CaseRef
    volume: CtVolume
    lesions: np.ndarray


@dataclass(frozen=True)
class PreparedCase:
    """A case on the model grid, as training consumes it.

    `image` [Z, H, W] (2.5D: one plane per source slice; 3D: the resampled depth) is the
    normalised intensity in float16 (half the memory, far below the network's noise floor);
    `labels` is the lesion label map on the same grid; `fractions` [lesion classes, Z, H, W]
    uint8 the share of each model cell every lesion class covers, in 255ths (`lesion_fractions`:
    the soft targets of TrainConfig.soft_targets), or None where not prepared.
    """

    case_id: str
    label: int
    image: np.ndarray
    labels: np.ndarray
    fractions: np.ndarray | None = None

    def lesion_planes(self) -> np.ndarray:
        """Indices of planes (slices) holding at least one lesion pixel."""
        return np.flatnonzero(self.labels.reshape(len(self.labels), -1).any(axis=1))


def parse_label(value: str, *, source: str) -> int:
    """A class name (or common spelling of one) -> index in CLASS_NAMES."""
    name = LABEL_ALIASES.get(value.strip().lower())
    if name is None:
        raise DatasetError(f"{source}: unknown label {value!r}; expected one of {CLASS_NAMES}")
    return CLASS_NAMES.index(name)


def hash_split(case_id: str) -> str:
    """Deterministic 70/15/15 train/val/test split from a hash of the case name."""
    digest = hashlib.sha256(case_id.encode("utf-8")).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2.0**64
    if fraction < SPLIT_FRACTIONS[0]:
        return "train"
    if fraction < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]:
        return "val"
    return "test"


def detect_layout(data_dir: Path) -> Layout:
    """Which layout a data set folder uses."""
    if not (data_dir / SET_LABELS_CSV).is_file():
        raise DatasetError(f"{data_dir}: no {SET_LABELS_CSV} (case,label[,split])")
    if (data_dir / NIFTI_IMAGES_DIR).is_dir():
        return "nifti"
    if (data_dir / SERIES_DIR).is_dir() and (data_dir / NIFTI_MASKS_DIR).is_dir():
        return "dicom-series"
    return "dicom"


def read_label_table(path: Path) -> list[tuple[str, int, str]]:
    """Rows (case, label index, split) of a labels CSV; split filled by hash when absent."""
    rows: list[tuple[str, int, str]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = {name.strip().lower() for name in reader.fieldnames or ()}
        if not {"case", "label"} <= fields:
            raise DatasetError(f"{path}: needs columns case,label[,split], found {sorted(fields)}")
        for line, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            case = row["case"]
            if not case:
                raise DatasetError(f"{path}:{line}: empty case name")
            label = parse_label(row["label"], source=f"{path}:{line}")
            split = row.get("split", "").lower() or hash_split(case)
            if split not in SPLITS:
                raise DatasetError(f"{path}:{line}: unknown split {split!r}; expected {SPLITS}")
            rows.append((case, label, split))
    if not rows:
        raise DatasetError(f"{path}: no cases listed")
    return rows


def _nifti_file(folder: Path, case: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{case}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def discover_cases(data_dir: Path | str, split: str | None = None) -> list[CaseRef]:
    """Every case listed in a data set folder (optionally one split), checked to exist."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    layout = detect_layout(root)
    cases: list[CaseRef] = []
    for case, label, case_split in read_label_table(root / SET_LABELS_CSV):
        if split is not None and case_split != split:
            continue
        if layout == "nifti":
            image = _nifti_file(root / NIFTI_IMAGES_DIR, case)
            if image is None:
                raise DatasetError(f"{root / NIFTI_IMAGES_DIR}: no image {case}.nii[.gz]")
            mask = _nifti_file(root / NIFTI_MASKS_DIR, case)
        elif layout == "dicom-series":
            image = root / SERIES_DIR / case
            if not image.is_dir():
                raise DatasetError(f"{image}: series folder missing")
            mask = _nifti_file(root / NIFTI_MASKS_DIR, case)
        else:
            image = root / case / CASE_SERIES_DIR
            if not image.is_dir():
                raise DatasetError(f"{image}: series folder missing")
            truth = root / case / CASE_TRUTH_DIR / TRUTH_LESIONS
            mask = truth if truth.is_file() else None
        if mask is None and CLASS_NAMES[label] != "normal":
            raise DatasetError(
                f"{root}: case {case} is labelled {CLASS_NAMES[label]} but has no lesion mask; "
                "an abnormal case without a mask would be trained as lesion-free"
            )
        cases.append(CaseRef(case, label, case_split, layout, image, mask))
    return cases


def _reorient_to_dicom(image: nib.Nifti1Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI image's data and zooms on the DICOM patient axes, array order (x, y, z)."""
    current = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(DICOM_AXCODES)
    transform = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(np.asanyarray(image.dataobj), transform)
    zooms = image.header.get_zooms()[:3]
    # transform[i, 0] is where source axis i goes; zooms follow the same permutation.
    reordered = [0.0, 0.0, 0.0]
    for source_axis, (target_axis, _) in enumerate(transform):
        reordered[int(target_axis)] = float(zooms[source_axis])
    return data, (reordered[0], reordered[1], reordered[2])


def read_nifti_volume(path: Path) -> CtVolume:
    """A NIfTI CT image as a CtVolume on the DICOM patient axes.

    nibabel's data proxy applies the header's scl_slope / scl_inter, which is how NIfTI CT
    stores HU.
    """
    try:
        image = nib.load(str(path))
        data, zooms = _reorient_to_dicom(image)  # type: ignore[arg-type]
        hu = np.asarray(data, dtype=np.float32)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{path}: cannot read NIfTI image: {err}") from err
    if hu.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D image, got shape {hu.shape}")
    return CtVolume.from_nifti_array(hu, zooms)


def read_nifti_labels(path: Path, *, reorient: bool) -> np.ndarray:
    """A lesion label map NIfTI -> uint8 [Z, Y, X], reoriented like the images if asked.

    Phantom / DICOM-layout truth is stored as volume_zyx.transpose(2, 1, 0) (contracts), so it
    is only transposed; NIfTI-layout masks follow their own affine, like their images.
    """
    try:
        image = nib.load(str(path))
        if reorient:
            data, _ = _reorient_to_dicom(image)  # type: ignore[arg-type]
        else:
            data = np.asanyarray(image.dataobj)  # type: ignore[attr-defined]
        labels = np.rint(np.asarray(data, dtype=np.float32))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{path}: cannot read NIfTI mask: {err}") from err
    if labels.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D mask, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(SEG_CLASS_NAMES):
        raise DatasetError(
            f"{path}: mask values must lie in 0..{len(SEG_CLASS_NAMES) - 1} "
            f"({', '.join(SEG_CLASS_NAMES)}), found {labels.min():g}..{labels.max():g}"
        )
    return np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0))


def load_volume(ref: CaseRef) -> CtVolume:
    """The CT volume of a case on its source grid (DICOM through the gateway's reader)."""
    if ref.layout in ("dicom", "dicom-series"):
        return load_series_dir(ref.image)
    return read_nifti_volume(ref.image)


def load_case(ref: CaseRef) -> LoadedCase:
    """Volume and lesion labels of a case, checked to share one grid."""
    volume = load_volume(ref)
    if ref.mask is None:
        lesions = np.zeros(volume.shape, dtype=np.uint8)
    else:
        lesions = read_nifti_labels(ref.mask, reorient=ref.layout != "dicom")
    if lesions.shape != volume.shape:
        raise DatasetError(
            f"case {ref.case_id}: mask grid {lesions.shape} differs from image grid "
            f"{volume.shape} (slices, rows, columns)"
        )
    return LoadedCase(ref, volume, lesions)


def lesion_fractions(lesions: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [lesion classes, *shape]: the share of each model cell that every lesion class
    covers, in 255ths, by the area average the image itself gets (per axis).

    Nearest-neighbour labels lose where in a cell a lesion boundary lies; the gateway's
    linear upsampling of logits could restore it, so a network that learned them perfectly
    still tops out near 0.95 lesion Dice on a 2x finer source grid (bench/target_ceiling.py).
    """
    rz = None
    if lesions.shape[0] != shape[0]:
        rz = resample_matrix(lesions.shape[0], shape[0], "area").astype(np.float32)
    out = np.empty((len(SEG_CLASS_NAMES) - 1, *shape), dtype=np.uint8)
    for k in range(1, len(SEG_CLASS_NAMES)):
        plane = resize_inplane((lesions == k).astype(np.float32), shape[1], shape[2], "area")
        if rz is not None:
            plane = np.tensordot(rz, plane, axes=(1, 0))
        out[k - 1] = np.clip(np.rint(plane * 255.0), 0, 255).astype(np.uint8)
    return out


def prepare_case(loaded: LoadedCase, plan: PreprocessPlan) -> PreparedCase:
    """Source grid -> model grid with the shared preprocessing; labels by nearest neighbour,
    lesion fractions by area."""
    image, geometry = preprocess_volume(loaded.volume.hu, plan)
    # 2.5D keeps the centre plane only; neighbours are re-stacked per sample (context_window).
    planes = plan.preprocessor().planes(image)
    labels = resample_labels(loaded.lesions, geometry.model_shape)
    return PreparedCase(
        case_id=loaded.ref.case_id,
        label=loaded.ref.label,
        image=planes.astype(np.float16),
        labels=np.ascontiguousarray(labels, dtype=np.uint8),
        fractions=lesion_fractions(loaded.lesions, geometry.model_shape),
    )


def context_window(planes: np.ndarray, index: int, context: int) -> np.ndarray:
    """The 2.5D stack [2*context+1, H, W] of one plane, exactly as preprocess_volume builds it.

    Runs the gateway's `context_stack` on a window around the plane: clipping the window at the
    volume's ends repeats the same edge planes as stacking the whole volume would.
    """
    lo = max(0, index - context)
    hi = min(len(planes), index + context + 1)
    return context_stack(planes[lo:hi], context)[index - lo]


def _fingerprint(path: Path | None) -> str:
    """Cheap identity of a source file or folder: names, sizes and modification times."""
    if path is None:
        return "none"
    if path.is_file():
        stat = path.stat()
        return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            stat = entry.stat()
            digest.update(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _prepare_into(cache: CaseCache, ref: CaseRef) -> None:
    """Pool worker (top level, so it pickles under spawn): prepare one case into the cache."""
    cache.get(ref)


def plan_key(plan: PreprocessPlan) -> str:
    """Short stable name of a preprocessing plan (cache sub-folder)."""
    return hashlib.sha256(plan.to_json().encode("utf-8")).hexdigest()[:12]


class CaseCache:
    """Preprocessed cases as .npz files under `root/<plan key>/`, rebuilt when a source
    changes (names, sizes and mtimes of the series files and the mask)."""

    def __init__(self, root: Path, plan: PreprocessPlan) -> None:
        self.plan = plan
        self.folder = Path(root) / f"{plan.model}-{plan_key(plan)}"

    def _path(self, ref: CaseRef) -> Path:
        # Case names repeat across data sets (case_0000...); the source path keeps them apart.
        source = hashlib.sha256(str(ref.image.resolve()).encode("utf-8")).hexdigest()[:10]
        return self.folder / f"{ref.case_id}-{source}.npz"

    def _source_id(self, ref: CaseRef) -> str:
        return f"{CACHE_FORMAT}|{_fingerprint(ref.image)}|{_fingerprint(ref.mask)}|{ref.label}"

    def get(self, ref: CaseRef) -> PreparedCase:
        """The prepared case, from the cache when it is current, else computed and stored."""
        path = self._path(ref)
        source_id = self._source_id(ref)
        if path.is_file():
            try:
                with np.load(path) as stored:
                    if str(stored["source_id"]) == source_id:
                        return PreparedCase(
                            ref.case_id,
                            ref.label,
                            stored["image"],
                            stored["labels"],
                            stored["fractions"],
                        )
            except (OSError, ValueError, KeyError):
                logger.warning("cache entry %s unreadable; rebuilding it", path.name)
        prepared = prepare_case(load_case(ref), self.plan)
        self.folder.mkdir(parents=True, exist_ok=True)
        fractions = prepared.fractions
        if fractions is None:  # prepare_case always makes them
            raise DatasetError(f"case {ref.case_id}: no lesion fractions were prepared")
        # A partial file of its own: runs that share a cache (CTJOINT_CACHE_DIR) may prepare
        # the same case at once, and one must not move the other's file away.
        with tempfile.NamedTemporaryFile(
            dir=self.folder, prefix=f"{path.stem}.", suffix=".tmp.npz", delete=False
        ) as handle:
            try:
                np.savez(
                    handle,
                    image=prepared.image,
                    labels=prepared.labels,
                    fractions=fractions,
                    source_id=np.array(source_id),
                )
            except BaseException:
                os.unlink(handle.name)  # its name is its own: nothing else would remove it
                raise
        os.replace(handle.name, path)  # atomic: a killed run never leaves a half-written entry
        return prepared

    def get_many(
        self,
        refs: Sequence[CaseRef],
        advance: Callable[[], None] | None = None,
        workers: int = 1,
    ) -> list[PreparedCase]:
        """Prepared cases in order; `advance` is called after each (progress bars).
        `workers` > 1 prepares the cases the cache lacks in that many processes (decoding
        and resampling a 512 x 512 scan takes seconds of one core)."""
        if workers < 1:
            raise DatasetError(f"workers must be at least 1, not {workers}")
        prepared_apart: set[int] = set()
        # One process: get() below reads or builds each entry, so nothing is checked twice.
        missing = [i for i, r in enumerate(refs) if not self.is_current(r)] if workers > 1 else []
        if len(missing) > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a threaded torch
            with ProcessPoolExecutor(min(workers, len(missing)), mp_context=context) as pool:
                jobs = [pool.submit(_prepare_into, self, refs[i]) for i in missing]
                try:
                    for future in as_completed(jobs):
                        future.result()  # a case that cannot be prepared fails the call here
                        if advance is not None:
                            advance()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            prepared_apart = set(missing)
        out = []
        for i, ref in enumerate(refs):
            out.append(self.get(ref))
            if advance is not None and i not in prepared_apart:
                advance()
        return out

    def is_current(self, ref: CaseRef) -> bool:
        """Whether the cache holds this case for its present source files."""
        path = self._path(ref)
        if not path.is_file():
            return False
        try:
            with np.load(path) as stored:
                return bool(str(stored["source_id"]) == self._source_id(ref))
        except (OSError, ValueError, KeyError):
            return False
