"""Which series of a study to analyse: the rules, in one place for the client and the gateway.

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

Pure Python on header values: the client reads them from files (client/series_choice.py), the
gateway from the data sets it receives (gateway/series.py). Series are named by number and a
keyed pseudonym the caller supplies, never by UID.
"""

from __future__ import annotations

import math
from collections import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

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
_KERNEL_RANK: Final = {"lung": 0, "unknown": 1, "soft": 2, "bone": 3}

# The skip reasons, word for word (tests and docs quote them).
NOT_CT: Final = "not CT Image Storage (a dose report, secondary capture or other object)"
LOCALIZERS_ONLY: Final = "localizer images only"
NOT_ORIGINAL: Final = "not ORIGINAL images (derived or secondary)"
NOT_AXIAL: Final = "not axial"


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


def is_localizer(image_type: Sequence[str]) -> bool:
    """A localizer (scout, topogram): CT Image Type value 3 is LOCALIZER (PS3.3 C.8.2.1.1.1)."""
    values = [str(v).strip().upper() for v in image_type]
    return len(values) >= 3 and values[2] == "LOCALIZER"


@dataclass(frozen=True)
class ImageFacts:
    """What the rules read of one instance's header (no identifier)."""

    sop_class: str
    image_type: tuple[str, ...] = ()
    orientation: tuple[float, ...] = ()
    position: tuple[float, ...] = ()
    thickness_mm: float | None = None
    kernel: str = ""
    series_number: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_type", tuple(str(v).upper() for v in self.image_type))
        object.__setattr__(self, "orientation", tuple(float(v) for v in self.orientation))
        object.__setattr__(self, "position", tuple(float(v) for v in self.position))

    @classmethod
    def from_header(cls, header: Any) -> ImageFacts:
        """From a pydicom data set (or anything with its `get`), tolerating odd values: an
        attribute that does not read or convert counts as absent (validation names it later,
        if the file is analysed at all)."""

        def get(keyword: str) -> Any:
            try:
                return header.get(keyword)
            except Exception:  # whatever a malformed element raises when converted
                return None

        def number(value: Any) -> float | None:
            try:
                result = None if value in (None, "") else float(value)
            except (TypeError, ValueError, OverflowError):
                return None
            return result if result is None or math.isfinite(result) else None

        def numbers(value: Any) -> tuple[float, ...]:
            try:
                result = tuple(float(v) for v in (value or ()))
            except (TypeError, ValueError, OverflowError):
                return ()
            return result if all(math.isfinite(v) for v in result) else ()

        def text(value: Any) -> str:
            # A fuzzed or damaged element may read as a sequence whose items fail to convert
            # only when printed: only plain values and multi-values of them are read as text.
            if isinstance(value, (str, int, float)):
                return str(value)
            if isinstance(value, abc.Sequence):  # a multi-valued element (MultiValue)
                items = list(value)
                if all(isinstance(item, (str, int, float)) for item in items):
                    return "\\".join(str(item) for item in items)
            return ""

        series_number = number(get("SeriesNumber"))
        image_type = get("ImageType") or ()
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        try:
            image_types = tuple(text(v) for v in image_type)
        except Exception:  # not iterable, or an item that fails to convert
            image_types = ()
        return cls(
            sop_class=text(get("SOPClassUID") or ""),
            image_type=image_types,
            orientation=numbers(get("ImageOrientationPatient")),
            position=numbers(get("ImagePositionPatient")),
            thickness_mm=number(get("SliceThickness")),
            kernel=text(get("ConvolutionKernel") or ""),
            series_number=None if series_number is None else int(series_number),
        )

    @property
    def localizer(self) -> bool:
        return is_localizer(self.image_type)


@dataclass(frozen=True)
class SeriesFacts:
    """One series as the rules see it: from its first image and the spread of its positions."""

    key: str
    number: int | None
    images: int
    localizers: int
    sop_class: str
    original: bool
    axial: bool
    thickness_mm: float | None
    coverage_mm: float
    kernel: str

    @classmethod
    def of(cls, key: str, images: Sequence[ImageFacts]) -> SeriesFacts:
        """Summarise the images of one series (`key`: its pseudonym)."""
        if not images:
            raise ValueError("a series has at least one image")
        first = images[0]
        kept = [i for i in images if not i.localizer]
        base = kept[0] if kept else first
        axial = False
        positions: list[float] = []
        if kept and len(kept[0].orientation) == 6:
            row, col = kept[0].orientation[:3], kept[0].orientation[3:]
            normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
                      row[0] * col[1] - row[1] * col[0])  # fmt: skip
            length = math.sqrt(sum(v * v for v in normal)) or 1.0
            axial = abs(normal[2]) / length >= AXIAL_MIN_COSINE
            positions = [
                sum(p * n for p, n in zip(i.position, normal, strict=True)) / length
                for i in kept
                if len(i.position) == 3
            ]
        return cls(
            key=key,
            number=first.series_number,
            images=len(kept),
            localizers=len(images) - len(kept),
            sop_class=first.sop_class,
            # A series without ImageType is taken as original: only DERIVED/SECONDARY skips it.
            original=not base.image_type or base.image_type[0] == "ORIGINAL",
            axial=axial,
            thickness_mm=base.thickness_mm if kept else None,
            coverage_mm=(max(positions) - min(positions)) if len(positions) > 1 else 0.0,
            kernel=base.kernel,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "series": self.key,
            "number": self.number,
            "images": self.images,
            "slice_thickness_mm": (
                None if self.thickness_mm is None else round(self.thickness_mm, 4)
            ),
            "coverage_mm": round(self.coverage_mm, 1),
            "kernel": kernel_family(self.kernel),
        }


@dataclass(frozen=True)
class Selection:
    """The series to analyse (None when none qualifies), why, and why not each other one."""

    chosen: SeriesFacts | None
    reason: str
    skipped: tuple[tuple[SeriesFacts, str], ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysed": None if self.chosen is None else self.chosen.to_dict(),
            "reason": self.reason,
            "notes": list(self.notes),
            "skipped": [{**c.to_dict(), "reason": why} for c, why in self.skipped],
        }

    def explain(self) -> str:
        """One line naming why nothing qualifies (for an error) or what was chosen."""
        if self.chosen is None:
            reasons = "; ".join(f"series {c.number}: {why}" for c, why in self.skipped)
            return f"no series to analyse ({reasons})"
        return f"series {self.chosen.number} chosen: {self.reason}"


def why_not(candidate: SeriesFacts) -> str | None:
    """Why a series can never be analysed (rules 1-3), None when it can."""
    if candidate.sop_class != CT_IMAGE_STORAGE:
        return NOT_CT
    if not candidate.images:
        return LOCALIZERS_ONLY
    if not candidate.original:
        return NOT_ORIGINAL
    if not candidate.axial:
        return NOT_AXIAL
    return None


def _too_short(candidate: SeriesFacts, min_slices: int, min_coverage_mm: float) -> str | None:
    if candidate.images < min_slices or candidate.coverage_mm < min_coverage_mm:
        return (
            f"too short to cover the lungs ({candidate.images} slices over "
            f"{candidate.coverage_mm:.0f} mm; at least {min_slices} over {min_coverage_mm:.0f})"
        )
    return None


def _distance(thickness: float | None, low: float, high: float) -> float:
    if thickness is None:
        return math.inf
    return max(low - thickness, 0.0, thickness - high)


def choose(
    candidates: Sequence[SeriesFacts],
    *,
    thickness_mm: tuple[float, float] = MODEL_THICKNESS_MM,
    min_slices: int = MIN_SLICES,
    min_coverage_mm: float = MIN_COVERAGE_MM,
) -> Selection:
    """Pick one series of `candidates` by the module's rules."""
    skipped: list[tuple[SeriesFacts, str]] = []
    eligible: list[SeriesFacts] = []
    for candidate in candidates:
        why = why_not(candidate)
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
        return Selection(None, "no series qualifies", tuple(skipped))
    low, high = thickness_mm

    def rank(c: SeriesFacts) -> tuple[float, int, int]:
        return (_distance(c.thickness_mm, low, high), _KERNEL_RANK[kernel_family(c.kernel)],
                -c.images)  # fmt: skip

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
        f"axial ORIGINAL CT, {chosen.images} slices over {chosen.coverage_mm:.0f} mm, "
        f"thickness {chosen.thickness_mm} mm, {kernel_family(chosen.kernel)} kernel"
    )
    if len(eligible) > 1:
        reason += f"; the best of {len(eligible)} eligible series"
    notes: tuple[str, ...] = ()
    if chosen.localizers:
        notes = (f"{chosen.localizers} localizer image(s) in the series dropped",)
    return Selection(chosen, reason, tuple(skipped), notes)


__all__ = [
    "CT_IMAGE_STORAGE",
    "ImageFacts",
    "Selection",
    "SeriesFacts",
    "choose",
    "is_localizer",
    "kernel_family",
    "why_not",
]
