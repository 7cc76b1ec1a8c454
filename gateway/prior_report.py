"""Read an analysis's measurements back: from this project's SR or from a result JSON.

The SR is the TID 1500 report gateway/dicom_outputs.py writes: measurement groups named by
their tracking identifier ("ground_glass lesions", "consolidation lesions", "right lung",
"left lung", "scan"), each with its numbers, the scan group with the diagnosis and the
severity score, every group with the algorithm's name ("ctjoint <model>"). Reading walks
that tree with pydicom; anything missing is a `PriorReportError` naming what and where, and
never quoting a value of the file.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import Comprehensive3DSRStorage

from ctjoint.gateway.comparison import Measurements, study_datetime
from ctjoint.gateway.dicom_outputs import (
    CLASS_CODES,
    DIAGNOSIS_CODE,
    MANUFACTURER,
    PERCENT_INVOLVED_CODE,
    SEVERITY_CODE,
)
from ctjoint.gateway.errors import CtJointError
from ctjoint.v1 import scan_pb2

# TID 1500 / TID 4019 concept names (DCM): tracking identifier, algorithm name.
_TRACKING_ID: Final = ("DCM", "112039")
_ALGORITHM_NAME: Final = ("DCM", "111001")
_VOLUME: Final = ("SCT", "118565006")
ALGORITHM_PREFIX: Final = "ctjoint "
SR_SERIES_DESCRIPTION: Final = "ctjoint measurement report"


class PriorReportError(CtJointError):
    """An SR or result JSON that does not hold this project's measurements."""


@dataclass(frozen=True)
class ReportReference:
    """Which SR the measurements came from (UIDs: for the SR's reference, never logged)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


@dataclass(frozen=True)
class PriorReport:
    """An SR's measurements and the SR they came from."""

    measurements: Measurements
    reference: ReportReference


def _code(item: Dataset, keyword: str) -> tuple[str, str]:
    seq = item.get(keyword)
    if not seq:
        return ("", "")
    code = seq[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return (str(code.get("CodingSchemeDesignator", "")), str(value))


def _key(concept: Any) -> tuple[str, str]:
    return (str(concept.scheme_designator), str(concept.value))


def _groups(dataset: Dataset) -> dict[str, dict[str, Any]]:
    """Measurement groups by tracking identifier: their NUM values, CODE values and algorithm."""
    groups: dict[str, dict[str, Any]] = {}
    for container in dataset.get("ContentSequence", []):
        for group in container.get("ContentSequence", []):
            if group.get("ValueType") != "CONTAINER":
                continue
            found: dict[str, Any] = {"num": {}, "code": {}, "algorithm": ""}
            name = ""
            for item in group.get("ContentSequence", []):
                concept = _code(item, "ConceptNameCodeSequence")
                kind = item.get("ValueType")
                if kind == "TEXT" and concept == _TRACKING_ID:
                    name = str(item.get("TextValue", ""))
                elif kind == "TEXT" and concept == _ALGORITHM_NAME:
                    found["algorithm"] = str(item.get("TextValue", ""))
                elif kind == "NUM" and item.get("MeasuredValueSequence"):
                    found["num"][concept] = float(item.MeasuredValueSequence[0].NumericValue)
                elif kind == "CODE":
                    found["code"][concept] = _code(item, "ConceptCodeSequence")
            if name:
                groups[name] = found
    return groups


def _number(groups: Mapping[str, Any], group: str, concept: tuple[str, str], where: str) -> float:
    try:
        return float(groups[group]["num"][concept])
    except KeyError:
        raise PriorReportError(
            f"{where}: the SR has no {concept[1]} measurement in its '{group}' group"
        ) from None


def measurements_from_sr(dataset: Dataset, where: str = "SR") -> Measurements:
    """The measurements of one of this project's SRs (module docstring)."""
    if str(dataset.get("SOPClassUID", "")) != Comprehensive3DSRStorage:
        raise PriorReportError(f"{where}: not a Comprehensive 3D SR")
    if str(dataset.get("Manufacturer", "")) != MANUFACTURER:
        raise PriorReportError(f"{where}: not an SR written by {MANUFACTURER}")
    groups = _groups(dataset)
    scan = groups.get("scan")
    if scan is None:
        raise PriorReportError(f"{where}: the SR has no 'scan' measurement group")
    diagnosis = scan["code"].get(_key(DIAGNOSIS_CODE))
    labels = {_key(code): name for name, code in CLASS_CODES.items()}
    if diagnosis not in labels:
        raise PriorReportError(f"{where}: the SR's diagnosis is not one of this project's codes")
    algorithm = str(scan["algorithm"])
    return Measurements(
        label=labels[diagnosis],
        ground_glass_ml=_number(groups, "ground_glass lesions", _VOLUME, where),
        consolidation_ml=_number(groups, "consolidation lesions", _VOLUME, where),
        right_percent_involved=_number(groups, "right lung", _key(PERCENT_INVOLVED_CODE), where),
        left_percent_involved=_number(groups, "left lung", _key(PERCENT_INVOLVED_CODE), where),
        severity_score=round(_number(groups, "scan", _key(SEVERITY_CODE), where)),
        model=algorithm.removeprefix(ALGORITHM_PREFIX),
        study_datetime=study_datetime(
            str(dataset.get("StudyDate", "") or ""), str(dataset.get("StudyTime", "") or "")
        ),
    )


def report_from_sr(dataset: Dataset, where: str = "SR") -> PriorReport:
    """`measurements_from_sr` plus the SR's own identity."""
    return PriorReport(
        measurements=measurements_from_sr(dataset, where),
        reference=ReportReference(
            sop_class_uid=str(dataset.SOPClassUID),
            sop_instance_uid=str(dataset.SOPInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID),
            study_instance_uid=str(dataset.StudyInstanceUID),
        ),
    )


def sr_from_bytes(data: bytes, where: str = "SR") -> Dataset:
    """A DICOM file's bytes as a data set (the error names `where`, never the content)."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError) as err:
        raise PriorReportError(
            f"{where}: not a readable DICOM file ({type(err).__name__})"
        ) from None


def measurements_from_result(result: Mapping[str, Any], where: str = "result") -> Measurements:
    """The measurements of a result JSON (`ctjoint analyze --json`, `ctjoint send`).

    A result JSON holds no study date; its comparison, when it has one, does not replace it."""
    try:
        classes = result["lesions"]["classes"]
        lungs = result["quantification"]["lungs"]
        return Measurements(
            label=str(result["label"]),
            ground_glass_ml=float(classes["ground_glass"]["volume_ml"]),
            consolidation_ml=float(classes["consolidation"]["volume_ml"]),
            right_percent_involved=float(lungs["right"]["percent_involved"]),
            left_percent_involved=float(lungs["left"]["percent_involved"]),
            severity_score=int(result["quantification"]["severity_score"]),
            model=str(result.get("model", {}).get("name", "")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise PriorReportError(
            f"{where}: not a ctjoint result with lesions and quantification (missing {err})"
        ) from None


def measurements_from_message(
    message: scan_pb2.ScanResult, when: dt.datetime | None = None
) -> Measurements:
    """The measurements of the gateway's own answer (the current scan of a comparison)."""
    volumes = {c.name: float(c.volume_ml) for c in message.lesions.classes}
    lungs = {lung.side: float(lung.percent_involved) for lung in message.quantification.lungs}
    return Measurements(
        label=message.label,
        ground_glass_ml=volumes.get("ground_glass", 0.0),
        consolidation_ml=volumes.get("consolidation", 0.0),
        right_percent_involved=lungs.get("right", 0.0),
        left_percent_involved=lungs.get("left", 0.0),
        severity_score=int(message.quantification.severity_score),
        model=message.model.name,
        study_datetime=when,
    )


def read_measurements(path: Path) -> tuple[Measurements, PriorReport | None]:
    """Measurements of a file that is either one of this project's SRs or a result JSON."""
    import json

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PriorReportError(f"{path}: cannot read it ({err.strerror})") from None
    if data[:1] in (b"{", b"[") or data.lstrip()[:1] == b"{":
        try:
            result = json.loads(data)
        except ValueError as err:
            raise PriorReportError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(result, dict):
            raise PriorReportError(f"{path}: a result JSON is an object")
        return measurements_from_result(result, str(path)), None
    report = report_from_sr(sr_from_bytes(data, str(path)), str(path))
    return report.measurements, report


__all__ = [
    "SR_SERIES_DESCRIPTION",
    "PriorReport",
    "PriorReportError",
    "ReportReference",
    "measurements_from_message",
    "measurements_from_result",
    "measurements_from_sr",
    "read_measurements",
    "report_from_sr",
    "sr_from_bytes",
]
