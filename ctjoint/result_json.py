"""The one result encoder: a `ctjoint.v1.ScanResult` message -> the result's JSON-ready dict.

The gateway encodes its results through it (`ScanResult.to_dict()` of gateway/result.py goes
through the message gateway/wire.py builds) and the client decodes a gateway's answer with it
(client/results.py), so `ctjoint analyze --json` and `ctjoint send` write the same format,
field for field, from one implementation. Neutral ground: imports only the proto and the
contracts.
"""

from __future__ import annotations

from typing import Any, Final

from ctjoint.contracts import RESULT_SCHEMA
from ctjoint.errors import CtJointError
from ctjoint.v1 import scan_pb2


class MalformedResultError(CtJointError, ValueError):
    """A result message that does not make a result (a version mismatch, or corruption)."""


# Analysis stages in the order the result lists them; other stages are the gateway's own.
ANALYSIS_STAGES: Final = (
    "read",
    "validate",
    "preprocess",
    "infer",
    "postprocess",
    "total",
    "model",
)


def result_dict(message: scan_pb2.ScanResult) -> dict[str, Any]:
    """The JSON-ready dict of a result message: what `ctjoint analyze --json` writes and what
    `ctjoint send` saves.

    Timings hold the analysis stages under their usual keys plus, in a gateway's answer, its
    own stages ("receive_ms", "encode_ms", "gateway_total_ms").
    """
    classes = list(message.class_names)
    if len(classes) != len(message.probabilities):
        raise MalformedResultError(
            f"{len(classes)} class names but {len(message.probabilities)} probabilities"
        )
    lesion_names = [c.name for c in message.lesions.classes]
    slices = list(message.slices)
    has_slice_probs = bool(slices) and all(len(s.probabilities) == len(classes) for s in slices)
    slice_probabilities = (
        {name: [float(s.probabilities[i]) for s in slices] for i, name in enumerate(classes)}
        if has_slice_probs
        else {}
    )
    slice_pixels = {
        name: [int(s.lesion_pixels[j]) if j < len(s.lesion_pixels) else 0 for s in slices]
        for j, name in enumerate(lesion_names)
    }
    lesions = message.lesions
    geometry = message.geometry
    timings = {f"{t.stage}_ms": round(float(t.milliseconds), 3) for t in message.timings}
    ordered = {f"{s}_ms": timings.pop(f"{s}_ms") for s in ANALYSIS_STAGES if f"{s}_ms" in timings}
    return {
        "schema": RESULT_SCHEMA,
        "label": message.label,
        "probabilities": {
            name: float(p) for name, p in zip(classes, message.probabilities, strict=True)
        },
        "classes": classes,
        "slice_probabilities": slice_probabilities,
        "lesions": {
            "voxel_volume_ml": float(lesions.voxel_volume_ml),
            "classes": {
                c.name: {"voxels": int(c.voxels), "volume_ml": float(c.volume_ml)}
                for c in lesions.classes
            },
            "total": {
                "voxels": int(lesions.total_voxels),
                "volume_ml": float(lesions.total_volume_ml),
            },
            "slice_pixels": slice_pixels,
        },
        "series": {
            "slices": int(geometry.slices),
            "rows": int(geometry.rows),
            "columns": int(geometry.columns),
            "spacing_mm": [
                float(geometry.slice_spacing_mm),
                float(geometry.row_spacing_mm),
                float(geometry.column_spacing_mm),
            ],
            "slice_thickness_mm": (
                float(geometry.slice_thickness_mm)
                if geometry.HasField("slice_thickness_mm")
                else None
            ),
        },
        "model": {"name": message.model.name, "version": message.model.version},
        "backend": message.backend,
        "timings": {**ordered, **timings},
        "quantification": (
            _quantification_dict(message.quantification)
            if message.HasField("quantification")
            else None
        ),
        "review": _review_dict(message.review),
        "members": [
            {
                "model": {"name": m.model.name, "version": m.model.version},
                "label": m.label,
                "probabilities": {
                    name: float(p) for name, p in zip(classes, m.probabilities, strict=True)
                },
                "lesion_volume_ml": float(m.lesion_volume_ml),
                "review": _review_dict(m.review),
            }
            for m in message.members
        ],
        "series_selection": (
            _selection_dict(message.series_selection)
            if message.HasField("series_selection")
            else None
        ),
        # Only a gateway with a PACS compares (`ctjoint analyze` has no prior to compare with).
        **(
            {"comparison": comparison_dict(message.comparison)}
            if message.HasField("comparison")
            else {}
        ),
    }


def comparison_dict(message: scan_pb2.Comparison) -> dict[str, Any]:
    """The comparison with the prior analysis (gateway/comparison.py `Comparison.to_dict`)."""
    if not message.available:
        return {"available": False, "reason": message.reason}
    return {
        "available": True,
        "category": message.category,
        "prior_study_date": message.prior_study_date or None,
        "interval_days": message.interval_days if message.HasField("interval_days") else None,
        "prior_label": message.prior_label,
        "current_label": message.current_label,
        "prior_total_ml": message.prior_total_ml,
        "current_total_ml": message.current_total_ml,
        "changes": {
            c.measure: {
                "absolute": c.absolute,
                "relative": c.relative if c.HasField("relative") else None,
            }
            for c in message.changes
        },
        "rule": message.rule,
    }


def _series_dict(message: scan_pb2.SelectedSeries) -> dict[str, Any]:
    """SeriesFacts.to_dict() of ctjoint/series_rules.py, rebuilt from its message."""
    return {
        "series": message.series,
        "number": int(message.number) if message.HasField("number") else None,
        "images": int(message.images),
        "slice_thickness_mm": (
            round(float(message.slice_thickness_mm), 4)
            if message.HasField("slice_thickness_mm")
            else None
        ),
        "coverage_mm": round(float(message.coverage_mm), 1),
        "kernel": message.kernel,
    }


def _selection_dict(message: scan_pb2.SeriesSelection) -> dict[str, Any]:
    """Selection.to_dict() of ctjoint/series_rules.py, rebuilt from its message."""
    return {
        "analysed": _series_dict(message.analysed) if message.HasField("analysed") else None,
        "reason": message.reason,
        "notes": list(message.notes),
        "skipped": [{**_series_dict(s), "reason": s.reason} for s in message.skipped],
    }


def _review_dict(message: scan_pb2.Review) -> dict[str, Any]:
    """Review.to_dict() of the gateway (gateway/review.py), rebuilt from its message."""
    if message.needed != bool(message.reasons):
        raise MalformedResultError("the review flag and its reasons disagree")
    return {
        "needed": bool(message.needed),
        "reasons": list(message.reasons),
        "details": list(message.details),
        "signals": {s.name: float(s.value) for s in message.signals} or None,
    }


def _quantification_dict(message: scan_pb2.Quantification) -> dict[str, Any]:
    """Quantification.to_dict() of the gateway, rebuilt from its message."""
    lungs: dict[str, Any] = {}
    for lung in message.lungs:
        lungs[lung.side] = {
            "side": lung.side,
            "volume_ml": float(lung.volume_ml),
            "lesion_volume_ml": {c.name: float(c.volume_ml) for c in lung.lesions},
            "total_lesion_ml": float(lung.total_lesion_ml),
            "percent_involved": float(lung.percent_involved),
            "zones": [
                {
                    "zone": z.zone,
                    "lung_volume_ml": float(z.lung_volume_ml),
                    "lesion_volume_ml": float(z.lesion_volume_ml),
                    "percent_involved": float(z.percent_involved),
                    "severity": int(z.severity),
                }
                for z in lung.zones
            ],
        }
    return {
        "method": message.method,
        "lungs": lungs,
        "bilateral": bool(message.bilateral),
        "peripheral_fraction": float(message.peripheral_fraction),
        "central_fraction": float(message.central_fraction),
        "distribution": message.distribution,
        "peripheral_rule": message.peripheral_rule,
        "severity_score": int(message.severity_score),
        "severity_scale": message.severity_scale,
    }


__all__ = ["ANALYSIS_STAGES", "MalformedResultError", "comparison_dict", "result_dict"]
