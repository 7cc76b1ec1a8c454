"""DICOM outputs of a scan, built with highdicom: a Segmentation and a Comprehensive 3D SR.

SEG: one binary segment per lesion class (ground glass, consolidation) and one per lung
(classical segmentation, gateway/lesions.py), every segment marked AUTOMATIC with the model as
its algorithm (name, version, family "Artificial Intelligence"). Frames reference the source
CT instances one to one: each source slice's header is rebuilt from the first file's header
with its own SOP Instance UID and its own ImagePositionPatient as its file stated it, so a
mask pixel lands on the source pixel it came from.

SR: TID 1500 measurement report referencing the SEG: per lesion segment its volume (mL) and,
per lung segment, its volume and percent involved; one group without an ROI (finding:
pneumonia, site: lung) carries the diagnosis as a qualitative evaluation beside its calibrated
probability, the review flag (`ScanResult.review`, gateway/review.py), the bilateral flag, the
peripheral fraction
and the severity score.

What of the source they carry: the Patient, General Study and Patient Study modules and the
geometry of the first file (`output_header`), nothing else; the source's acquisition equipment
(institution, station, device serial, acquisition time) only when the operator opts in
(`OutputSettings`). Invalid dates and times are emptied or dropped, never fatal.

Codes: DICOM (DCM) and SNOMED CT (SCT) where the standard's code tables have a concept we are
sure of; the rest use the private coding scheme `99CTJOINT` (DICOM reserves "99" prefixes for
private schemes), so no code is guessed.

Size: one job, a scan's DICOM objects. SEG and SR share the source-header rules, the codes
and the segment descriptions, so they stay together.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.valuerep import DA, DT, TM

from ctjoint import __version__
from ctjoint.contracts import SEG_CONSOLIDATION, SEG_GROUND_GLASS
from ctjoint.gateway.analysis import ScanAnalysis
from ctjoint.gateway.errors import InputError
from ctjoint.gateway.lesions import bounding_box
from ctjoint.gateway.result import LUNG_SIDES, ScanResult
from ctjoint.gateway.series import CtVolume

MANUFACTURER: Final = "ctjoint"
MODEL_NAME: Final = "ctjoint gateway"
SOFTWARE_VERSION: Final = __version__
DEVICE_SERIAL: Final = "ctjoint-edge"
SEG_BINARY: Final = "binary"
SEG_LABELMAP: Final = "labelmap"
SEG_TYPES: Final = (SEG_BINARY, SEG_LABELMAP)
SEG_SERIES_NUMBER: Final = 9901
SR_SERIES_NUMBER: Final = 9902
PRIVATE_SCHEME: Final = "99CTJOINT"
# The algorithm parameter that names the weights by their SHA-256 (the IHE AI Results idea: a
# result says exactly which model made it).
WEIGHTS_PARAMETER: Final = "weights_sha256"

# Segment numbers (1-based, SEG order).
SEGMENT_GROUND_GLASS: Final = 1
SEGMENT_CONSOLIDATION: Final = 2
SEGMENT_RIGHT_LUNG: Final = 3
SEGMENT_LEFT_LUNG: Final = 4
LESION_SEGMENTS: Final = {
    "ground_glass": SEGMENT_GROUND_GLASS,
    "consolidation": SEGMENT_CONSOLIDATION,
}
LUNG_SEGMENTS: Final = {"right": SEGMENT_RIGHT_LUNG, "left": SEGMENT_LEFT_LUNG}


def _coding_schemes() -> list[hd.coding_schemes.CodingSchemeIdentificationItem]:
    """Declares our private coding scheme in the objects that use it (Coding Scheme
    Identification Sequence), so readers know whose codes they are."""
    return [
        hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name="ctjoint private codes",
            responsible_organization=MANUFACTURER,
        )
    ]


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _sct(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


# Standard codes wherever one exists (docs/interoperability.md has the table): SNOMED CT for the
# diagnoses, consolidation, the lungs and sides, yes/no; DICOM's own code for ground-glass
# opacity (CID 6102); our private scheme only where no standard concept fits.
CONSOLIDATION_CODE: Final = _sct("95436008", "Lung consolidation")
PNEUMONIA_CODE: Final = _sct("233604007", "Pneumonia")
CLASS_CODES: Final = {
    "covid19": _sct("840539006", "COVID-19"),
    "cap": _sct("385093006", "Community acquired pneumonia"),
    # No standard concept says "no pneumonia on this CT"; "normal" would claim more.
    "normal": _private("normal", "No pneumonia"),
}
DIAGNOSIS_CODE: Final = _sct("439401001", "Diagnosis")
REVIEW_CODE: Final = _private("review_recommended", "Review recommended")
PERCENT_INVOLVED_CODE: Final = _private("percent_involved", "Percent of lung involved")
PERIPHERAL_CODE: Final = _private("peripheral_fraction", "Peripheral fraction of lesion volume")
SEVERITY_CODE: Final = _private("severity_score", "CT severity score (six zones, 0-30)")
BILATERAL_CODE: Final = _private("bilateral", "Bilateral involvement")
YES: Final = _sct("373066001", "Yes")
NO: Final = _sct("373067005", "No")
MILLILITER: Final = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
CT_CHEST: Final = _private("ct_chest", "CT of chest")
RIGHT: Final = hd.sr.CodedConcept(value="24028007", scheme_designator="SCT", meaning="Right")
LEFT: Final = hd.sr.CodedConcept(value="7771000", scheme_designator="SCT", meaning="Left")


@dataclass(frozen=True)
class OutputIdentity:
    """What identifies our output objects (the source's patient and study come from its files).

    UIDs are made fresh per object unless given (tests pin them).
    """

    manufacturer: str = MANUFACTURER
    model_name: str = MODEL_NAME
    software_version: str = SOFTWARE_VERSION
    device_serial_number: str = DEVICE_SERIAL


@dataclass(frozen=True)
class OutputSettings:
    """The operator's choices for SEG and SR (docs/interoperability.md lists them).

    `copy_source_equipment`: also carry the source's acquisition equipment (manufacturer,
    institution, station, department, device serial, acquisition time) as Contributing
    Equipment; off by default, because it names the hospital and the scanner.
    """

    copy_source_equipment: bool = False
    # "binary" (one bit per pixel per segment, empty frames left out) or "labelmap" (DICOM
    # Supplement 243: one frame per slice holding segment numbers; lesions take precedence over
    # the lung they lie in, so its lung segments are the lungs without their lesions).
    seg_type: str = SEG_BINARY

    def __post_init__(self) -> None:
        if self.seg_type not in SEG_TYPES:
            raise ValueError(f"seg_type must be one of {SEG_TYPES}, got {self.seg_type!r}")


def source_datasets(volume: CtVolume, header: Dataset) -> list[Dataset]:
    """One header per assembled slice (no pixels): the first file's attributes, with each
    slice's own SOP Instance UID, position and instance number."""
    if not volume.sop_instance_uids or len(volume.positions) != volume.shape[0]:
        raise InputError(
            "a DICOM SEG needs the source series' instance UIDs and positions",
            source="series",
            attribute="SOPInstanceUID",
        )
    # The header's elements are shared, not copied (highdicom only reads them); the three
    # that differ per slice are new elements of each slice's own data set.
    own = {Tag("SOPInstanceUID"), Tag("ImagePositionPatient"), Tag("InstanceNumber")}
    shared = [element for element in header if element.tag not in own]
    out: list[Dataset] = []
    for index, (uid, position) in enumerate(
        zip(volume.sop_instance_uids, volume.positions, strict=True)
    ):
        ds = Dataset()
        for element in shared:
            ds[element.tag] = element
        ds.SOPInstanceUID = uid
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.InstanceNumber = index + 1
        out.append(ds)
    return out


def _algorithm(result: ScanResult) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=f"ctjoint {result.model}",
        version=result.model_version or "unknown",
        family=codes.DCM.ArtificialIntelligence,
        source=MANUFACTURER,
        parameters={WEIGHTS_PARAMETER: result.model_sha256} if result.model_sha256 else None,
    )


def _sr_algorithm(result: ScanResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=f"ctjoint {result.model}",
        version=result.model_version or "unknown",
        parameters=[f"{WEIGHTS_PARAMETER}={result.model_sha256}"] if result.model_sha256 else None,
    )


def algorithm_equipment(result: ScanResult) -> hd.ContributingEquipment:
    """The model that made the findings, as Contributing Equipment of the SEG and SR (the IHE AI
    Results idea: a result names the algorithm and version that produced it)."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"ctjoint {result.model}",
        software_versions=result.model_version or "unknown",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        contribution_description="Automatic lesion segmentation and scan classification",
    )


def _segment_descriptions(
    result: ScanResult, *, labelmap: bool = False
) -> list[hd.seg.SegmentDescription]:
    algorithm = _algorithm(result)
    lungs_algorithm = hd.AlgorithmIdentificationSequence(
        name="ctjoint classical lung segmentation",
        version=SOFTWARE_VERSION,
        family=_private("classical", "Threshold and connected components"),
        source=MANUFACTURER,
    )
    # A label map holds one segment per pixel: there, lesions cut their lung's pixels out.
    without = " without lesions" if labelmap else ""
    specs = [
        (SEGMENT_GROUND_GLASS, "Ground-glass opacity", codes.SCT.MorphologicallyAbnormalStructure,
         codes.DCM.GroundGlassOpacity, algorithm),
        (SEGMENT_CONSOLIDATION, "Consolidation", codes.SCT.MorphologicallyAbnormalStructure,
         CONSOLIDATION_CODE, algorithm),
        (SEGMENT_RIGHT_LUNG, "Right lung" + without, codes.SCT.Organ, codes.SCT.Lung,
         lungs_algorithm),
        (SEGMENT_LEFT_LUNG, "Left lung" + without, codes.SCT.Organ, codes.SCT.Lung,
         lungs_algorithm),
    ]  # fmt: skip
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=hd.UID(),
            tracking_id=f"ctjoint segment {number}",
            # Lesions say where they are; a lung segment is its own anatomy.
            anatomic_regions=[codes.SCT.Lung] if category is not codes.SCT.Organ else None,
        )
        for number, label, category, kind, algo in specs
    ]


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a cheaper overlap check for a stack of boolean masks.

    highdicom finds out whether segments overlap by summing the [slices, rows, columns,
    segments] stack over its segments into an int64 volume: on 60x512x512 with four segments
    that was a third of the SEG's time. Accumulating the masks segment by segment answers the
    same question in a few boolean passes. Every other input goes to highdicom's own check.
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: Any,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[Any, hd.seg.SegmentsOverlapValues]:
        if not (
            isinstance(pixel_array, np.ndarray)
            and pixel_array.dtype == np.bool_
            and pixel_array.ndim == 4
            and pixel_array.shape[-1] == len(segment_numbers)
            and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
        ):
            return super()._check_and_cast_pixel_array(
                pixel_array, segment_numbers, segmentation_type, dtype
            )
        return pixel_array, (
            hd.seg.SegmentsOverlapValues.YES
            if masks_overlap(pixel_array)
            else hd.seg.SegmentsOverlapValues.NO
        )


# Slices per pass of `masks_overlap`: its temporaries stay a few MB whatever the scan's size.
_OVERLAP_CHUNK: Final = 16


def masks_overlap(stack: np.ndarray) -> bool:
    """Whether any pixel of a bool [Z, ..., segments] stack is in more than one segment
    (checked a few slices at a time)."""
    for start in range(0, stack.shape[0], _OVERLAP_CHUNK):
        part = stack[start : start + _OVERLAP_CHUNK]
        seen = np.zeros(part.shape[:-1], dtype=np.bool_)
        for index in range(part.shape[-1]):
            plane = part[..., index]
            if np.logical_and(seen, plane).any():
                return True
            seen |= plane
    return False


def segment_masks(label_map: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """bool [Z, Y, X, 4] in segment order: ground glass, consolidation, right, left lung.

    Each segment's volume is contiguous in memory (a view over [4, Z, Y, X]): the SEG writer
    reads one slice of one segment per frame, which is then one contiguous block. The stack
    is calloc'd and each mask written only inside the box of its map's nonzero voxels: pages
    outside are never touched (four whole masks were 400 MB of fresh pages at 512x512x400)."""
    stacked = np.zeros((4, *label_map.shape), dtype=np.bool_)
    segments = (
        (label_map, SEG_GROUND_GLASS),
        (label_map, SEG_CONSOLIDATION),
        (lungs, 1),
        (lungs, 2),
    )
    boxes = {id(label_map): bounding_box(label_map), id(lungs): bounding_box(lungs)}
    for index, (source, value) in enumerate(segments):
        box = boxes[id(source)]
        if box is not None:
            np.equal(source[box], value, out=stacked[index][box])
    return np.moveaxis(stacked, 0, -1)


def segment_label_map(label_map: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """uint8 [Z, Y, X] of segment numbers (0: none) for a label-map SEG: a lesion's number
    where there is a lesion, else its lung's where there is lung (written inside the maps'
    boxes only, as `segment_masks`)."""
    out = np.zeros(label_map.shape, dtype=np.uint8)
    for source, values in (
        (lungs, ((1, SEGMENT_RIGHT_LUNG), (2, SEGMENT_LEFT_LUNG))),
        (
            label_map,
            ((SEG_GROUND_GLASS, SEGMENT_GROUND_GLASS), (SEG_CONSOLIDATION, SEGMENT_CONSOLIDATION)),
        ),
    ):
        box = bounding_box(source)
        if box is None:
            continue
        part, inside = out[box], source[box]
        for value, number in values:
            part[inside == value] = number
    return out


def build_seg(
    result: ScanResult,
    volume: CtVolume,
    header: Dataset,
    label_map: np.ndarray,
    lungs: np.ndarray,
    *,
    identity: OutputIdentity | None = None,
    sources: Sequence[Dataset] | None = None,
    seg_type: str = SEG_BINARY,
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """The DICOM Segmentation of a scan (see module doc); `lungs`: 1 right, 2 left.

    Binary SEGs leave empty frames out (a reader fills them with zeros): a lesion segment is
    empty on most slices, and every frame costs encoding time and bytes. `omit_empty_frames`
    False writes them all, as this writer did before (bench/seg_outputs.py compares)."""
    who = identity or OutputIdentity()
    images = list(sources) if sources is not None else source_datasets(volume, header)
    if seg_type == SEG_LABELMAP:
        pixels = segment_label_map(label_map, lungs)
        kind = hd.seg.SegmentationTypeValues.LABELMAP
    else:
        pixels = segment_masks(label_map, lungs)
        kind = hd.seg.SegmentationTypeValues.BINARY
    return _Segmentation(
        source_images=images,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=_segment_descriptions(result, labelmap=seg_type == SEG_LABELMAP),
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=who.manufacturer,
        manufacturer_model_name=who.model_name,
        software_versions=who.software_version,
        device_serial_number=who.device_serial_number,
        series_description="ctjoint lesions and lungs",
        content_label="LESIONS",
        content_description="Lesion and lung segmentation (automatic, not for clinical use)",
        omit_empty_frames=omit_empty_frames,
        contributing_equipment=[algorithm_equipment(result)],
        coding_schemes=_coding_schemes(),
    )


def _volume(value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.SCT.Volume, value=float(value), unit=MILLILITER)


def build_sr(
    result: ScanResult,
    seg: hd.seg.Segmentation,
    header: Dataset,
    *,
    identity: OutputIdentity | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of a scan, referencing its SEG (see module doc)."""
    who = identity or OutputIdentity()
    quantification = result.quantification
    if quantification is None:
        raise ValueError("a measurement report needs the scan's quantification")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=f"ctjoint {result.model}",
            manufacturer_name=who.manufacturer,
            model_name=who.model_name,
            serial_number=who.device_serial_number,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    source_series = hd.sr.SourceSeriesForSegmentation(header.SeriesInstanceUID)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    lesion_volumes = result.lesions.volumes_ml
    for name, number in LESION_SEGMENTS.items():
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"{name} lesions"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=source_series,
                ),
                finding_type=codes.SCT.Lesion,
                algorithm_id=_sr_algorithm(result),
                measurements=[_volume(lesion_volumes[name])],
            )
        )
    for side in LUNG_SIDES:
        lung = quantification.lung(side)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"{side} lung"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=LUNG_SEGMENTS[side],
                    source_series=source_series,
                ),
                finding_type=codes.SCT.Lung,
                finding_sites=[
                    hd.sr.FindingSite(
                        anatomic_location=codes.SCT.Lung,
                        laterality=RIGHT if side == "right" else LEFT,
                    )
                ],
                measurements=[
                    _volume(lung.volume_ml),
                    hd.sr.Measurement(
                        name=PERCENT_INVOLVED_CODE,
                        value=lung.percent_involved,
                        unit=codes.UCUM.Percent,
                    ),
                ],
            )
        )
    label = result.label
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="scan"),
            finding_type=PNEUMONIA_CODE,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=_sr_algorithm(result),
            measurements=[
                hd.sr.Measurement(
                    name=codes.DCM.Probability,
                    value=result.probabilities[label],
                    unit=codes.UCUM.NoUnits,
                ),
                hd.sr.Measurement(
                    name=PERIPHERAL_CODE,
                    value=quantification.peripheral_fraction,
                    unit=codes.UCUM.NoUnits,
                ),
                hd.sr.Measurement(
                    name=SEVERITY_CODE,
                    value=quantification.severity_score,
                    unit=codes.UCUM.NoUnits,
                ),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=DIAGNOSIS_CODE, value=CLASS_CODES[label]),
                hd.sr.QualitativeEvaluation(
                    name=REVIEW_CODE,
                    value=YES if result.review.needed else NO,
                ),
                hd.sr.QualitativeEvaluation(
                    name=BILATERAL_CODE, value=YES if quantification.bilateral else NO
                ),
            ],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=CT_CHEST,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=who.manufacturer,
        series_description="ctjoint measurement report",
        contributing_equipment=[algorithm_equipment(result)],
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=_coding_schemes(),
    )


def to_bytes(dataset: Dataset) -> bytes:
    """A data set as DICOM Part-10 bytes."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class ScanObjects:
    """A scan's DICOM outputs as Part-10 bytes (None where not asked for)."""

    seg: bytes | None
    sr: bytes | None


def scan_objects(
    result: ScanResult,
    volume: CtVolume,
    header: Dataset | None,
    label_map: np.ndarray,
    lungs: np.ndarray | None,
    *,
    seg: bool = True,
    sr: bool = True,
    identity: OutputIdentity | None = None,
    settings: OutputSettings | None = None,
) -> ScanObjects:
    """Build the asked-for objects of an analysed DICOM series (the SR references the SEG, so
    a SEG is built for an SR alone too). Raises InputError for volumes without DICOM headers."""
    if not (seg or sr):
        return ScanObjects(None, None)
    if header is None:
        raise InputError(
            "DICOM outputs need a DICOM source series", source="series", attribute="header"
        )
    lung_map = lungs if lungs is not None else np.zeros(label_map.shape, dtype=np.uint8)
    chosen = settings or OutputSettings()
    header = output_header(header, copy_source_equipment=chosen.copy_source_equipment)
    if not str(header.get("FrameOfReferenceUID", "") or "").strip():
        # Optional for the analysis, but a CT SEG's frames live in the source's frame of
        # reference: without it there is no SEG to write (found by the reliability fuzzing).
        raise InputError(
            "is absent or unreadable, and a DICOM SEG needs it",
            source="series",
            attribute="FrameOfReferenceUID",
        )
    segmentation = build_seg(
        result, volume, header, label_map, lung_map, identity=identity, seg_type=chosen.seg_type
    )
    report = build_sr(result, segmentation, header, identity=identity) if sr else None
    return ScanObjects(
        seg=to_bytes(segmentation) if seg else None,
        sr=to_bytes(report) if report is not None else None,
    )


# Patient Sex is an enumerated Type 2 attribute; highdicom refuses anything else.
_PATIENT_SEX_VALUES: Final = frozenset({"M", "F", "O", ""})

# The Patient, General Study and Patient Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2; root
# attributes, as highdicom 0.28 lists them): what a SEG/SR must say about whose study it is.
PATIENT_AND_STUDY: Final = (
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "ReferencedPatientSequence", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientComments",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
    "ReferencedStudySequence", "StudyID", "RequestingService", "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize", "PatientSizeCodeSequence",
    "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension", "PatientWeight",
    "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit",
    "ReasonForVisitCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence",
    "PatientState",
)  # fmt: skip
# What places each mask frame on its source slice (identity, geometry, image description).
SOURCE_GEOMETRY: Final = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "ImageOrientationPatient",
    "ImagePositionPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "Rows",
    "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "InstanceNumber",
)  # fmt: skip
# The source's acquisition equipment: highdicom copies it into ContributingEquipmentSequence
# when the source has a Manufacturer. It names the hospital and the scanner, so it goes into
# outputs only when the operator opts in (`OutputSettings.copy_source_equipment`).
SOURCE_EQUIPMENT: Final = (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime",
)  # fmt: skip

# Type 2 attributes of the Patient and General Study modules that highdicom copies from the
# source header into the SEG and SR (found missing by the reliability fuzzing, issue 8): an
# absent, unreadable or invalid one is written empty (unknown), never fails the outputs.
_TYPE2_COPIED: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_TEMPORAL_VRS: Final = {"DA": DA, "TM": TM, "DT": DT}


def output_header(header: Dataset, *, copy_source_equipment: bool = False) -> Dataset:
    """The part of the source's first header that SEG and SR may carry, made valid.

    A new data set with only the patient and study modules, the geometry and, when asked for,
    the acquisition equipment (see the tuples above): nothing else of the source can reach an
    output. Values a valid SEG/SR cannot carry are left empty (Type 2: unknown) or dropped: an
    element whose raw value does not convert, a date or time that is not one (say a birth
    date `19231345` or a study time `NOTATIME`), a Patient Sex outside M/F/O. Anonymised
    exports drop Type 2 attributes; highdicom reads each as an attribute, so they are added
    empty.
    """
    keep: tuple[str, ...] = PATIENT_AND_STUDY + SOURCE_GEOMETRY
    if copy_source_equipment:
        keep += SOURCE_EQUIPMENT
    out = Dataset()
    for keyword in keep:
        if keyword not in header:
            continue
        try:
            element = header[keyword]
        except Exception:  # a raw value that does not convert: drop it
            continue
        if not _valid_temporal(element.VR, element.value):
            continue
        out.add(copy.deepcopy(element))
    for keyword in _TYPE2_COPIED:
        if keyword not in out:
            setattr(out, keyword, "")
    if str(out.get("PatientSex", "") or "") not in _PATIENT_SEX_VALUES:
        out.PatientSex = ""
    return out


def _valid_temporal(vr: str, value: object) -> bool:
    """False for a DA, TM or DT value that does not parse as one (other VRs: True)."""
    parse = _TEMPORAL_VRS.get(vr)
    if parse is None or value is None or value == "":
        return True
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        for item in values:
            parse(str(item))
    except ValueError:
        return False
    return True


def analysis_objects(
    analysis: ScanAnalysis,
    *,
    seg: bool = True,
    sr: bool = True,
    settings: OutputSettings | None = None,
) -> ScanObjects:
    """`scan_objects` of a finished analysis."""
    return scan_objects(
        analysis.result,
        analysis.volume,
        analysis.source_header,
        analysis.label_map,
        analysis.lung_map,
        seg=seg,
        sr=sr,
        settings=settings,
    )


__all__ = [
    "LESION_SEGMENTS",
    "LUNG_SEGMENTS",
    "OutputIdentity",
    "OutputSettings",
    "ScanObjects",
    "analysis_objects",
    "build_seg",
    "build_sr",
    "output_header",
    "scan_objects",
    "segment_masks",
    "source_datasets",
    "to_bytes",
]
