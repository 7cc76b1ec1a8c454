"""The scan result: what one analysed series comes back as (CLI JSON, gRPC answer, client).

Frozen dataclasses normalised in `__post_init__`; `ScanResult.to_dict()` is JSON-ready and is
the format `ctjoint analyze --json` writes and the client renders, made by the one result
encoder (ctjoint/result_json.py). Holds no patient identifier and no UID.
Slice order everywhere is the assembled order: ascending along the slice normal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctjoint.contracts import CLASS_NAMES, LESION_CLASS_NAMES
from ctjoint.gateway.review import Review
from ctjoint.gateway.wire import result_to_proto
from ctjoint.result_json import result_dict
from ctjoint.series_rules import Selection


@dataclass(frozen=True)
class SeriesInfo:
    """Geometry of the analysed series (no identifiers)."""

    slices: int
    rows: int
    columns: int
    spacing_mm: tuple[float, float, float]  # (between slices, between rows, between columns)
    slice_thickness_mm: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))


@dataclass(frozen=True)
class LesionStatistics:
    """Lesion voxels per lesion class on the source grid, their volume, and per-slice areas.

    Volumes are voxel counts x voxel volume of the source series (spacing between slices x
    pixel spacing), in mL. `slice_pixels[name]` has one count per slice.
    """

    voxel_volume_ml: float
    voxels: Mapping[str, int]
    slice_pixels: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        voxels = {name: int(self.voxels.get(name, 0)) for name in LESION_CLASS_NAMES}
        slice_pixels = {
            name: tuple(int(v) for v in self.slice_pixels.get(name, ()))
            for name in LESION_CLASS_NAMES
        }
        object.__setattr__(self, "voxels", voxels)
        object.__setattr__(self, "slice_pixels", slice_pixels)
        object.__setattr__(self, "voxel_volume_ml", float(self.voxel_volume_ml))

    @property
    def volumes_ml(self) -> dict[str, float]:
        return {name: count * self.voxel_volume_ml for name, count in self.voxels.items()}

    @property
    def total_voxels(self) -> int:
        return sum(self.voxels.values())

    @property
    def total_volume_ml(self) -> float:
        return self.total_voxels * self.voxel_volume_ml


LUNG_SIDES = ("right", "left")
ZONE_NAMES = ("upper", "middle", "lower")


@dataclass(frozen=True)
class ZoneStatistics:
    """One cranio-caudal third of one lung: volumes, percent involved, severity score 0-5."""

    zone: str
    lung_volume_ml: float
    lesion_volume_ml: float
    percent_involved: float
    severity: int

    def __post_init__(self) -> None:
        if self.zone not in ZONE_NAMES:
            raise ValueError(f"zone {self.zone!r} is not one of {ZONE_NAMES}")
        for name in ("lung_volume_ml", "lesion_volume_ml", "percent_involved"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "severity", int(self.severity))


@dataclass(frozen=True)
class LungStatistics:
    """One lung: its volume (lesions included), lesion volume per class, percent involved."""

    side: str
    volume_ml: float
    lesion_volume_ml: Mapping[str, float]
    percent_involved: float
    zones: tuple[ZoneStatistics, ...]

    def __post_init__(self) -> None:
        if self.side not in LUNG_SIDES:
            raise ValueError(f"lung side {self.side!r} is not one of {LUNG_SIDES}")
        volumes = {name: float(self.lesion_volume_ml.get(name, 0.0)) for name in LESION_CLASS_NAMES}
        object.__setattr__(self, "lesion_volume_ml", volumes)
        object.__setattr__(self, "volume_ml", float(self.volume_ml))
        object.__setattr__(self, "percent_involved", float(self.percent_involved))
        object.__setattr__(self, "zones", tuple(self.zones))
        if tuple(z.zone for z in self.zones) != ZONE_NAMES:
            raise ValueError(f"a lung has the zones {ZONE_NAMES} in that order")

    @property
    def total_lesion_ml(self) -> float:
        return sum(self.lesion_volume_ml.values())


@dataclass(frozen=True)
class Quantification:
    """Lungs and lesion distribution (gateway/lesions.py documents every rule and threshold).

    `lungs` is (right, left); `peripheral_fraction` + `central_fraction` = 1 when there is any
    lesion (both 0 otherwise); the severity score is the sum over the six zones, 0-30.
    """

    lungs: tuple[LungStatistics, ...]
    bilateral: bool
    peripheral_fraction: float
    central_fraction: float
    method: str
    peripheral_rule: str
    severity_scale: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "lungs", tuple(self.lungs))
        if tuple(lung.side for lung in self.lungs) != LUNG_SIDES:
            raise ValueError(f"quantification has the lungs {LUNG_SIDES} in that order")
        object.__setattr__(self, "bilateral", bool(self.bilateral))
        object.__setattr__(self, "peripheral_fraction", float(self.peripheral_fraction))
        object.__setattr__(self, "central_fraction", float(self.central_fraction))

    def lung(self, side: str) -> LungStatistics:
        return self.lungs[LUNG_SIDES.index(side)]

    @property
    def severity_score(self) -> int:
        return sum(zone.severity for lung in self.lungs for zone in lung.zones)

    @property
    def distribution(self) -> str:
        """ "peripheral", "central" (the larger fraction) or "none" without lesions."""
        if self.peripheral_fraction == 0.0 and self.central_fraction == 0.0:
            return "none"
        return "peripheral" if self.peripheral_fraction >= self.central_fraction else "central"


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds per stage, each summed over its own work (not waits for a stream).

    `read`: each file parsed, checked as a CT image and decoded to HU; `validate`: the series
    checks and assembly (same series and geometry, sort along the normal, uniform spacing);
    `infer` includes `model`, the time inside the model itself summed over batches; `total` is
    wall time from the first file to the result (for a stream, including its waits).
    """

    read_ms: float = 0.0
    validate_ms: float = 0.0
    preprocess_ms: float = 0.0
    infer_ms: float = 0.0
    postprocess_ms: float = 0.0
    total_ms: float = 0.0
    model_ms: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "read_ms": round(self.read_ms, 3),
            "validate_ms": round(self.validate_ms, 3),
            "preprocess_ms": round(self.preprocess_ms, 3),
            "infer_ms": round(self.infer_ms, 3),
            "postprocess_ms": round(self.postprocess_ms, 3),
            "total_ms": round(self.total_ms, 3),
            "model_ms": round(self.model_ms, 3),
        }


@dataclass(frozen=True)
class ModelAnswer:
    """One network's own answer when several ran on the scan (`--model both`)."""

    model: str
    model_version: str
    label: str
    probabilities: Mapping[str, float]
    lesion_volume_ml: float
    review: Review = field(default_factory=Review)

    def __post_init__(self) -> None:
        if self.label not in CLASS_NAMES:
            raise ValueError(f"label {self.label!r} is not one of {CLASS_NAMES}")
        probabilities = {name: float(self.probabilities[name]) for name in CLASS_NAMES}
        object.__setattr__(self, "probabilities", probabilities)
        object.__setattr__(self, "lesion_volume_ml", float(self.lesion_volume_ml))


@dataclass(frozen=True)
class ScanResult:
    """The answer for one series: label, probabilities, evidence, lesions, provenance, timings."""

    label: str
    probabilities: Mapping[str, float]
    lesions: LesionStatistics
    series: SeriesInfo
    model: str
    model_version: str
    backend: str
    timings: StageTimings = field(default_factory=StageTimings)
    # Per slice, per class (2D model only; empty for the 3D model).
    slice_probabilities: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # Lungs and lesion distribution; None only for results built without a CT volume.
    quantification: Quantification | None = None
    # Whether a person should check the label before it is trusted, and why (gateway/review.py).
    review: Review = field(default_factory=Review)
    # SHA-256 of the weights that made it ("" where the backend cannot tell; "a + b" for both):
    # named in the SEG and SR; not in the JSON, which the gateway's answer must match.
    model_sha256: str = ""
    # Each network's own answer when several ran on the scan (empty for one network); the
    # label and probabilities above are then the fused ones (analysis.py `fuse_analyses`).
    members: tuple[ModelAnswer, ...] = ()
    # Which series was analysed and why, and each other one with why not, when the scan's
    # files held several series (or localizer images were dropped); None otherwise.
    series_selection: Selection | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        if self.label not in CLASS_NAMES:
            raise ValueError(f"label {self.label!r} is not one of {CLASS_NAMES}")
        probabilities = {name: float(self.probabilities[name]) for name in CLASS_NAMES}
        object.__setattr__(self, "probabilities", probabilities)
        per_slice = {
            name: tuple(float(v) for v in self.slice_probabilities[name])
            for name in CLASS_NAMES
            if name in self.slice_probabilities
        }
        object.__setattr__(self, "slice_probabilities", per_slice)

    @classmethod
    def from_probabilities(cls, probabilities: Sequence[float], **fields: Any) -> ScanResult:
        """A result labelled with the most probable class (`probabilities` in CLASS_NAMES order)."""
        values = [float(p) for p in probabilities]
        label = CLASS_NAMES[max(range(len(values)), key=values.__getitem__)]
        return cls(label=label, probabilities=dict(zip(CLASS_NAMES, values, strict=True)), **fields)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (`ctjoint analyze --json`): the one result encoder
        (ctjoint/result_json.py) of the message the gateway sends (gateway/wire.py), so a
        result written here and one a client saves cannot differ."""
        return result_dict(result_to_proto(self, request_id=""))
