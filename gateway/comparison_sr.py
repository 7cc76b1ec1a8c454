"""Put the comparison with the prior analysis into a scan's SR, before the SR leaves us.

The serving process learns the comparison after the worker built the SR, so the SR is amended
here: one more TID 1501 measurement group ("comparison with prior") in its Imaging
Measurements, built with highdicom (the category as a qualitative evaluation, the interval and
the absolute change of every measure as numbers), and the prior SR named in Pertinent Other
Evidence (study, series, SOP instance). The SOP Instance UID stays: no other version of this
SR has been sent anywhere yet.
"""

from __future__ import annotations

from typing import Final

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ctjoint.gateway.comparison import Comparison
from ctjoint.gateway.dicom_outputs import MILLILITER, PRIVATE_SCHEME, to_bytes
from ctjoint.gateway.prior_report import ReportReference, sr_from_bytes

_IMAGING_MEASUREMENTS: Final = ("DCM", "126010")


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    # At most 16 characters: a short Code Value, which every reader knows.
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


CHANGE_CATEGORY_CODE: Final = _private("change_category", "Change since prior study")
CATEGORY_CODES: Final = {
    name: _private(name, name.capitalize())
    for name in ("new", "progressed", "stable", "improved", "resolved")
}
INTERVAL_CODE: Final = _private("interval_days", "Interval since prior study")
DAYS: Final = hd.sr.CodedConcept(value="d", scheme_designator="UCUM", meaning="day")
# Each measure's change: its concept and unit.
CHANGE_CODES: Final = {
    "total_ml": (_private("volume_change", "Change in lesion volume"), MILLILITER),
    "ground_glass_ml": (
        _private("ggo_change", "Change in ground-glass volume"),
        MILLILITER,
    ),
    "consolidation_ml": (
        _private("consol_change", "Change in consolidation volume"),
        MILLILITER,
    ),
    "right_percent_involved": (
        _private("right_pct_change", "Change in right lung percent involved"),
        codes.UCUM.Percent,
    ),
    "left_percent_involved": (
        _private("left_pct_change", "Change in left lung percent involved"),
        codes.UCUM.Percent,
    ),
    "severity_score": (
        _private("severity_change", "Change in CT severity score"),
        codes.UCUM.NoUnits,
    ),
}


def _group(comparison: Comparison) -> Dataset:
    measurements = [
        hd.sr.Measurement(name=concept, value=comparison.changes[name].absolute, unit=unit)
        for name, (concept, unit) in CHANGE_CODES.items()
        if name in comparison.changes
    ]
    if comparison.interval_days is not None:
        measurements.insert(
            0,
            hd.sr.Measurement(name=INTERVAL_CODE, value=comparison.interval_days, unit=DAYS),
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier="comparison with prior"
        ),
        finding_type=codes.SCT.Lung,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=CHANGE_CATEGORY_CODE, value=CATEGORY_CODES[comparison.category]
            )
        ],
    )
    return group[0]


def _evidence(prior: ReportReference) -> Dataset:
    instance = Dataset()
    instance.ReferencedSOPClassUID = prior.sop_class_uid
    instance.ReferencedSOPInstanceUID = prior.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = prior.series_instance_uid
    series.ReferencedSOPSequence = [instance]
    study = Dataset()
    study.StudyInstanceUID = prior.study_instance_uid
    study.ReferencedSeriesSequence = [series]
    return study


def add_comparison(sr: bytes, comparison: Comparison, prior: ReportReference) -> bytes:
    """The SR's bytes with the comparison group and the prior SR as pertinent evidence."""
    if not comparison.available:
        raise ValueError("only an available comparison goes into the SR")
    dataset = sr_from_bytes(sr, "the scan's SR")
    for item in dataset.ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if (concept.CodingSchemeDesignator, concept.CodeValue) == _IMAGING_MEASUREMENTS:
            item.ContentSequence.append(_group(comparison))
            break
    else:
        raise ValueError("the scan's SR has no Imaging Measurements container")
    evidence = list(dataset.get("PertinentOtherEvidenceSequence", []))
    evidence.append(_evidence(prior))
    dataset.PertinentOtherEvidenceSequence = evidence
    return to_bytes(dataset)


__all__ = ["CATEGORY_CODES", "CHANGE_CATEGORY_CODE", "CHANGE_CODES", "add_comparison"]
