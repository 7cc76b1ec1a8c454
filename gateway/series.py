"""Assemble validated CT slices into one volume: consistency checks as each slice arrives,
then sort along the slice normal and check the spacing when the series is complete.

`SeriesAssembler` is fed one `CtSlice` at a time (a folder read, or files streaming into the
gateway) and copies each slice straight into one preallocated array, so a series never exists
twice in memory. `CtVolume` is the contract between the reader and the analysis; it can also be
built from a plain array (NIfTI data sets) without any DICOM.

`StudySorter` lets a scan hold a whole study: files of other series than the one being
assembled are set aside as they arrive, and once the stream ends the rules of
ctjoint/series_rules.py say which series is analysed (docs/interoperability.md).

Size: one job, a study's files to the one volume analysed: the assembler's checks as slices
arrive and its in-place sort, and the sorter that sets other series aside, share CtVolume.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
)

from ctjoint.gateway.dicom_io import (
    HU_INT16,
    CtSlice,
    DicomSource,
    describe_source,
    hu_dtype,
    read_ct_slice,
    slice_normal,
)
from ctjoint.gateway.errors import (
    DuplicateSliceError,
    EmptySeriesError,
    InconsistentGeometryError,
    InputError,
    LimitExceededError,
    MixedSeriesError,
)
from ctjoint.gateway.logging_setup import pseudonym
from ctjoint.gateway.memory import DEFAULT_MAX_SCAN_BYTES, ScanMemory, current_scan_memory
from ctjoint.series_rules import CT_IMAGE_STORAGE, ImageFacts, Selection, SeriesFacts, choose

logger = logging.getLogger(__name__)

AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# Two slices are "at the same position" closer than this (mm): scanners print positions with
# at least 3 decimals, real slice spacings are >= 0.25 mm.
DUPLICATE_POSITION_MM = 1e-3
# Spacing along the normal may wander this much (relative, plus an absolute floor in mm) before
# we call the series non-uniform: it absorbs rounding of printed positions, yet a single missing
# slice (a 100 % jump) is far outside it.
SPACING_RELATIVE_TOLERANCE = 0.05
SPACING_ABSOLUTE_TOLERANCE_MM = 0.01
# In-plane agreement between slices.
PIXEL_SPACING_RELATIVE_TOLERANCE = 1e-3
ORIENTATION_TOLERANCE = 1e-4
# How many offending slice gaps an error lists before summarising.
MAX_REPORTED = 3
# Plausibility bounds on the series (docs/security.md; the per-file ones are in dicom_io).
# A scan is at least a slice and its two neighbours (the 2.5D model's input); slices are
# 0.1 to 20 mm apart; the slice thickness may be up to 10 times the spacing (overlapping
# reconstructions) or down to a twentieth of it (sparse high-resolution protocols).
MIN_SLICES = 3
SLICE_SPACING_MM = (0.1, 20.0)
THICKNESS_TO_SPACING = (0.05, 10.0)
# The memory budget of one scan's volume (float32 HU, rows x columns x slices x 4 bytes),
# checked from each file's Rows and Columns before its pixels are decoded, and before any
# buffer is allocated (the one preallocated from expected_files included); the scan's
# `ScanMemory` (gateway/memory.py) reserves the same bytes against the gateway's budget.
# The buffer holds int16 (whole HU, dicom_io.HU_INT16) until a slice needs float32, so it
# usually takes half of that. Growing or widening a buffer briefly holds the old one too:
# the analysis factor there accounts for it.
_HU_BYTES = 4


@dataclass(frozen=True, eq=False)
class CtVolume:
    """A CT volume in HU, slices sorted along the normal: `hu` is [Z, Y, X], read-only, int16
    when every value is a whole HU (a DICOM series stored as CT scanners store it: half the
    bytes of float32), float32 otherwise. Readers that compute convert it to float32 (exact).

    `spacing_mm` is (between slices, between rows, between columns). `origin` is the position of
    the first voxel of the first slice, `orientation` its row and column cosines. UIDs are empty
    for volumes that did not come from DICOM; they are kept for the SEG writer, never logged.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    orientation: tuple[float, float, float, float, float, float] = AXIAL_ORIENTATION
    sop_instance_uids: tuple[str, ...] = ()
    series_uid: str = ""
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    slice_thickness_mm: float | None = None
    source_names: tuple[str, ...] = field(default=())
    # ImagePositionPatient of each slice as its file states it (the SEG writer's frame
    # geometry); empty for volumes that did not come from DICOM.
    positions: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self) -> None:
        hu = np.ascontiguousarray(self.hu, dtype=hu_dtype(self.hu))
        if hu.ndim != 3 or min(hu.shape) < 1:
            raise ValueError(f"a CT volume is [slices, rows, columns], got shape {hu.shape}")
        hu.flags.writeable = False
        object.__setattr__(self, "hu", hu)
        spacing = tuple(float(v) for v in self.spacing_mm)
        if len(spacing) != 3 or not all(np.isfinite(v) and v > 0 for v in spacing):
            raise ValueError(f"spacing must be three positive numbers, got {self.spacing_mm}")
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "orientation", tuple(float(v) for v in self.orientation))
        object.__setattr__(self, "sop_instance_uids", tuple(self.sop_instance_uids))
        object.__setattr__(self, "source_names", tuple(self.source_names))
        object.__setattr__(
            self, "positions", tuple(tuple(float(v) for v in p) for p in self.positions)
        )
        if self.sop_instance_uids and len(self.sop_instance_uids) != hu.shape[0]:
            raise ValueError("one SOP instance UID per slice is required")

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm^3)."""
        z, y, x = self.spacing_mm
        return z * y * x / 1000.0

    @classmethod
    def from_array(
        cls,
        hu: np.ndarray,
        spacing_mm: Sequence[float],
        *,
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        orientation: Sequence[float] = AXIAL_ORIENTATION,
    ) -> CtVolume:
        """A volume from a HU array already in [Z, Y, X] order with spacing (z, y, x) in mm."""
        return cls(
            hu=hu,
            spacing_mm=(spacing_mm[0], spacing_mm[1], spacing_mm[2]),
            origin=(origin[0], origin[1], origin[2]),
            orientation=(
                orientation[0],
                orientation[1],
                orientation[2],
                orientation[3],
                orientation[4],
                orientation[5],
            ),
        )

    @classmethod
    def from_nifti_array(cls, data_xyz: np.ndarray, zooms_xyz: Sequence[float]) -> CtVolume:
        """A volume from NIfTI data as nibabel returns it: array (x, y, z), zooms (x, y, z) mm.

        Only the axes are reordered (to z, y, x), nothing is flipped, so masks stored the same
        way (contracts: truth/*.nii.gz) line up voxel for voxel after the same transpose.
        """
        if data_xyz.ndim != 3:
            raise ValueError(f"expected a 3D NIfTI array, got shape {data_xyz.shape}")
        hu = np.transpose(np.asarray(data_xyz, dtype=np.float32), (2, 1, 0))
        return cls.from_array(hu, (zooms_xyz[2], zooms_xyz[1], zooms_xyz[0]))


def _reserve_memory(memory: ScanMemory, count: int, capacity: int, slice_bytes: int) -> int:
    """Reserve a buffer's bytes against the gateway's budget: `capacity` slices if it allows
    them, else just the `count` needed now (LimitExceededError if not even those)."""
    if capacity > count:
        with contextlib.suppress(LimitExceededError):
            memory.reserve(capacity * slice_bytes, f"at slice {count}")
            return capacity
    memory.reserve(count * slice_bytes, f"at slice {count}")
    return count


@dataclass(frozen=True)
class _SliceRecord:
    """What the assembler keeps of a slice once its pixels are in the buffer."""

    slot: int
    source: str
    position: tuple[float, float, float]
    sop_instance_uid: str


def _close(
    values: Sequence[float], reference: Sequence[float], *, rtol: float, atol: float
) -> bool:
    """`np.allclose` for a handful of floats (NaN is never close), without numpy's ~50 us of
    per-call overhead on every file of a series."""
    return all(abs(v - r) <= atol + rtol * abs(r) for v, r in zip(values, reference, strict=True))


class SeriesAssembler:
    """Collect the slices of one CT series as they arrive and build a `CtVolume`.

    Each `add` checks the slice against the first one (same series and study, orientation,
    matrix size and pixel spacing) and copies its pixels into a preallocated buffer. Pass
    `expected_slices` when the count is known (a folder listing, a stream header): the buffer is
    then allocated once; otherwise it grows by doubling. `finish` sorts the slices in place;
    with a known count, a series that arrives against the normal (head to foot, as scanners
    often send it) fills the buffer from its end, so that it is already in order.
    """

    def __init__(
        self,
        *,
        expected_slices: int | None = None,
        max_slices: int | None = None,
        max_bytes: int | None = None,
        memory: ScanMemory | None = None,
    ) -> None:
        # The scan's reservation: given, or that of the scan this runs for (gateway/memory.py).
        self._memory = memory if memory is not None else current_scan_memory()
        if max_bytes is None:
            max_bytes = (
                self._memory.max_scan_bytes if self._memory is not None else DEFAULT_MAX_SCAN_BYTES
            )
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self._expected = expected_slices
        self._max = max_slices
        self._max_bytes = max_bytes
        self._first: CtSlice | None = None
        self._buffer: np.ndarray | None = None
        # The row handed out by next_slot, which add() then takes without a copy.
        self._offered: np.ndarray | None = None
        # Filling the buffer from its end: a series arriving against the normal (scanners
        # often send head to foot) is then already in order, and finish moves nothing.
        self._descending = False
        self._records: list[_SliceRecord] = []
        self._uids: dict[str, str] = {}
        # Arrival slots in the finished volume's order (set by finish): lets work done per
        # slot while the series arrived be put in the volume's order.
        self.sorted_slots: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def normal(self) -> np.ndarray | None:
        """The series' slice normal (the first slice's), None before any slice."""
        return None if self._first is None else slice_normal(self._first.orientation)

    def next_slot(self, rows: int, columns: int) -> np.ndarray | None:
        """The volume row the next slice will occupy, for its HU values to be written there
        directly (`read_ct_slice(..., hu_out=assembler.next_slot)`); None when the size
        differs from the series' (that slice is then refused by `add`)."""
        if self._first is not None and self._first.hu.shape != (rows, columns):
            return None
        if self._max is not None and len(self._records) >= self._max:
            return None
        slot = len(self._records)
        buffer = self._reserve(slot + 1, (rows, columns))
        self._offered = buffer[self._row(slot, buffer)]
        return self._offered

    def add(self, ct_slice: CtSlice) -> int:
        """Check one slice against the series so far and take its pixels; returns its slot
        (0, 1, ... in arrival order)."""
        if self._max is not None and len(self._records) >= self._max:
            raise LimitExceededError(
                f"{ct_slice.source}: the series has more than {self._max} slices (the limit)"
            )
        if self._first is None:
            self._first = ct_slice
        else:
            self._check_consistent(ct_slice, self._first)
        earlier = self._uids.get(ct_slice.sop_instance_uid)
        if earlier is not None:
            raise DuplicateSliceError(
                f"is the same instance (SOPInstanceUID) as {earlier}",
                source=ct_slice.source,
                attribute="SOPInstanceUID",
            )
        self._uids[ct_slice.sop_instance_uid] = ct_slice.source
        slot = len(self._records)
        buffer = self._reserve(slot + 1, ct_slice.hu.shape)
        if ct_slice.hu is not self._offered:
            if ct_slice.hu.dtype != buffer.dtype and buffer.dtype == HU_INT16:
                buffer = self._widen(buffer)
            buffer[self._row(slot, buffer)] = ct_slice.hu
        self._offered = None
        self._records.append(
            _SliceRecord(slot, ct_slice.source, ct_slice.position, ct_slice.sop_instance_uid)
        )
        if slot == 1:
            self._choose_direction(buffer)
        return slot

    def finish(self) -> CtVolume:
        """Sort along the slice normal, check the spacing and return the volume."""
        first, buffer = self._first, self._buffer
        if first is None or buffer is None:
            raise EmptySeriesError("no CT slice was received")
        if len(self._records) < MIN_SLICES:
            raise InconsistentGeometryError(
                f"has {len(self._records)} slice(s), expected at least {MIN_SLICES}",
                source="series",
                attribute="slices",
            )
        normal = slice_normal(first.orientation)
        distances = np.array([np.dot(r.position, normal) for r in self._records])
        order = np.argsort(distances, kind="stable")
        records = [self._records[i] for i in order]
        sorted_distances = distances[order]
        spacing_z = self._slice_spacing(records, sorted_distances)
        _check_plausible_spacing(spacing_z, first)
        self._warn_if_sheared(records, normal)
        count = len(records)
        capacity = buffer.shape[0]
        used = buffer[capacity - count :] if self._descending else buffer[:count]
        volume = used if capacity == count else used.copy()
        # Index in `volume` of each arrival slot (reversed when filled from the end).
        rows = [count - 1 - r.slot if self._descending else r.slot for r in records]
        permute_in_place(volume, rows)
        row_spacing, col_spacing = first.pixel_spacing
        origin = records[0].position
        self.sorted_slots = tuple(r.slot for r in records)
        # The buffer belongs to the volume now; a second finish() must not hand it out again.
        self._buffer = None
        self._first = None
        self._records = []
        self._uids = {}
        self._descending = False
        return CtVolume(
            hu=volume,
            spacing_mm=(spacing_z, row_spacing, col_spacing),
            origin=origin,
            orientation=first.orientation,
            sop_instance_uids=tuple(r.sop_instance_uid for r in records),
            series_uid=first.series_uid,
            study_uid=first.study_uid,
            frame_of_reference_uid=first.frame_of_reference_uid,
            slice_thickness_mm=first.slice_thickness,
            source_names=tuple(r.source for r in records),
            positions=tuple(r.position for r in records),
        )

    # --- internals ---------------------------------------------------------------------------

    def _row(self, slot: int, buffer: np.ndarray) -> int:
        """The buffer row of arrival slot `slot`."""
        return buffer.shape[0] - 1 - slot if self._descending else slot

    def _choose_direction(self, buffer: np.ndarray) -> None:
        """After the second slice: if it lies before the first along the normal and the
        buffer's size is the series' (known count), move both to the buffer's end and fill
        the rest from there on."""
        capacity = buffer.shape[0]
        if self._expected is None or capacity != self._expected or capacity < 4:
            return
        normal = self.normal
        first, second = self._records
        if normal is None or np.dot(second.position, normal) >= np.dot(first.position, normal):
            return
        buffer[capacity - 1] = buffer[0]
        buffer[capacity - 2] = buffer[1]
        self._descending = True

    def _reserve(self, count: int, shape: tuple[int, ...]) -> np.ndarray:
        buffer = self._buffer
        if buffer is not None and buffer.shape[0] >= count:
            return buffer
        slice_bytes = int(np.prod(shape)) * _HU_BYTES
        affordable = self._max_bytes // slice_bytes
        wanted = max(count, self._expected or 0)
        if self._max is not None:
            wanted = min(wanted, self._max)
        if wanted > affordable:
            rows, columns = shape
            raise LimitExceededError(
                f"at slice {count}: a scan of {wanted} slices of {rows}x{columns} needs "
                f"{wanted * slice_bytes} bytes decoded, more than the budget of "
                f"{self._max_bytes} bytes per scan ({affordable} such slices)"
            )
        if buffer is not None and self._descending:
            # More slices than the series said: back to arrival order, then grow as usual.
            filled = len(self._records)
            buffer = np.ascontiguousarray(buffer[buffer.shape[0] - filled :][::-1])
            self._descending = False
        capacity = max(count, self._expected or 0)
        if buffer is not None:
            capacity = max(capacity, 2 * buffer.shape[0])
        if self._max is not None:
            capacity = min(capacity, self._max)
        capacity = min(capacity, affordable)
        if self._memory is not None:
            capacity = _reserve_memory(self._memory, count, capacity, slice_bytes)
        dtype = HU_INT16 if buffer is None else buffer.dtype
        grown = np.empty((capacity, *shape), dtype=dtype)
        if buffer is not None:
            grown[: buffer.shape[0]] = buffer
        self._buffer = grown
        return grown

    def _widen(self, buffer: np.ndarray) -> np.ndarray:
        """The int16 buffer as float32 (the same numbers), for a slice whose HU are not whole:
        once per series at most, and the budget counted float32 from the start."""
        wide = buffer.astype(np.float32)
        self._buffer = wide
        return wide

    @staticmethod
    def _check_consistent(s: CtSlice, first: CtSlice) -> None:
        if s.study_uid != first.study_uid:
            raise MixedSeriesError(
                f"belongs to another study than {first.source}; send one series per scan",
                source=s.source,
                attribute="StudyInstanceUID",
            )
        if s.series_uid != first.series_uid:
            raise MixedSeriesError(
                f"belongs to another series than {first.source}; send one series per scan",
                source=s.source,
                attribute="SeriesInstanceUID",
            )
        if (
            first.frame_of_reference_uid
            and s.frame_of_reference_uid
            and s.frame_of_reference_uid != first.frame_of_reference_uid
        ):
            raise InconsistentGeometryError(
                f"differs from {first.source}",
                source=s.source,
                attribute="FrameOfReferenceUID",
            )
        if s.hu.shape != first.hu.shape:
            raise InconsistentGeometryError(
                f"is {s.rows}x{s.columns}, {first.source} is {first.rows}x{first.columns}",
                source=s.source,
                attribute="Rows/Columns",
            )
        if not _close(s.orientation, first.orientation, rtol=0.0, atol=ORIENTATION_TOLERANCE):
            raise InconsistentGeometryError(
                f"{_fmt(s.orientation)} differs from {first.source} {_fmt(first.orientation)}",
                source=s.source,
                attribute="ImageOrientationPatient",
            )
        if not _close(
            s.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_RELATIVE_TOLERANCE, atol=0.0
        ):
            raise InconsistentGeometryError(
                f"{_fmt(s.pixel_spacing)} differs from {first.source} {_fmt(first.pixel_spacing)}",
                source=s.source,
                attribute="PixelSpacing",
            )

    @staticmethod
    def _slice_spacing(records: list[_SliceRecord], distances: np.ndarray) -> float:
        gaps = np.diff(distances)
        for i in np.flatnonzero(gaps < DUPLICATE_POSITION_MM)[:1]:
            raise DuplicateSliceError(
                f"is at the same position along the slice normal as {records[i].source}",
                source=records[i + 1].source,
                attribute="ImagePositionPatient",
            )
        spacing = float(np.median(gaps))
        tolerance = max(SPACING_RELATIVE_TOLERANCE * spacing, SPACING_ABSOLUTE_TOLERANCE_MM)
        bad = np.flatnonzero(np.abs(gaps - spacing) > tolerance)
        if bad.size:
            details = [
                f"{gaps[i]:.3g} mm between {records[i].source} and {records[i + 1].source}"
                for i in bad[:MAX_REPORTED]
            ]
            more = f" and {bad.size - MAX_REPORTED} more" if bad.size > MAX_REPORTED else ""
            raise InconsistentGeometryError(
                f"slice spacing is not uniform (expected {spacing:.3g} mm): "
                f"{'; '.join(details)}{more}; is a slice missing?",
                attribute="ImagePositionPatient",
            )
        return spacing

    @staticmethod
    def _warn_if_sheared(records: list[_SliceRecord], normal: np.ndarray) -> None:
        # Gantry-tilted series step sideways between slices; we treat them as unsheared, which
        # is harmless for classification and slightly distorts volumes: say so in the log.
        positions = np.array([r.position for r in records], dtype=np.float64)
        steps = np.diff(positions, axis=0)
        sideways = steps - np.outer(steps @ normal, normal)
        if len(steps) and float(np.max(np.linalg.norm(sideways, axis=1))) > 0.01:
            logger.warning("series is sheared (gantry tilt?); analysed as if it were not")


def _check_plausible_spacing(spacing: float, first: CtSlice) -> None:
    low, high = SLICE_SPACING_MM
    if not low <= spacing <= high:
        raise InconsistentGeometryError(
            f"slices are {spacing:.3g} mm apart, outside the plausible range {low:g} to "
            f"{high:g} mm",
            source="series",
            attribute="ImagePositionPatient",
        )
    thickness = first.slice_thickness
    if thickness is None:
        return
    low, high = THICKNESS_TO_SPACING
    if not low <= thickness / spacing <= high:
        raise InconsistentGeometryError(
            f"is {thickness:g} mm for slices {spacing:.3g} mm apart: the ratio "
            f"{thickness / spacing:.3g} is outside the plausible range {low:g} to {high:g}",
            source=first.source,
            attribute="SliceThickness",
        )


def permute_in_place(
    volume: np.ndarray, slots: Sequence[int], rows: Sequence[slice | None] | None = None
) -> None:
    """Reorder slices so that volume[i] becomes old volume[slots[i]], with one slice of scratch.

    Follows the permutation's cycles instead of `volume[slots]`, which would copy the series.
    `rows`, by old slice: the rows outside which that slice is zero (None: all zero). Only
    those rows are read and written, so pages never written stay untouched: on this build
    machine a fresh 4 KiB page costs about 27 us, and moving whole 512x512 lung-map slices
    faulted in the 40 % of pages outside the lungs' rows (0.3 s at 400 slices).
    """
    done = np.zeros(len(slots), dtype=bool)
    scratch: np.ndarray | None = None
    for start in range(len(slots)):
        if done[start] or slots[start] == start:
            done[start] = True
            continue
        if rows is None:
            if scratch is None:
                scratch = np.empty_like(volume[0])
            scratch[...] = volume[start]
            i = start
            while True:
                done[i] = True
                j = slots[i]
                if j == start:
                    volume[i] = scratch
                    break
                volume[i] = volume[j]
                i = j
            continue
        held = rows[start]
        kept = None if held is None else volume[start, held].copy()
        i = start
        while True:
            done[i] = True
            j = slots[i]
            there = rows[i]
            if there is not None:
                volume[i, there] = 0
            source = held if j == start else rows[j]
            if source is not None:
                volume[i, source] = kept if j == start else volume[j, source]
            if j == start:
                break
            i = j


def list_series_files(folder: Path) -> list[Path]:
    """The candidate DICOM files of a series folder: non-hidden regular files, sorted by name.

    Subfolders are ignored (a series is one folder); if there is no file at all the error says
    so and mentions subfolders, since a parent folder is the usual mistake.
    """
    if not folder.exists():
        raise EmptySeriesError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise EmptySeriesError(f"{folder}: not a folder (give the folder of the series)")
    files: list[Path] = []
    subfolders = 0
    for entry in _scan(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders += 1
        elif entry.is_file():
            files.append(Path(entry.path))
    if not files:
        hint = (
            f"; it has {subfolders} subfolder(s): give the folder that holds the DICOM files"
            if subfolders
            else ""
        )
        raise EmptySeriesError(f"{folder}: no DICOM file in this folder{hint}")
    return sorted(files, key=lambda p: p.name)


def _scan(folder: Path) -> Iterator[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        yield from entries


def load_series_dir(folder: Path | str, *, max_slices: int | None = None) -> CtVolume:
    """Read, validate and assemble every file of a series folder into a `CtVolume`."""
    files = list_series_files(Path(folder))
    assembler = SeriesAssembler(expected_slices=len(files), max_slices=max_slices)
    for index, path in enumerate(files, start=1):
        source = describe_source(index, path.name)
        assembler.add(read_ct_slice(path, source=source, hu_out=assembler.next_slot))
    volume = assembler.finish()
    logger.info("assembled %d slices of %dx%d", *volume.shape)
    return volume


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


# What a CT study holds besides its images: set aside (to be skipped with a reason) even when
# it arrives before any CT image. Any other non-CT object first is refused as before.
STUDY_COMPANIONS = frozenset(
    {
        XRayRadiationDoseSRStorage,
        SecondaryCaptureImageStorage,
        EnhancedSRStorage,
        ComprehensiveSRStorage,
    }
)


@dataclass(frozen=True)
class SetAside:
    """A file of another series than the one assembled, kept for the series choice."""

    number: int
    name: str
    data: DicomSource


class SeriesSwitch(Exception):  # noqa: N818 (a signal to the analysis, not an error)
    """The rules chose another series than the one assembled: analyse `files` instead."""

    def __init__(self, files: tuple[SetAside, ...], selection: Selection) -> None:
        super().__init__("another series of the study was chosen")
        self.files = files
        self.selection = selection


def _uid(dataset: Dataset, keyword: str) -> str:
    """A UID attribute as text, "" when absent or unreadable (the assembler names it)."""
    try:
        return str(dataset.get(keyword, "") or "")
    except Exception:  # whatever a malformed element raises when converted
        return ""


class StudySorter:
    """Which files of a scan belong to the series being assembled, and which series to analyse.

    The first CT file names the series assembled as files arrive (streaming keeps working for
    a one-series scan, the usual case). A file of another series of the same study is set
    aside: its header facts always, its bytes when it could be chosen (an ORIGINAL-or-unknown
    CT image that is not a localizer), at most `max_files` of them. A file of another study
    goes on to the assembler, which refuses it by name. `select` applies the rules once the
    stream has ended.
    """

    def __init__(self, *, max_files: int | None = None) -> None:
        self._max = max_files
        self._uid: str | None = None
        self._study = ""
        self._facts: dict[str, list[ImageFacts]] = {}
        self._kept: dict[str, list[SetAside]] = {}
        self._held = 0
        # The first dose report or secondary capture, when it came before any CT image.
        self._first_companion: SetAside | None = None
        # Numbers in the stream of the files of other series (for error messages).
        self._aside: list[int] = []

    def set_aside(self, dataset: Dataset, data: DicomSource, number: int, name: str) -> bool:
        """True when the file is not for the assembler (kept for the choice, or skipped)."""
        uid, study = _uid(dataset, "SeriesInstanceUID"), _uid(dataset, "StudyInstanceUID")
        facts = ImageFacts.from_header(dataset)
        # A damaged UID is no series of its own: validation names it (and never quotes it).
        valid = bool(uid) and UID(uid).is_valid
        if self._uid is None:
            if valid and facts.sop_class in STUDY_COMPANIONS:
                self._facts.setdefault(uid, []).append(facts)
                if self._first_companion is None:
                    self._first_companion = SetAside(number, name, data)
                return True
            self._uid, self._study = uid, study
        if not valid or uid == self._uid or study != self._study:
            if uid:
                self._facts.setdefault(uid, []).append(facts)
            return False
        self._facts.setdefault(uid, []).append(facts)
        self._aside.append(number)
        if facts.sop_class == CT_IMAGE_STORAGE and not facts.localizer:
            self._held += 1
            if self._max is not None and self._held > self._max:
                raise LimitExceededError(
                    f"{describe_source(number, name or None)}: the scan's other series hold "
                    f"more than {self._max} images (the limit)"
                )
            self._kept.setdefault(uid, []).append(SetAside(number, name, data))
        return True

    @property
    def series_count(self) -> int:
        return len(self._facts)

    def naming_set_aside(self, err: InputError) -> InputError:
        """`err` about the assembled series, naming the files set aside as other series: a
        file whose Series Instance UID is damaged looks like a series of its own, and the
        series it left may then fail for lack of slices."""
        if not self._aside:
            return err
        shown = ", ".join(str(n) for n in self._aside[:MAX_REPORTED])
        more = (
            f" and {len(self._aside) - MAX_REPORTED} more"
            if len(self._aside) > MAX_REPORTED
            else ""
        )
        return type(err)(
            f"{err.problem} (file {shown}{more} of the scan belong to other series of the study "
            f"and were set aside)",
            source=err.source,
            attribute=err.attribute,
        )

    def select(self) -> Selection | None:
        """The choice once every file is in: None for a one-series scan without localizers;
        raises `SeriesSwitch` when another series than the assembled one is chosen."""
        if not self._facts:
            return None
        if self._uid is None and self._first_companion is not None:
            # No CT image at all: the first file's own error, naming it and its SOP class.
            first = self._first_companion
            read_ct_slice(first.data, source=describe_source(first.number, first.name or None))
        if self._uid is not None and len(self._facts) <= 1:
            images = self._facts.get(self._uid, [])
            localizers = sum(1 for f in images if f.localizer)
            if not localizers or localizers == len(images):
                return None
            facts = SeriesFacts.of(pseudonym(self._uid), images)
            note = f"{localizers} localizer image(s) in the series dropped"
            return Selection(facts, "the only series of the scan", (), (note,))
        keys = {uid: pseudonym(uid) for uid in self._facts}
        selection = choose([SeriesFacts.of(keys[uid], f) for uid, f in self._facts.items()])
        if selection.chosen is None:
            raise EmptySeriesError(f"{selection.explain()}")
        chosen = next(uid for uid, key in keys.items() if key == selection.chosen.key)
        if chosen != self._uid:
            raise SeriesSwitch(tuple(self._kept.get(chosen, ())), selection)
        return selection
