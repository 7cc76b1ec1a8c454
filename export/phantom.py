"""Synthetic chest-CT phantoms: a real multi-file DICOM CT series plus NIfTI ground truth.

`write_phantom_case` writes one case (`ctjoint phantom`), `write_phantom_set` a labelled
train/val/test set (`ctjoint phantom-set`), and `read_truth` reads a case's truth back.

Geometry. The anatomy is described in millimetres (see `phantom_anatomy`), so `size` only
changes the resolution: at size 512 the in-plane spacing is drawn from 0.6-0.9 mm (at least
enough for the body to fit); at other sizes it is scaled by 512/size, so the field of view and
the anatomy stay the same. The scan covers 250-320 mm along z with 60-120 slices by default
(slice spacing = thickness = coverage / slices, clipped to 1-5 mm, rounded to 0.05 mm); with
`slices` given, the same rule sets the thickness and the slab is centred on the mid lungs.

Files. CASE/series/IM00001.dcm... are written in acquisition order, head first (cranio-caudal,
as scanners write a chest): IM00001 / InstanceNumber 1 is the MOST SUPERIOR slice. Readers
must sort by ImagePositionPatient along the slice normal, never by file name. Truth volumes use
the opposite, ascending order: NIfTI data axes are (x=column, y=row, z=k) with k the position
in the series sorted ascending along the normal (k=0 is the most inferior slice), i.e.
`volume_zyx.transpose(2, 1, 0)`, and the affine is the DICOM geometry converted from LPS to RAS.

Findings (DeepSC-COVID): covid19 = 3-8 bilateral, peripheral (subpleural) ground-glass lesions
(-680..-480 HU), some with a consolidation core; cap = 1-2 central consolidations (-40..+45 HU)
near the hilum, in one lung (about 15% bilateral), with air bronchograms and sometimes a thin
ground-glass halo; normal = none. Air bronchograms stay in the consolidation class of the
truth (the consolidated region as an annotator outlines it). Every mask is exactly where the
lesion intensity was applied, before the light in-plane blur and noise.

Determinism. Everything follows from the seed through separate random streams (scan, anatomy,
vessel trees, lesions, noise, identity): the same seed gives byte-identical files, the same seed
with another kind gives the same body with other findings. UIDs are hashed from the seed;
dates are drawn from the seed, never from the clock.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import math
import multiprocessing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctjoint.contracts import (
    CASE_SERIES_DIR,
    CASE_TRUTH_DIR,
    CLASS_NAMES,
    CLASS_NORMAL,
    LESION_CLASS_NAMES,
    LUNG_LEFT,
    LUNG_RIGHT,
    SEG_CONSOLIDATION,
    SEG_GROUND_GLASS,
    SET_LABELS_CSV,
    SPLITS,
    TRUTH_LABEL,
    TRUTH_LESIONS,
    TRUTH_LUNGS,
)
from ctjoint.export.errors import PhantomError
from ctjoint.export.phantom_anatomy import COARSE_STEP_MM, Grid, Point
from ctjoint.export.phantom_families import FAMILIES, TRAINING_FAMILY, Body, Planted, make_body
from ctjoint.export.phantom_scanner import (
    SLICE_MM_RANGE,
    Scanner,
    fine_positions,
    recon_circle,
    reconstruct,
    slab_average,
    table_plane,
)
from ctjoint.gateway.preprocess import LUNG_WINDOW_CENTER, LUNG_WINDOW_WIDTH

# Part of every UID hash: a new generator version must not reuse the UIDs of old images.
GENERATOR_VERSION: Final = "2"
MANUFACTURER: Final = "ctjoint phantom"
SYNTHETIC_COMMENT: Final = "synthetic phantom (ctjoint); not a real patient"
HU_MIN, HU_MAX = -1024.0, 3071.0
MIN_SIZE: Final = 32
MAX_SIZE: Final = 2048
MAX_SLICES: Final = 2000
REFERENCE_SIZE: Final = 512
COVERAGE_MM_RANGE: Final = (250.0, 320.0)
SPLIT_FRACTIONS: Final = (0.70, 0.15, 0.15)

_FIRST_NAMES_F: Final = (
    "JANE", "MARY", "ANNA", "LAURA", "SARAH", "EMMA", "JULIA", "CLARA", "SOFIA", "HELEN",
    "MARTA", "NORA", "ELENA", "GRACE", "LUCY", "ALICE", "IRENE", "ROSA", "PAULA", "EVA",
)  # fmt: skip
_FIRST_NAMES_M: Final = (
    "JOHN", "PETER", "DAVID", "MARK", "PAUL", "JAMES", "THOMAS", "LUCAS", "DANIEL", "OSCAR",
    "HENRY", "SIMON", "VICTOR", "MARTIN", "HUGO", "ADAM", "LEON", "FELIX", "ANDREW", "KARL",
)  # fmt: skip
_LAST_NAMES: Final = (
    "DOE", "SMITH", "MILLER", "BROWN", "WILSON", "MOORE", "TAYLOR", "CLARK", "LEWIS", "WALKER",
    "HALL", "YOUNG", "KING", "WRIGHT", "HILL", "GREEN", "ADAMS", "BAKER", "NELSON", "CARTER",
    "MITCHELL", "ROBERTS", "TURNER", "PHILLIPS", "CAMPBELL", "PARKER", "EVANS", "EDWARDS",
    "COLLINS", "STEWART", "MORRIS", "ROGERS", "REED", "COOK", "MORGAN", "BELL",
)  # fmt: skip


@dataclass(frozen=True)
class ScanGeometry:
    """Where the voxels are: patient LPS millimetres, slices ascending along +z (k=0 lowest)."""

    size: int
    n_slices: int
    pixel_mm: float
    slice_mm: float  # spacing between slice centres
    thickness_mm: float
    origin: Point  # patient (x, y, z) of the centre of voxel (k=0, row 0, column 0)
    body_centre: Point  # patient position of the anatomy's (u, v, z) = (0, 0, 0)

    def slice_z(self, k: int) -> float:
        """Patient z of slice k, rounded the way it is written to DICOM."""
        return round(self.origin[2] + k * self.slice_mm, 4)

    def affine_lps(self) -> npt.NDArray[np.float64]:
        """Voxel (column, row, k) -> patient LPS mm."""
        affine = np.eye(4)
        affine[0, 0] = self.pixel_mm
        affine[1, 1] = self.pixel_mm
        affine[2, 2] = self.slice_mm
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> npt.NDArray[np.float64]:
        """Voxel (column, row, k) -> RAS mm, the NIfTI convention."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()

    def grid(self) -> Grid:
        """The voxel centres in the anatomy's body-centred coordinates."""
        idx = np.arange(self.size, dtype=np.float64)
        ks = np.arange(self.n_slices)
        zs = np.array([self.slice_z(int(k)) for k in ks])
        return Grid(
            u=(self.origin[0] + idx * self.pixel_mm - self.body_centre[0]).astype(np.float32),
            v=(self.origin[1] + idx * self.pixel_mm - self.body_centre[1]).astype(np.float32),
            z=(zs - self.body_centre[2]).astype(np.float32),
            pixel_mm=self.pixel_mm,
            slice_mm=self.slice_mm,
        )

    def fine_grid(self) -> Grid:
        """The sub-slice grid a thick slice averages over (see phantom_scanner.slab_average)."""
        out = self.grid()
        zs = np.array([self.slice_z(k) for k in range(self.n_slices)]) - self.body_centre[2]
        first, step, count = fine_positions(zs, self.thickness_mm)
        return Grid(
            u=out.u,
            v=out.v,
            z=(first + step * np.arange(count)).astype(np.float32),
            pixel_mm=self.pixel_mm,
            slice_mm=step,
        )

    def to_patient(self, point: Point) -> Point:
        """Body-centred (u, v, z) -> patient LPS (x, y, z)."""
        return (
            point[0] + self.body_centre[0],
            point[1] + self.body_centre[1],
            point[2] + self.body_centre[2],
        )

    @property
    def voxel_ml(self) -> float:
        return self.pixel_mm * self.pixel_mm * self.slice_mm / 1000.0


@dataclass(frozen=True)
class PhantomIdentity:
    """Synthetic patient and study attributes (look real, belong to nobody)."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    study_date: str
    study_time: str
    accession: str


@dataclass(frozen=True)
class FollowUp:
    """A later study of the same synthetic patient (export/phantom_followup.py writes them).

    Same anatomy and the same planned lesions, each scaled about its centre by the linear
    `lesion_scale` (0: gone); new noise, slices shifted by a fraction of the spacing, the study
    `days` after the first one, new study and series UIDs.
    """

    number: int  # 1 for the first follow-up of a case
    lesion_scale: float
    days: int

    def __post_init__(self) -> None:
        if self.number < 1 or self.days < 1 or self.lesion_scale < 0:
            raise PhantomError(
                f"a follow-up needs number >= 1, days >= 1 and a lesion scale >= 0, got {self}"
            )


@dataclass(frozen=True)
class PhantomVolume:
    """One rendered phantom in memory: HU image, truth maps and what was planted."""

    kind: str
    seed: int
    geometry: ScanGeometry
    hu: npt.NDArray[np.int16]  # [Z, Y, X] HU, slices ascending in z
    lesions: npt.NDArray[np.uint8]  # [Z, Y, X] SEG_CLASS_NAMES values
    lungs: npt.NDArray[np.uint8]  # [Z, Y, X] 0 / LUNG_RIGHT / LUNG_LEFT
    planted: tuple[Planted, ...]
    identity: PhantomIdentity
    scanner: Scanner
    family: str = TRAINING_FAMILY
    # Pixels outside the reconstruction circle (written as the padding value), [Y, X].
    outside: npt.NDArray[np.bool_] | None = None
    follow_up: FollowUp | None = None

    @property
    def noise_hu(self) -> float:
        return self.scanner.noise_hu

    def lesion_volume_ml(self) -> dict[str, float]:
        vox = self.geometry.voxel_ml
        return {
            name: round(float(np.count_nonzero(self.lesions == value)) * vox, 3)
            for name, value in zip(
                LESION_CLASS_NAMES, (SEG_GROUND_GLASS, SEG_CONSOLIDATION), strict=True
            )
        }

    def lesion_sides(self) -> set[int]:
        """Lungs that actually contain lesion voxels."""
        sides = np.unique(self.lungs[self.lesions > 0])
        return {int(s) for s in sides if s in (LUNG_RIGHT, LUNG_LEFT)}


@dataclass(frozen=True)
class PhantomCase:
    """What `write_phantom_case` wrote (no patient identifiers)."""

    out_dir: Path
    kind: str
    seed: int
    n_slices: int
    size: int
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    lesion_volume_ml: Mapping[str, float] = field(default_factory=dict)
    n_lesions: int = 0
    bilateral: bool = False
    lung_volume_ml: float = 0.0

    @property
    def label(self) -> str:
        return self.kind

    def summary(self) -> str:
        """A readable multi-line report of the case."""
        dz, dy, dx = self.spacing_mm
        volumes = ", ".join(
            f"{k.replace('_', '-')} {v:.1f} mL" for k, v in self.lesion_volume_ml.items()
        )
        if self.n_lesions == 0:
            findings = "none"
        else:
            extent = "bilateral" if self.bilateral else "unilateral"
            findings = f"{self.n_lesions} lesion(s), {extent}; {volumes}"
        return "\n".join(
            [
                f"phantom {self.out_dir.name}: {self.kind} (seed {self.seed})",
                f"  series: {self.out_dir / CASE_SERIES_DIR} ({self.n_slices} slices of "
                f"{self.size}x{self.size}, spacing z/y/x {dz:.2f}/{dy:.3f}/{dx:.3f} mm)",
                f"  lungs: {self.lung_volume_ml:.0f} mL",
                f"  lesions: {findings}",
                f"  truth: {self.out_dir / CASE_TRUTH_DIR} "
                f"({TRUTH_LESIONS}, {TRUTH_LUNGS}, {TRUTH_LABEL})",
            ]
        )


# --- generation -------------------------------------------------------------------------------
def _check_args(
    kind: str, seed: int, slices: int | None, size: int, family: str = TRAINING_FAMILY
) -> None:
    if family not in FAMILIES:
        raise PhantomError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if kind not in CLASS_NAMES:
        raise PhantomError(f"unknown kind {kind!r}; expected one of {', '.join(CLASS_NAMES)}")
    if seed < 0:
        raise PhantomError(f"seed must be >= 0, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise PhantomError(f"size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
    if slices is not None and not 1 <= slices <= MAX_SLICES:
        raise PhantomError(f"slices must be between 1 and {MAX_SLICES}, got {slices}")


def _sample_geometry(
    rng: np.random.Generator, body: Body, scanner: Scanner, slices: int | None, size: int
) -> ScanGeometry:
    # The reconstruction circle must hold the lungs (a large body may be cut at its sides).
    need = (0.95 * body.half_width + 30.0) / (REFERENCE_SIZE / 2.0)
    pixel_512 = min(max(scanner.pixel_mm_512, need), 0.98)
    pixel = round(pixel_512 * REFERENCE_SIZE / size, 6)
    coverage = float(rng.uniform(*COVERAGE_MM_RANGE))
    height = body.z_top - body.z_bottom
    if slices is None:
        spacing, thickness = scanner.slice_mm, scanner.thickness_mm
        n = min(MAX_SLICES, round(coverage / spacing) + 1)
    else:
        n = slices
        thickness = round(float(np.clip(coverage / n, *SLICE_MM_RANGE)) * 20.0) / 20.0
        thickness = float(np.clip(thickness, *SLICE_MM_RANGE))
        spacing = thickness
    span = (n - 1) * spacing
    # A full scan is centred on the lungs (or cuts off an apex or a base); a thin slab sits on
    # the mid lungs where both are large.
    if slices is None and scanner.coverage == "apex-cut":
        centre_local = body.z_top - scanner.cut_mm - span / 2.0
    elif slices is None and scanner.coverage == "base-cut":
        centre_local = body.z_bottom + scanner.cut_mm + span / 2.0
    else:
        level = 0.47 if span > 150.0 else 0.4
        centre_local = body.z_bottom + level * height + float(rng.uniform(-8.0, 8.0))
    table_z = -float(rng.uniform(150.0, 400.0))  # the scanner's z of the lung base
    fov_half = (size - 1) / 2.0 * pixel
    recon_x = float(rng.uniform(-8.0, 8.0))
    recon_y = float(rng.uniform(-20.0, 5.0))
    body_x = float(rng.uniform(-10.0, 10.0))
    body_y = float(rng.uniform(-10.0, 5.0))
    first_z = round(table_z + centre_local - span / 2.0, 2)
    return ScanGeometry(
        size=size,
        n_slices=n,
        pixel_mm=pixel,
        slice_mm=spacing,
        thickness_mm=thickness,
        origin=(round(recon_x - fov_half, 4), round(recon_y - fov_half, 4), first_z),
        body_centre=(recon_x + body_x, recon_y + body_y, table_z),
    )


def _sample_identity(rng: np.random.Generator) -> PhantomIdentity:
    sex = "F" if rng.random() < 0.5 else "M"
    first = _FIRST_NAMES_F if sex == "F" else _FIRST_NAMES_M
    study = dt.date(2020, 3, 1) + dt.timedelta(days=int(rng.integers(0, 1400)))
    age = int(rng.integers(22, 88))
    birth = study - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    seconds = int(rng.integers(7 * 3600, 20 * 3600))
    return PhantomIdentity(
        patient_name=f"{rng.choice(_LAST_NAMES)}^{rng.choice(first)}",
        patient_id=f"{int(rng.integers(10_000_000, 100_000_000)):08d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
        age=f"{age:03d}Y",
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        accession=f"{int(rng.integers(10**9, 10**10)):010d}",
    )


def generate_phantom(
    *,
    kind: str,
    seed: int,
    slices: int | None = None,
    size: int = REFERENCE_SIZE,
    family: str = TRAINING_FAMILY,
    follow_up: FollowUp | None = None,
    mimic: bool = False,
) -> PhantomVolume:
    """Render a phantom in memory (nothing is written); with `follow_up`, a later study of
    the same patient (see FollowUp); with `mimic`, the same patient with every look-alike of
    disease at the top of its range (`Body.mimic`; the same random streams draw the rest)."""
    _check_args(kind, seed, slices, size, family)
    # The training family keeps its historical streams; another family gets its own.
    salt = 0x0C7 if family == TRAINING_FAMILY else 0x0C7 + 1 + FAMILIES.index(family)
    streams = np.random.SeedSequence([seed, salt]).spawn(6)
    scan_rng, anatomy_rng, tree_rng, lesion_rng, noise_rng, identity_rng = (
        np.random.default_rng(s) for s in streams
    )
    body = make_body(family, anatomy_rng)
    if mimic:
        body = body.mimic()
    scanner = Scanner.sample(
        scan_rng,
        half_width=body.half_width,
        half_depth=body.half_depth,
        z_span=(body.z_bottom, body.z_top),
    )
    geometry = _sample_geometry(scan_rng, body, scanner, slices, size)
    grid = geometry.grid()
    # Lesion centres must lie in the scanned slab (widened so one slice still finds some). A
    # follow-up plans them in the first study's slab, so they are the same lesions.
    half = max(geometry.thickness_mm, COARSE_STEP_MM) / 2.0
    z_range = (float(grid.z[0]) - half, float(grid.z[-1]) + half)
    identity = _sample_identity(identity_rng)
    if follow_up is not None:
        later = np.random.default_rng(np.random.SeedSequence([seed, salt, 0xF0, follow_up.number]))
        noise_rng = np.random.default_rng(later.integers(0, 2**63))
        geometry = _rescanned(geometry, later)
        identity = _later_identity(identity, follow_up.days, later)
        grid = geometry.grid()
    fine = geometry.fine_grid()
    scale = 1.0 if follow_up is None else follow_up.lesion_scale
    rendered = body.render(fine, kind, tree_rng, lesion_rng, z_range, lesion_scale=scale)
    hu, labels, lungs = slab_average(
        rendered.hu,
        rendered.lesions,
        rendered.lungs,
        fine.z.astype(np.float64),
        fine.slice_mm,
        grid.z.astype(np.float64),
        geometry.thickness_mm,
    )
    outline = body.outline(grid.u, grid.v)
    if scanner.table:
        on_table, value = table_plane(grid.u[None, :], grid.v[:, None], body.back_v, scanner)
        on_table &= ~outline
        hu[:, on_table] = value[on_table]
    image = reconstruct(
        hu,
        noise_rng,
        scanner,
        pixel_mm=geometry.pixel_mm,
        u=grid.u,
        v=grid.v,
        z=grid.z.astype(np.float64),
        body=outline,
    )
    np.clip(np.rint(image), HU_MIN, HU_MAX, out=image)
    return PhantomVolume(
        kind=kind if rendered.planted or follow_up is None else "normal",
        seed=seed,
        geometry=geometry,
        hu=image.astype(np.int16),
        lesions=labels,
        lungs=lungs,
        planted=rendered.planted,
        identity=identity,
        scanner=scanner,
        family=family,
        outside=~recon_circle(size),
        follow_up=follow_up,
    )


def _rescanned(geometry: ScanGeometry, rng: np.random.Generator) -> ScanGeometry:
    """The same scan planned again: slices shifted by 0.3-0.7 of their spacing (either way) and
    the reconstruction grid by up to half a pixel, so no voxel samples the same place."""
    dz = float(rng.uniform(0.3, 0.7)) * geometry.slice_mm * (1.0 if rng.random() < 0.5 else -1.0)
    dx, dy = (float(rng.uniform(-0.5, 0.5)) * geometry.pixel_mm for _ in range(2))
    x, y, z = geometry.origin
    return dataclasses.replace(
        geometry, origin=(round(x + dx, 4), round(y + dy, 4), round(z + dz, 2))
    )


def _later_identity(first: PhantomIdentity, days: int, rng: np.random.Generator) -> PhantomIdentity:
    """The same patient `days` later: new study date, time and accession number."""
    study = dt.datetime.strptime(first.study_date, "%Y%m%d").date() + dt.timedelta(days=days)
    seconds = int(rng.integers(7 * 3600, 20 * 3600))
    return dataclasses.replace(
        first,
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        accession=f"{int(rng.integers(10**9, 10**10)):010d}",
    )


# --- writing ----------------------------------------------------------------------------------
def _ds(value: float) -> str:
    """A decimal string (DICOM DS) of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _uid(phantom: PhantomVolume, *parts: object) -> UID:
    g = phantom.geometry
    sources = ["ctjoint-phantom", GENERATOR_VERSION, phantom.family, phantom.kind]
    sources.append(str(phantom.seed))
    sources += [str(g.size), str(g.n_slices), *(str(p) for p in parts)]
    if phantom.follow_up is not None:
        f = phantom.follow_up
        sources += ["follow-up", str(f.number), repr(f.lesion_scale), str(f.days)]
    return generate_uid(entropy_srcs=sources)


def _later(time: str, minutes: int) -> str:
    t = dt.datetime.strptime(time, "%H%M%S") + dt.timedelta(minutes=minutes)
    return t.strftime("%H%M%S")


def _series_template(phantom: PhantomVolume) -> Dataset:
    """Every attribute the slices of the series share (per-slice ones are set by the writer)."""
    g, ident = phantom.geometry, phantom.identity
    series_time = _later(ident.study_time, 3)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["ctjoint-phantom-implementation"])
    meta.ImplementationVersionName = f"CTJOINT_PH_{GENERATOR_VERSION}"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
    ds.StudyTime = ident.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time
    ds.AccessionNumber = ident.accession
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic chest CT"
    ds.SoftwareVersions = f"ctjoint phantom {GENERATOR_VERSION}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = f"CHEST {g.thickness_mm:g} {phantom.scanner.kernel.name}"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.PatientAge = ident.age
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(g.thickness_mm)
    ds.SpacingBetweenSlices = _ds(g.slice_mm)
    ds.KVP = str(phantom.scanner.kvp)
    ds.ConvolutionKernel = phantom.scanner.kernel.name
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(phantom, "study")
    ds.SeriesInstanceUID = _uid(phantom, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid(phantom, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.Laterality = ""
    ds.ImageComments = SYNTHETIC_COMMENT
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = g.size
    ds.Columns = g.size
    ds.PixelSpacing = [_ds(g.pixel_mm), _ds(g.pixel_mm)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    unsigned = phantom.scanner.convention.startswith("unsigned")
    ds.PixelRepresentation = 0 if unsigned else 1
    ds.PixelPaddingValue = phantom.scanner.padding
    ds.WindowCenter = _ds(LUNG_WINDOW_CENTER)
    ds.WindowWidth = _ds(LUNG_WINDOW_WIDTH)
    ds.RescaleIntercept = _ds(phantom.scanner.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def write_series(phantom: PhantomVolume, series_dir: Path) -> list[Path]:
    """Write the HU volume as a CT series, one Part-10 file per slice, cranio-caudal order."""
    g, scanner = phantom.geometry, phantom.scanner
    stored32 = phantom.hu.astype(np.int32) - scanner.intercept
    if phantom.outside is not None:
        stored32[:, phantom.outside] = scanner.padding
    unsigned = scanner.convention.startswith("unsigned")
    stored = np.clip(stored32, 0, 65535).astype("<u2") if unsigned else stored32.astype("<i2")
    series_dir.mkdir(parents=True, exist_ok=True)
    # One dataset, re-stamped per slice: building ~60 attributes per file costs more than
    # rendering the phantom.
    ds = _series_template(phantom)
    paths = []
    for number in range(1, g.n_slices + 1):
        k = g.n_slices - number  # instance 1 is the top slice
        sop_uid = _uid(phantom, "sop", k)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds(g.origin[0]), _ds(g.origin[1]), _ds(g.slice_z(k))]
        ds.SliceLocation = _ds(g.slice_z(k))
        ds.PixelData = stored[k].tobytes()
        # Some scanners name files by UID: nothing in the name says where the slice lies.
        name = f"{sop_uid.split('.')[-1][-16:]}.dcm" if scanner.random_names else None
        path = series_dir / (name or f"IM{number:05d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _save_nifti(volume_zyx: npt.NDArray[np.uint8], geometry: ScanGeometry, path: Path) -> None:
    affine = geometry.affine_ras()
    # The transposed view is already Fortran-contiguous, the order NIfTI stores: no copy.
    image = nib.Nifti1Image(volume_zyx.transpose(2, 1, 0), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header["descrip"] = b"ctjoint phantom truth"
    nib.save(image, path)


def _label_info(phantom: PhantomVolume) -> dict[str, Any]:
    g = phantom.geometry
    return {
        "label": phantom.kind,
        "kind": phantom.kind,
        "seed": phantom.seed,
        "size": g.size,
        "n_slices": g.n_slices,
        "spacing_mm": [g.slice_mm, g.pixel_mm, g.pixel_mm],
        "family": phantom.family,
        "scanner": {
            "slice_thickness_mm": g.thickness_mm,
            "kernel": phantom.scanner.kernel.name,
            "coverage": phantom.scanner.coverage,
            "pixel_convention": phantom.scanner.convention,
            "table": phantom.scanner.table,
            "streaks": len(phantom.scanner.streaks),
        },
        "lesion_volume_ml": phantom.lesion_volume_ml(),
        "lung_volume_ml": round(float(np.count_nonzero(phantom.lungs)) * g.voxel_ml, 1),
        "lesions": [lesion.describe(g.to_patient) for lesion in phantom.planted],
        "bilateral": len(phantom.lesion_sides()) == 2,
        "noise_hu": round(phantom.noise_hu, 1),
        "series_order": "IM00001 is the most superior slice; truth k=0 the most inferior",
        "generator": f"ctjoint phantom {GENERATOR_VERSION}",
    }


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PhantomError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()):
            raise PhantomError(f"{out_dir}: folder exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)


def write_phantom_case(
    out_dir: Path,
    *,
    kind: str,
    seed: int,
    slices: int | None,
    size: int,
    family: str = TRAINING_FAMILY,
    follow_up: FollowUp | None = None,
    truth_extra: Mapping[str, Any] | None = None,
    mimic: bool = False,
) -> PhantomCase:
    """Write CASE/series/*.dcm and CASE/truth/{lesions,lungs}.nii.gz + label.json.

    label.json keeps the arguments under "generation", so a follow-up study regenerates the
    same patient from them; `truth_extra` adds keys to it (a follow-up's expected change)."""
    out_dir = Path(out_dir)
    _check_args(kind, seed, slices, size, family)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        _prepare_out_dir(out_dir)  # raises with the precise reason
    # Render before touching the disk, so a failure leaves no half-written case.
    phantom = generate_phantom(
        kind=kind,
        seed=seed,
        slices=slices,
        size=size,
        family=family,
        follow_up=follow_up,
        mimic=mimic,
    )
    _prepare_out_dir(out_dir)
    write_series(phantom, out_dir / CASE_SERIES_DIR)
    truth = out_dir / CASE_TRUTH_DIR
    truth.mkdir()
    _save_nifti(phantom.lesions, phantom.geometry, truth / TRUTH_LESIONS)
    _save_nifti(phantom.lungs, phantom.geometry, truth / TRUTH_LUNGS)
    info = _label_info(phantom)
    info["generation"] = {
        "kind": kind,
        "seed": seed,
        "slices": slices,
        "size": size,
        "family": family,
        "follow_up": None if follow_up is None else dataclasses.asdict(follow_up),
        "mimic": mimic,
    }
    info.update(truth_extra or {})
    (truth / TRUTH_LABEL).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    g = phantom.geometry
    return PhantomCase(
        out_dir=out_dir,
        kind=phantom.kind,
        seed=seed,
        n_slices=g.n_slices,
        size=g.size,
        spacing_mm=(g.slice_mm, g.pixel_mm, g.pixel_mm),
        lesion_volume_ml=info["lesion_volume_ml"],
        n_lesions=len(phantom.planted),
        bilateral=bool(info["bilateral"]),
        lung_volume_ml=float(info["lung_volume_ml"]),
    )


def _load_nifti(path: Path) -> npt.NDArray[np.uint8]:
    image = cast(nib.Nifti1Image, nib.load(path))
    return np.asarray(image.dataobj, dtype=np.uint8)


def read_truth(
    case_dir: Path,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], dict[str, Any]]:
    """(lesions [Z,Y,X], lungs [Z,Y,X], label.json) of a case; Z ascending along the normal."""
    truth = Path(case_dir) / CASE_TRUTH_DIR
    try:
        lesions = _load_nifti(truth / TRUTH_LESIONS)
        lungs = _load_nifti(truth / TRUTH_LUNGS)
        info = json.loads((truth / TRUTH_LABEL).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PhantomError(f"{truth}: cannot read the phantom truth ({err})") from err
    if lesions.ndim != 3 or lesions.shape != lungs.shape:
        raise PhantomError(f"{truth}: lesion and lung maps differ in shape")
    return (
        np.ascontiguousarray(lesions.transpose(2, 1, 0)),
        np.ascontiguousarray(lungs.transpose(2, 1, 0)),
        info,
    )


# --- sets -------------------------------------------------------------------------------------
def case_seed(base_seed: int, index: int) -> int:
    """The seed of case `index` of a set: a hash of (base seed, index), stable forever."""
    state = np.random.SeedSequence([base_seed, index]).generate_state(1, np.uint32)
    return int(state[0])


def _split_sizes(count: int) -> tuple[int, int, int]:
    """70/15/15 of one class, with at least one val and test case when there are enough."""
    n_val = max(1, round(count * SPLIT_FRACTIONS[1])) if count >= 3 else 0
    n_test = max(1, round(count * SPLIT_FRACTIONS[2])) if count >= 2 else 0
    return count - n_val - n_test, n_val, n_test


def plan_set(n: int, seed: int) -> list[tuple[str, str, str, int]]:
    """(case name, label, split, case seed) for every case of a set, in case order."""
    width = max(4, len(str(n - 1)))
    kinds = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(n)]
    splits = [""] * n
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E7]))
    for label in CLASS_NAMES:
        members = [i for i in range(n) if kinds[i] == label]
        order = [members[j] for j in rng.permutation(len(members))]
        sizes = _split_sizes(len(members))
        start = 0
        for split, count in zip(SPLITS, sizes, strict=True):
            for i in order[start : start + count]:
                splits[i] = split
            start += count
    return [(f"case_{i:0{width}d}", kinds[i], splits[i], case_seed(seed, i)) for i in range(n)]


def mimic_cases(plan: list[tuple[str, str, str, int]], share: float) -> set[str]:
    """Names of the normal cases drawn as mimics: `share` of them, spread evenly in case order.

    Hard negatives for training: a normal chest whose look-alikes of disease sit at the top of
    their range teaches a network not to call them lesions."""
    if not 0.0 <= share <= 1.0:
        raise PhantomError(f"mimic share must be within 0-1, got {share}")
    normals = [name for name, label, _, _ in plan if label == CLASS_NAMES[CLASS_NORMAL]]
    return {
        name
        for i, name in enumerate(normals)
        if math.floor((i + 1) * share) > math.floor(i * share)
    }


def _write_set_case(job: tuple[str, str, int, int, str, int | None, bool]) -> PhantomCase:
    """Pool worker (top level, so it pickles under the spawn start method)."""
    out_dir, kind, seed, size, family, slices, mimic = job
    return write_phantom_case(
        Path(out_dir), kind=kind, seed=seed, slices=slices, size=size, family=family, mimic=mimic
    )


def write_phantom_set(
    out_dir: Path,
    *,
    n: int,
    seed: int,
    size: int,
    workers: int,
    family: str = TRAINING_FAMILY,
    slices: int | None = None,
    mimic_share: float = 0.0,
) -> str:
    """Write SET/labels.csv and SET/<case>/ for n balanced cases; returns a summary.

    `slices` fixes every case's slice count (small sets for tests); by default each scan
    draws its own thickness and spacing. `mimic_share` of the normal cases are mimics."""
    out_dir = Path(out_dir)
    if n < 1:
        raise PhantomError(f"n must be >= 1, got {n}")
    if workers < 1:
        raise PhantomError(f"workers must be >= 1, got {workers}")
    _check_args(CLASS_NAMES[0], seed, slices, size, family)
    plan = plan_set(n, seed)
    mimics = mimic_cases(plan, mimic_share)
    _prepare_out_dir(out_dir)
    jobs = [
        (str(out_dir / name), label, s, size, family, slices, name in mimics)
        for name, label, _, s in plan
    ]
    results: list[PhantomCase]
    if workers == 1 or n == 1:
        results = [_write_set_case(job) for job in jobs]
    else:
        # spawn, not fork: safe whatever threads the parent (typer, BLAS) has started.
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, n)) as pool:
            results = pool.map(_write_set_case, jobs, chunksize=1)
    with (out_dir / SET_LABELS_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["case", "label", "split"])
        for name, label, split, _ in plan:
            writer.writerow([name, label, split])
    return _set_summary(out_dir, plan, results, len(mimics))


def _set_summary(
    out_dir: Path, plan: list[tuple[str, str, str, int]], results: list[PhantomCase], mimics: int
) -> str:
    lines = [f"phantom set {out_dir}: {len(plan)} cases, labels in {out_dir / SET_LABELS_CSV}"]
    header = f"  {'':8s}" + "".join(f"{s:>7s}" for s in SPLITS) + f"{'total':>7s}"
    lines.append(header)
    for label in CLASS_NAMES:
        counts = [sum(1 for _, lb, sp, _ in plan if lb == label and sp == s) for s in SPLITS]
        lines.append(f"  {label:8s}" + "".join(f"{c:7d}" for c in counts) + f"{sum(counts):7d}")
    slices = [r.n_slices for r in results]
    lines.append(
        f"  slices per case {min(slices)}-{max(slices)}, size {results[0].size}x{results[0].size}"
    )
    ggo = sum(r.lesion_volume_ml.get(LESION_CLASS_NAMES[0], 0.0) for r in results)
    cons = sum(r.lesion_volume_ml.get(LESION_CLASS_NAMES[1], 0.0) for r in results)
    lines.append(
        f"  lesion volume in all cases: ground-glass {ggo:.0f} mL, consolidation {cons:.0f} mL"
    )
    if mimics:
        lines.append(f"  {mimics} normal cases drawn as mimics")
    return "\n".join(lines)


__all__ = [
    "FollowUp",
    "PhantomCase",
    "PhantomError",
    "PhantomVolume",
    "ScanGeometry",
    "case_seed",
    "generate_phantom",
    "mimic_cases",
    "plan_set",
    "read_truth",
    "write_phantom_case",
    "write_phantom_set",
    "write_series",
]
