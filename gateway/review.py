"""When a result should not be trusted: the "needs review" flag and the reasons behind it.

Every signal needs no ground truth: only the scan, the model's calibrated probabilities, its
lesion map and the gateway's own lung segmentation. The label never changes (it stays one of
covid19, cap, normal); a result that trips any rule carries `review.needed = True` and the
codes of the rules it tripped. docs/review.md lists each rule, its threshold and how often it
fired (bench/review_flags.py measures it; thresholds come from the training family's
validation split, never from the held-out family).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ctjoint.contracts import CLASS_NAMES, CLASS_NORMAL, MODEL_BOTH

NORMAL: Final = CLASS_NAMES[CLASS_NORMAL]

# Reason codes (stable: clients and the SR read them).
LOW_CONFIDENCE: Final = "low_confidence"
LESION_OUTSIDE_LUNGS: Final = "lesion_outside_lungs"
LESION_AT_HEART_OR_DIAPHRAGM: Final = "lesion_at_heart_or_diaphragm"
LESION_BURDEN_SMALL: Final = "lesion_burden_small"
LUNGS_NOT_FOUND: Final = "lungs_not_found"
LUNG_VOLUME_IMPLAUSIBLE: Final = "lung_volume_implausible"
COVERAGE_CUT: Final = "coverage_cut"
THICK_SLICES: Final = "thick_slices"
MODELS_DISAGREE: Final = "models_disagree"
# Reasons that question one label (an abnormal one's lesions, a normal one's coverage).
LABEL_DEPENDENT: Final = frozenset(
    {LESION_OUTSIDE_LUNGS, LESION_AT_HEART_OR_DIAPHRAGM, LESION_BURDEN_SMALL, COVERAGE_CUT}
)
REASONS: Final = (
    LOW_CONFIDENCE,
    LESION_OUTSIDE_LUNGS,
    LESION_AT_HEART_OR_DIAPHRAGM,
    LUNGS_NOT_FOUND,
    LUNG_VOLUME_IMPLAUSIBLE,
    COVERAGE_CUT,
    THICK_SLICES,
    MODELS_DISAGREE,
    LESION_BURDEN_SMALL,
)


@dataclass(frozen=True)
class ReviewPolicy:
    """The thresholds of every rule: the values bench/review_flags.py chose on the training
    family's validation phantoms for the bundled weights (docs/review.md: how, and how often
    each rule fired). New weights: rerun it and copy what it chose."""

    # Calibrated probability of the label below which a result is flagged, per model, and for
    # the fused answer of `--model both` (its mean probability): the operating points chosen
    # on the training family's validation split.
    min_confidence: Mapping[str, float] = field(
        default_factory=lambda: {"jcs2d": 0.923, "deepsc3d": 0.982, MODEL_BOTH: 0.959}
    )
    # Lesion location rules apply from this much lesion on (a few voxels say nothing).
    min_lesion_ml: float = 1.0
    # Fraction of the lesion volume outside the lungs and not between them (chest wall, body
    # outside the thorax, air outside the body).
    max_outside_fraction: float = 0.92
    # Fraction of the lesion volume between the lungs (heart, mediastinum, diaphragm domes).
    max_between_fraction: float = 0.46
    # An abnormal label resting on less lesion than this (mL). Set by hand, not chosen on
    # validation (right abnormal validation answers carry 50 mL and more; docs/review.md).
    min_abnormal_lesion_ml: float = 10.0
    # Both lungs together, lesions included (mL).
    min_lung_ml: float = 200.0
    plausible_lung_ml: tuple[float, float] = (1420.0, 10000.0)
    # Lung area on the first or last slice as a fraction of the largest slice's: a lung that
    # is still wide at an end of the series was cut off there.
    max_end_lung_fraction: float = 0.21
    # Thickest slices (spacing or stated thickness, mm) of the training data.
    max_slice_mm: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_confidence", dict(self.min_confidence))
        low, high = self.plausible_lung_ml
        if not 0 < low < high:
            raise ValueError(f"plausible lung volumes {self.plausible_lung_ml} are not a range")

    def confidence_for(self, model: str) -> float:
        return float(self.min_confidence.get(model, max(self.min_confidence.values(), default=0)))


DEFAULT_POLICY: Final = ReviewPolicy()


@dataclass(frozen=True)
class ReviewSignals:
    """What the rules look at, measured on one result (none of it needs ground truth)."""

    confidence: float
    lesion_ml: float
    outside_fraction: float
    between_fraction: float
    lung_ml: float
    first_slice_lung_fraction: float
    last_slice_lung_fraction: float
    slice_mm: float

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Review:
    """Whether a person should look before anyone trusts the label, and why (codes in REASONS,
    `details` one sentence per reason, same order)."""

    needed: bool = False
    reasons: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    signals: ReviewSignals | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", tuple(self.reasons))
        object.__setattr__(self, "details", tuple(self.details))
        unknown = [r for r in self.reasons if r not in REASONS]
        if unknown:
            raise ValueError(f"unknown review reasons {unknown}; expected some of {REASONS}")
        if len(self.details) not in (0, len(self.reasons)):
            raise ValueError("review details are one per reason")
        if bool(self.needed) != bool(self.reasons):
            raise ValueError("a review is needed exactly when there is a reason")
        object.__setattr__(self, "needed", bool(self.needed))

    @classmethod
    def of(cls, found: Sequence[tuple[str, str]], signals: ReviewSignals | None = None) -> Review:
        """From (code, detail) pairs, first occurrence of a code kept, in REASONS order."""
        first: dict[str, str] = {}
        for code, detail in found:
            first.setdefault(code, detail)
        codes = [code for code in REASONS if code in first]
        return cls(
            needed=bool(codes),
            reasons=tuple(codes),
            details=tuple(first[c] for c in codes),
            signals=signals,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "needed": self.needed,
            "reasons": list(self.reasons),
            "details": list(self.details),
            "signals": None if self.signals is None else self.signals.to_dict(),
        }

    @property
    def caption(self) -> str:
        """One line for the overlay: "REVIEW - LOW CONFIDENCE - THICK SLICES" or "NO REVIEW
        FLAG"."""
        if not self.needed:
            return "NO REVIEW FLAG"
        return " - ".join(["REVIEW", *(r.replace("_", " ").upper() for r in self.reasons)])


def location_fractions(label_map: np.ndarray, air_lungs: np.ndarray) -> tuple[float, float, int]:
    """(outside, between, lesion voxels): the fractions of lesion voxels outside the lungs and
    not between them, and between the lungs (outside them, on an image row with the right lung
    on one side and the left lung on the other: heart, mediastinum, great vessels).

    `air_lungs` is the gateway's lung segmentation before lesions are added (0 outside,
    1 right, 2 left; holes filled per slice, so a consolidation surrounded by aerated lung
    counts as lung). The rule is `lesion_location`'s, on every lesion voxel of `label_map`.
    """
    return lesion_location(air_lungs, *np.nonzero(label_map))


def lesion_location(
    air_lungs: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray
) -> tuple[float, float, int]:
    """`location_fractions` of the lesion voxels at (z, y, x), each given once.

    A voxel outside the lungs is between them when, on its image row, the last pixel of one
    lung lies before it and the first pixel of the other after it: each row is decided on its
    own, so only the rows holding lesion voxels outside the lungs are read (a 400-slice
    scan's lesions: 0.73 s for the rule over every lesion slice, a few ms for their rows).
    """
    total = int(z.size)
    if total == 0:
        return 0.0, 0.0, 0
    outside = air_lungs[z, y, x] == 0
    oz, oy, ox = z[outside], y[outside], x[outside]
    between = between_lungs(air_lungs, oz, oy, ox)
    n_between = int(np.count_nonzero(between))
    n_outside = int(oz.size) - n_between
    return n_outside / total, n_between / total, total


def between_lungs(air_lungs: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """For voxels (z, y, x) outside the lungs: whether each lies between them, the last pixel
    of one lung before it and the first of the other after it on its image row (only the
    rows these voxels are on are read)."""
    rows, which = np.unique(z.astype(np.intp) * air_lungs.shape[1] + y, return_inverse=True)
    first_right, last_right, first_left, last_left = _row_extents(
        air_lungs, *np.divmod(rows, air_lungs.shape[1])
    )
    # A row without one of the lungs has first -1 and last past the row: nothing between.
    result: np.ndarray = ((last_right[which] < x) & (x < first_left[which])) | (
        (last_left[which] < x) & (x < first_right[which])
    )
    return result


def _row_extents(air_lungs: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[4, rows]: the first and the last column of the right lung (1), then of the left
    lung (2), on each image row (z, y); -1 and the row's width for a lung not on the row."""
    width = air_lungs.shape[2]
    out = np.empty((4, z.size), dtype=np.intp)
    for start in range(0, z.size, _LOCATION_ROWS):
        part = slice(start, start + _LOCATION_ROWS)
        lines = air_lungs[z[part], y[part]]
        for i, side in enumerate((1, 2)):
            on = lines == side
            found = on.any(axis=1)
            out[2 * i, part] = np.where(found, on.argmax(axis=1), -1)
            out[2 * i + 1, part] = np.where(found, width - 1 - on[:, ::-1].argmax(axis=1), width)
    return out


# Image rows `_row_extents` reads at once (half a MB at 512 columns).
_LOCATION_ROWS = 1024


def end_slice_fractions(lung_map: np.ndarray) -> tuple[float, float]:
    """Lung area of the first and the last slice, each over the largest slice's lung area."""
    # A few slices at a time: count_nonzero over axes makes a boolean copy of what it counts.
    per_slice = np.zeros(lung_map.shape[0], dtype=np.int64)
    for start in range(0, lung_map.shape[0], _COUNT_SLICES):
        part = lung_map[start : start + _COUNT_SLICES]
        per_slice[start : start + _COUNT_SLICES] = np.count_nonzero(part, axis=(1, 2))
    return end_fractions(per_slice)


# Slices `end_slice_fractions` counts at once.
_COUNT_SLICES = 16


def end_fractions(slice_voxels: np.ndarray) -> tuple[float, float]:
    """`end_slice_fractions` from the lung voxels of each slice."""
    peak = int(slice_voxels.max()) if slice_voxels.size else 0
    if peak == 0:
        return 0.0, 0.0
    return float(slice_voxels[0]) / peak, float(slice_voxels[-1]) / peak


def measure(
    *,
    label: str,
    probabilities: Mapping[str, float],
    location: tuple[float, float, int],
    slice_lung_voxels: np.ndarray,
    voxel_ml: float,
    spacing_mm: Sequence[float],
    slice_thickness_mm: float | None,
) -> ReviewSignals:
    """The signals of one analysed scan, from what the quantifier counted: the lesions'
    `location_fractions` and the lung map's voxels per slice (lesions included)."""
    outside, between, voxels = location
    first, last = end_fractions(slice_lung_voxels)
    slice_mm = max(float(spacing_mm[0]), float(slice_thickness_mm or 0.0))
    return ReviewSignals(
        confidence=float(probabilities[label]),
        lesion_ml=voxels * voxel_ml,
        outside_fraction=outside,
        between_fraction=between,
        lung_ml=int(slice_lung_voxels.sum()) * voxel_ml,
        first_slice_lung_fraction=first,
        last_slice_lung_fraction=last,
        slice_mm=slice_mm,
    )


def review_of(
    signals: ReviewSignals,
    model: str,
    policy: ReviewPolicy = DEFAULT_POLICY,
    *,
    label: str | None = None,
) -> Review:
    """Apply the policy's rules to one model's signals. The lesion location and burden rules
    question what supports an abnormal label: they are skipped when `label` is "normal" (the
    burden rule also when it is unknown); a series cut inside the lungs questions what a
    normal label asserts: it is skipped for the others."""
    found: list[tuple[str, str]] = []
    floor = policy.confidence_for(model)
    if signals.confidence < floor:
        found.append(
            (
                LOW_CONFIDENCE,
                f"p = {signals.confidence:.3f} for the label, below the operating point "
                f"{floor:g} of {model}",
            )
        )
    if signals.lesion_ml >= policy.min_lesion_ml and label != NORMAL:
        if signals.outside_fraction > policy.max_outside_fraction:
            found.append(
                (
                    LESION_OUTSIDE_LUNGS,
                    f"{signals.outside_fraction:.0%} of {signals.lesion_ml:.1f} mL of lesion lies "
                    f"outside the lungs (limit {policy.max_outside_fraction:.0%})",
                )
            )
        if signals.between_fraction > policy.max_between_fraction:
            found.append(
                (
                    LESION_AT_HEART_OR_DIAPHRAGM,
                    f"{signals.between_fraction:.0%} of {signals.lesion_ml:.1f} mL of lesion lies "
                    "between the lungs (heart, mediastinum or diaphragm; limit "
                    f"{policy.max_between_fraction:.0%})",
                )
            )
    if label not in (None, NORMAL) and signals.lesion_ml < policy.min_abnormal_lesion_ml:
        found.append(
            (
                LESION_BURDEN_SMALL,
                f"{signals.lesion_ml:.1f} mL of lesion for an abnormal label (at least "
                f"{policy.min_abnormal_lesion_ml:g} mL)",
            )
        )
    low, high = policy.plausible_lung_ml
    if signals.lung_ml < policy.min_lung_ml:
        found.append(
            (
                LUNGS_NOT_FOUND,
                f"lungs of {signals.lung_ml:.0f} mL found (at least {policy.min_lung_ml:g} mL)",
            )
        )
    elif not low <= signals.lung_ml <= high:
        found.append(
            (
                LUNG_VOLUME_IMPLAUSIBLE,
                f"lungs of {signals.lung_ml:.0f} mL, outside {low:g}-{high:g} mL",
            )
        )
    ends = max(signals.first_slice_lung_fraction, signals.last_slice_lung_fraction)
    # Lung left out of the series can hide lesions, so it questions a normal label (or an
    # unknown one); a finding in the lung that was scanned stands whatever the rest holds.
    cut = signals.lung_ml >= policy.min_lung_ml and ends > policy.max_end_lung_fraction
    if cut and label in (None, NORMAL):
        which = (
            "first"
            if signals.first_slice_lung_fraction >= signals.last_slice_lung_fraction
            else "last"
        )
        found.append(
            (
                COVERAGE_CUT,
                f"the {which} slice still holds {ends:.0%} of the widest lung slice: the series "
                f"ends inside the lungs (limit {policy.max_end_lung_fraction:.0%})",
            )
        )
    if signals.slice_mm > policy.max_slice_mm:
        found.append(
            (
                THICK_SLICES,
                f"slices of {signals.slice_mm:g} mm, thicker than the {policy.max_slice_mm:g} mm "
                "the models were trained on",
            )
        )
    return Review.of(found, signals)


def disagreement(labels: Mapping[str, str]) -> Review:
    """The `models_disagree` reason when the networks run on one scan gave different labels."""
    if len(set(labels.values())) <= 1:
        return Review()
    said = ", ".join(f"{model} {label}" for model, label in labels.items())
    return Review.of([(MODELS_DISAGREE, f"the networks disagree: {said}")])


def fused_review(
    members: Mapping[str, tuple[str, Review]],
    confidence: float,
    policy: ReviewPolicy = DEFAULT_POLICY,
    *,
    label: str | None = None,
) -> Review:
    """The review of the fused answer of several networks on one scan (`members`: each
    network's (label, review)): every member's reasons but its own low confidence, plus
    `low_confidence` when the fused probability of the fused label (the members' mean) is under
    the fused operating point, plus `models_disagree`.

    The fused label is what the user reads, so its own probability is what may be too low: a
    network that hesitates where the other is sure and agrees moves the mean, not the label.
    Likewise a member whose label is not the fused `label` keeps only the reasons that hold
    whatever the label (lungs, slices): its lesion and coverage reasons questioned an answer
    the fused one is not, and `models_disagree` says it disagreed. Each member keeps its own
    review (with its own low confidence) in `members`.
    """
    pairs = [
        (code, r.details[i] if r.details else "")
        for said, r in members.values()
        for i, code in enumerate(r.reasons)
        if code != LOW_CONFIDENCE
        and (label is None or said == label or code not in LABEL_DEPENDENT)
    ]
    floor = policy.confidence_for(MODEL_BOTH)
    if confidence < floor:
        pairs.append(
            (
                LOW_CONFIDENCE,
                f"p = {confidence:.3f} for the fused label, below the operating point {floor:g} "
                "of the fused answer",
            )
        )
    disagree = disagreement({model: said for model, (said, _) in members.items()})
    pairs += zip(disagree.reasons, disagree.details, strict=True)
    return Review.of(pairs)


__all__ = [
    "DEFAULT_POLICY",
    "REASONS",
    "Review",
    "ReviewPolicy",
    "ReviewSignals",
    "between_lungs",
    "disagreement",
    "end_fractions",
    "end_slice_fractions",
    "fused_review",
    "lesion_location",
    "location_fractions",
    "measure",
    "review_of",
]
