"""The analysis result on the wire: `ScanAnalysis` -> `ctjoint.v1.ScanResult`.

Every field of the result has a home in the message, and the result's JSON is made from the
message by one encoder (ctjoint/result_json.py) on both sides: `ScanResult.to_dict()` here,
client/results.py on the client.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ctjoint.contracts import CLASS_NAMES, LESION_CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.gateway.backends.base import ModelInfo
from ctjoint.gateway.review import Review
from ctjoint.series_rules import Selection, SeriesFacts, kernel_family
from ctjoint.v1 import scan_pb2

if TYPE_CHECKING:
    # Annotations only: gateway/result.py encodes its JSON through this module.
    from ctjoint.gateway.result import Quantification, ScanResult

# Level 1 is ~3x faster than the default and loses little here: label maps are long runs of
# background, which any level squeezes by two or three orders of magnitude.
MASK_ZLIB_LEVEL = 1

# StageTimings.to_dict() keys -> stage names on the wire, in pipeline order.
ANALYSIS_STAGES = (
    ("read_ms", "read"),
    ("validate_ms", "validate"),
    ("preprocess_ms", "preprocess"),
    ("infer_ms", "infer"),
    ("model_ms", "model"),
    ("postprocess_ms", "postprocess"),
    ("total_ms", "total"),
)


def encode_label_map(label_map: np.ndarray) -> scan_pb2.LabelVolume:
    """A uint8 [Z, Y, X] label map as a zlib-packed LabelVolume."""
    labels = np.ascontiguousarray(label_map, dtype=np.uint8)
    if labels.ndim != 3:
        raise ValueError(f"a label map is [slices, rows, columns], got shape {labels.shape}")
    return scan_pb2.LabelVolume(
        encoding=scan_pb2.LabelVolume.ENCODING_ZLIB_UINT8,
        shape=[int(v) for v in labels.shape],
        data=zlib.compress(labels.tobytes(), MASK_ZLIB_LEVEL),
        class_names=list(SEG_CLASS_NAMES),
    )


def result_to_proto(
    result: ScanResult,
    *,
    request_id: str,
    slice_file_numbers: Sequence[int] = (),
    extra_timings_ms: Mapping[str, float] | None = None,
) -> scan_pb2.ScanResult:
    """The message for a result; masks, SEG and overlay are attached by the caller."""
    timings = result.timings.to_dict()
    message = scan_pb2.ScanResult(
        request_id=request_id,
        label=result.label,
        class_names=list(CLASS_NAMES),
        probabilities=[result.probabilities[name] for name in CLASS_NAMES],
        model=scan_pb2.ModelRef(name=result.model, version=result.model_version),
        backend=result.backend,
        slice_file_number=list(slice_file_numbers),
    )
    lesions = result.lesions
    message.lesions.voxel_volume_ml = lesions.voxel_volume_ml
    message.lesions.total_voxels = lesions.total_voxels
    message.lesions.total_volume_ml = lesions.total_volume_ml
    volumes = lesions.volumes_ml
    for name in LESION_CLASS_NAMES:
        message.lesions.classes.add(name=name, voxels=lesions.voxels[name], volume_ml=volumes[name])
    series = result.series
    geometry = message.geometry
    geometry.slices, geometry.rows, geometry.columns = series.slices, series.rows, series.columns
    (
        geometry.slice_spacing_mm,
        geometry.row_spacing_mm,
        geometry.column_spacing_mm,
    ) = series.spacing_mm
    if series.slice_thickness_mm is not None:
        geometry.slice_thickness_mm = series.slice_thickness_mm
    per_class = [result.slice_probabilities.get(name, ()) for name in CLASS_NAMES]
    has_slice_probs = all(len(values) == series.slices for values in per_class)
    pixels = [lesions.slice_pixels[name] for name in LESION_CLASS_NAMES]
    for index in range(series.slices):
        message.slices.add(
            index=index,
            probabilities=[values[index] for values in per_class] if has_slice_probs else [],
            lesion_pixels=[counts[index] for counts in pixels],
        )
    if result.quantification is not None:
        message.quantification.CopyFrom(quantification_to_proto(result.quantification))
    message.review.CopyFrom(review_to_proto(result.review))
    for member in result.members:
        message.members.add(
            model=scan_pb2.ModelRef(name=member.model, version=member.model_version),
            label=member.label,
            probabilities=[member.probabilities[name] for name in CLASS_NAMES],
            lesion_volume_ml=member.lesion_volume_ml,
            review=review_to_proto(member.review),
        )
    for key, stage in ANALYSIS_STAGES:
        message.timings.add(stage=stage, milliseconds=timings[key])
    for stage, ms in (extra_timings_ms or {}).items():
        message.timings.add(stage=stage, milliseconds=round(ms, 3))
    if result.series_selection is not None:
        message.series_selection.CopyFrom(selection_to_proto(result.series_selection))
    return message


def review_to_proto(review: Review) -> scan_pb2.Review:
    """The review flag, its reasons and the signals they were decided on."""
    message = scan_pb2.Review(
        needed=review.needed, reasons=list(review.reasons), details=list(review.details)
    )
    if review.signals is not None:
        for name, value in review.signals.to_dict().items():
            message.signals.add(name=name, value=value)
    return message


def quantification_to_proto(quantification: Quantification) -> scan_pb2.Quantification:
    """The lungs and lesion distribution as a message (client/results.py reads it back)."""
    message = scan_pb2.Quantification(
        bilateral=quantification.bilateral,
        peripheral_fraction=quantification.peripheral_fraction,
        central_fraction=quantification.central_fraction,
        distribution=quantification.distribution,
        severity_score=quantification.severity_score,
        method=quantification.method,
        peripheral_rule=quantification.peripheral_rule,
        severity_scale=quantification.severity_scale,
    )
    for lung in quantification.lungs:
        entry = message.lungs.add(
            side=lung.side,
            volume_ml=lung.volume_ml,
            total_lesion_ml=lung.total_lesion_ml,
            percent_involved=lung.percent_involved,
        )
        for name in LESION_CLASS_NAMES:
            entry.lesions.add(name=name, volume_ml=lung.lesion_volume_ml[name])
        for zone in lung.zones:
            entry.zones.add(
                zone=zone.zone,
                lung_volume_ml=zone.lung_volume_ml,
                lesion_volume_ml=zone.lesion_volume_ml,
                percent_involved=zone.percent_involved,
                severity=zone.severity,
            )
    return message


def model_info_to_proto(info: ModelInfo, *, ready: bool) -> scan_pb2.ModelInfo:
    plan = info.plan
    return scan_pb2.ModelInfo(
        name=info.name,
        version=info.version,
        class_names=list(info.classes),
        seg_class_names=list(info.seg_classes),
        input=scan_pb2.InputGeometry(
            kind=plan.kind,
            channels=plan.channels,
            depth=plan.depth,
            height=plan.height,
            width=plan.width,
        ),
        ready=ready,
        trained_on=info.trained_on,
    )


def _selected(facts: SeriesFacts, reason: str = "") -> scan_pb2.SelectedSeries:
    message = scan_pb2.SelectedSeries(
        series=facts.key,
        images=facts.images,
        coverage_mm=round(facts.coverage_mm, 1),
        kernel=kernel_family(facts.kernel),
        reason=reason,
    )
    if facts.number is not None:
        message.number = facts.number
    if facts.thickness_mm is not None:
        message.slice_thickness_mm = facts.thickness_mm
    return message


def selection_to_proto(selection: Selection) -> scan_pb2.SeriesSelection:
    """Which series was analysed and why, and every other one with why not."""
    message = scan_pb2.SeriesSelection(
        reason=selection.reason,
        skipped=[_selected(c, why) for c, why in selection.skipped],
        notes=list(selection.notes),
    )
    if selection.chosen is not None:
        message.analysed.CopyFrom(_selected(selection.chosen))
    return message
