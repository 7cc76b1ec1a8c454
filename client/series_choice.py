"""Which series of a study to analyse, when a folder holds several (issue 19).

A scanner or PACS often sends a whole study: a localizer, a dose report, reconstructions in a
lung and a soft-tissue or bone kernel, thin and thick. The rules, in order (documented in
docs/interoperability.md):

1. Only CT Image Storage; other SOP classes (dose reports, secondary captures) are skipped.
2. Only ORIGINAL images, and no series made of localizers; a localizer image inside the chosen
   series is dropped with a note.
3. Only axial series (the slice normal within about 25 degrees of the patient's long axis).
4. Series that cover the lungs (at least `min_slices` slices spanning `min_coverage_mm`) before
   those that do not; a short series is analysed only when no series covers the lungs (the
   gateway then flags the cut coverage for review).
5. Among the rest: slice thickness closest to the model's range (`thickness_mm`), then a lung
   kernel before an unknown, soft-tissue or bone one, then more slices.

The choice names series by number and a keyed pseudonym of their UID, never the UID itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.errors import InvalidDicomError

from ctjoint.client.listen import series_key

CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
# What the bundled models were trained on (export/phantom.py's scanner presets).
MODEL_THICKNESS_MM: Final = (1.0, 5.0)
# A chest CT spans 250-300 mm; these floors keep partial and scout-like series out.
MIN_SLICES: Final = 20
MIN_COVERAGE_MM: Final = 100.0
# |cos| of the angle between the slice normal and the patient's z axis.
AXIAL_MIN_COSINE: Final = 0.9
# Convolution kernel names by family (common vendor names; an unknown one ranks between).
_LUNG_KERNELS: Final = ("LUNG", "B60", "B70", "BR60", "BL57", "I70", "YA", "YB", "FC51", "FC52",
                        "FC55", "FC56", "FC83", "FC86")  # fmt: skip
_SOFT_KERNELS: Final = ("SOFT", "STANDARD", "STND", "B30", "B31", "BR40", "I30", "FC07", "FC08",
                        "FC17", "MEDIASTIN")  # fmt: skip
_BONE_KERNELS: Final = ("BONE", "B80", "BR64", "I80", "FC30", "FC35")


def kernel_family(kernel: str) -> str:
    """ "lung", "soft", "bone" or "unknown" for a ConvolutionKernel value."""
    name = kernel.upper()
    for family, names in (
        ("lung", _LUNG_KERNELS),
        ("bone", _BONE_KERNELS),
        ("soft", _SOFT_KERNELS),
    ):
        if any(part in name for part in names):
            return family
    return "unknown"


_KERNEL_RANK: Final = {"lung": 0, "unknown": 1, "soft": 2, "bone": 3}


@dataclass(frozen=True)
class SeriesCandidate:
    """One series of the folder, as read from its headers (no UID kept)."""

    key: str
    number: int | None
    files: tuple[Path, ...]
    localizers: tuple[Path, ...]
    sop_class: str
    original: bool
    axial: bool
    thickness_mm: float | None
    coverage_mm: float
    kernel: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "series": self.key,
            "number": self.number,
            "images": len(self.files),
            "slice_thickness_mm": self.thickness_mm,
            "coverage_mm": round(self.coverage_mm, 1),
            "kernel": kernel_family(self.kernel),
        }


@dataclass(frozen=True)
class SeriesChoice:
    """The series to send (None when no series qualifies), why, and why not the others."""

    chosen: SeriesCandidate | None
    reason: str
    skipped: tuple[tuple[SeriesCandidate, str], ...] = ()
    unreadable: int = 0
    notes: tuple[str, ...] = field(default=())
    series_count: int = 0

    @property
    def files(self) -> tuple[Path, ...]:
        return self.chosen.files if self.chosen is not None else ()

    @property
    def several(self) -> bool:
        """More than one series in the folder: the choice decides what is sent."""
        return self.series_count > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysed": None if self.chosen is None else self.chosen.to_dict(),
            "reason": self.reason,
            "notes": list(self.notes),
            "skipped": [{**c.to_dict(), "reason": why} for c, why in self.skipped],
            "unreadable_files": self.unreadable,
        }


def _read(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None


def _candidate(uid: str, items: list[tuple[Path, pydicom.Dataset]]) -> SeriesCandidate:
    first = items[0][1]
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    localizers = tuple(
        p for p, ds in items if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]
    )
    images = [(p, ds) for p, ds in items if p not in localizers]
    axial = False
    positions: list[float] = []
    if images:
        orientation = [float(v) for v in (images[0][1].get("ImageOrientationPatient") or [])]
        if len(orientation) == 6:
            row, col = orientation[:3], orientation[3:]
            normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
                      row[0] * col[1] - row[1] * col[0])  # fmt: skip
            length = math.sqrt(sum(v * v for v in normal)) or 1.0
            axial = abs(normal[2]) / length >= AXIAL_MIN_COSINE
            for _, ds in images:
                position = ds.get("ImagePositionPatient")
                if position is not None and len(position) == 3:
                    positions.append(
                        sum(float(p) * n for p, n in zip(position, normal, strict=True)) / length
                    )
    thickness = images[0][1].get("SliceThickness") if images else None
    number = first.get("SeriesNumber")
    return SeriesCandidate(
        key=series_key(uid),
        number=int(number) if number not in (None, "") else None,
        files=tuple(p for p, _ in images),
        localizers=localizers,
        sop_class=str(first.get("SOPClassUID", "")),
        # A series without ImageType is taken as original: only DERIVED/SECONDARY skips it.
        original=not image_type or image_type[0] == "ORIGINAL",
        axial=axial,
        thickness_mm=float(thickness) if thickness not in (None, "") else None,
        coverage_mm=(max(positions) - min(positions)) if len(positions) > 1 else 0.0,
        kernel=str(first.get("ConvolutionKernel", "") or ""),
    )


def _why_not(candidate: SeriesCandidate) -> str | None:
    if candidate.sop_class != CT_IMAGE_STORAGE:
        return "not CT Image Storage (a dose report, secondary capture or other object)"
    if not candidate.files:
        return "localizer images only"
    if not candidate.original:
        return "not ORIGINAL images (derived or secondary)"
    if not candidate.axial:
        return "not axial"
    return None


def _too_short(candidate: SeriesCandidate, min_slices: int, min_coverage_mm: float) -> str | None:
    if len(candidate.files) < min_slices or candidate.coverage_mm < min_coverage_mm:
        return (
            f"too short to cover the lungs ({len(candidate.files)} slices over "
            f"{candidate.coverage_mm:.0f} mm; at least {min_slices} over {min_coverage_mm:.0f})"
        )
    return None


def _distance(thickness: float | None, low: float, high: float) -> float:
    if thickness is None:
        return math.inf
    return max(low - thickness, 0.0, thickness - high)


def choose_series(
    files: Sequence[Path],
    *,
    thickness_mm: tuple[float, float] = MODEL_THICKNESS_MM,
    min_slices: int = MIN_SLICES,
    min_coverage_mm: float = MIN_COVERAGE_MM,
) -> SeriesChoice:
    """Group `files` by series and pick one by the module's rules."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    unreadable = 0
    for path in files:
        dataset = _read(path)
        uid = str(dataset.get("SeriesInstanceUID", "") or "") if dataset is not None else ""
        if dataset is None or not uid:
            unreadable += 1
            continue
        groups.setdefault(uid, []).append((path, dataset))
    candidates = [_candidate(uid, items) for uid, items in groups.items()]
    skipped: list[tuple[SeriesCandidate, str]] = []
    eligible: list[SeriesCandidate] = []
    for candidate in candidates:
        why = _why_not(candidate)
        if why is None:
            eligible.append(candidate)
        else:
            skipped.append((candidate, why))
    covering = [c for c in eligible if _too_short(c, min_slices, min_coverage_mm) is None]
    if covering:
        for candidate in eligible:
            short = _too_short(candidate, min_slices, min_coverage_mm)
            if short is not None:
                skipped.append((candidate, short))
        eligible = covering
    if not eligible:
        return SeriesChoice(
            None, "no series qualifies", tuple(skipped), unreadable, (), len(groups)
        )
    low, high = thickness_mm

    def rank(c: SeriesCandidate) -> tuple[float, int, int]:
        return (_distance(c.thickness_mm, low, high), _KERNEL_RANK[kernel_family(c.kernel)],
                -len(c.files))  # fmt: skip

    eligible.sort(key=rank)
    chosen = eligible[0]
    for other in eligible[1:]:
        if _distance(other.thickness_mm, low, high) > _distance(chosen.thickness_mm, low, high):
            why = f"slice thickness {other.thickness_mm} mm is further from {low}-{high} mm"
        elif _KERNEL_RANK[kernel_family(other.kernel)] > _KERNEL_RANK[kernel_family(chosen.kernel)]:
            why = f"{kernel_family(other.kernel)} kernel; a lung kernel is preferred"
        else:
            why = "fewer slices than the chosen series"
        skipped.append((other, why))
    reason = (
        f"axial ORIGINAL CT, {len(chosen.files)} slices over {chosen.coverage_mm:.0f} mm, "
        f"thickness {chosen.thickness_mm} mm, {kernel_family(chosen.kernel)} kernel"
    )
    if len(eligible) > 1:
        reason += f"; the best of {len(eligible)} eligible series"
    notes: tuple[str, ...] = ()
    if chosen.localizers:
        notes = (f"{len(chosen.localizers)} localizer image(s) in the series dropped",)
    return SeriesChoice(chosen, reason, tuple(skipped), unreadable, notes, len(groups))


__all__ = ["SeriesCandidate", "SeriesChoice", "choose_series", "kernel_family"]
