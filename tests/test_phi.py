"""Patient data never leaks: canary values planted in every attribute of the PS3.15 Basic
Application Level Confidentiality Profile (Table E.1-1) that pydicom's dictionary knows, and in
private tags, must not appear in the gateway's logs (debug level), metrics, error messages or
any file it writes. The answer carries none of them; the SEG and SR carry only the patient and
study attributes the caller sent (a valid SEG/SR must), as docs/security.md documents."""

from __future__ import annotations

import hashlib
import os
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import figures
import grpc
import pytest
from dicom_factory import SMALL_SERIES_LESIONS, write_ct_series
from gateway_process import GatewayProcess, analyze, file_bytes
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from ctjoint.v1 import scan_pb2

# PS3.15 Annex E, Table E.1-1: the attributes the Basic Profile removes or replaces (written out
# from the standard's table; retired curve/overlay-era entries pydicom lacks drop out below).
BASIC_PROFILE: tuple[str, ...] = (
    "AccessionNumber", "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDate",
    "AcquisitionDateTime", "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription", "AcquisitionTime", "ActualHumanPerformersSequence",
    "AdditionalPatientHistory", "AdmissionID", "AdmittingDate", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "AdmittingTime", "AffectedSOPInstanceUID", "Allergies",
    "AuthorObserverSequence", "BranchOfService", "CassetteID",
    "CommentsOnThePerformedProcedureStep", "ConcatenationUID",
    "ConfidentialityConstraintOnPatientDataDescription", "ContentCreatorName",
    "ContentCreatorIdentificationCodeSequence", "ContentDate", "ContentSequence", "ContentTime",
    "ContextGroupExtensionCreatorUID", "ContrastBolusAgent", "ContributionDescription",
    "CountryOfResidence", "CreatorVersionUID", "CurrentPatientLocation",
    "CustodialOrganizationSequence", "DerivationDescription", "DetectorID", "DeviceSerialNumber",
    "DeviceUID", "DeviceDescription", "DigitalSignatureUID", "DimensionOrganizationUID",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName",
    "DoseReferenceUID", "EthnicGroup", "FailedSOPInstanceUIDList", "FiducialUID",
    "FillerOrderNumberImagingServiceRequest", "FrameComments", "FrameOfReferenceUID",
    "GantryID", "GeneratorID", "GraphicAnnotationSequence", "HumanPerformerName",
    "HumanPerformerOrganization", "IconImageSequence", "IdentifyingComments", "ImageComments",
    "ImagePresentationComments", "ImagingServiceRequestComments", "Impressions",
    "InstanceCreatorUID", "InstitutionAddress", "InstitutionCodeSequence", "InstitutionName",
    "InstitutionalDepartmentName", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence",
    "InterpretationAuthor", "InterpretationDiagnosisDescription", "InterpretationIDIssuer",
    "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber",
    "IrradiationEventUID", "IssuerOfAdmissionID", "IssuerOfPatientID",
    "IssuerOfServiceEpisodeID", "LargePaletteColorLookupTableUID", "MedicalAlerts",
    "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence",
    "ModifiedImageDescription", "ModifyingDeviceID", "NameOfPhysiciansReadingStudy",
    "NamesOfIntendedRecipientsOfResults", "Occupation", "OperatorIdentificationSequence",
    "OperatorsName", "OriginalAttributesSequence", "OrderCallbackPhoneNumber",
    "OrderEnteredBy", "OrderEntererLocation", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "OverlayComments", "PaletteColorLookupTableUID",
    "ParticipantSequence", "PatientAddress", "PatientAge", "PatientBirthDate",
    "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientID",
    "PatientInstitutionResidence", "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName", "PatientName", "PatientPrimaryLanguageCodeSequence",
    "PatientPrimaryLanguageModifierCodeSequence", "PatientReligiousPreference", "PatientSex",
    "PatientSexNeutered", "PatientSize", "PatientState", "PatientTelephoneNumbers",
    "PatientTransportArrangements", "PatientWeight", "PerformedLocation",
    "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndTime", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName", "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName", "PersonAddress",
    "PersonIdentificationCodeSequence", "PersonName", "PersonTelephoneNumbers",
    "PhysicianApprovingInterpretation", "PhysiciansReadingStudyIdentificationSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest", "PlateID", "PreMedication", "PregnancyStatus",
    "ProtocolName", "ReasonForImagingServiceRequest", "ReasonForStudy",
    "ReferencedDigitalSignatureSequence", "ReferencedFrameOfReferenceUID",
    "ReferencedImageSequence", "ReferencedPatientAliasSequence", "ReferencedPatientSequence",
    "ReferencedPerformedProcedureStepSequence", "ReferencedSOPInstanceMACSequence",
    "ReferencedSOPInstanceUID", "ReferencedSOPInstanceUIDInFile", "ReferencedStudySequence",
    "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianName", "ReferringPhysicianTelephoneNumbers", "RegionOfResidence",
    "RelatedFrameOfReferenceUID", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedProcedureID",
    "RequestedProcedureLocation", "RequestedSOPInstanceUID", "RequestingPhysician",
    "RequestingService", "RequestingServiceCodeSequence", "ResponsibleOrganization",
    "ResponsiblePerson", "ResultsComments", "ResultsDistributionListSequence",
    "ResultsIDIssuer", "ReviewerName", "ScheduledHumanPerformersSequence",
    "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName", "ScheduledStationNameCodeSequence", "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle", "SeriesDate", "SeriesDescription", "SeriesInstanceUID",
    "SeriesTime", "ServiceEpisodeDescription", "ServiceEpisodeID", "SmokingStatus",
    "SOPInstanceUID", "SourceImageSequence", "SpecialNeeds", "StationName",
    "StorageMediaFileSetUID", "StudyComments", "StudyDate", "StudyDescription", "StudyID",
    "StudyIDIssuer", "StudyInstanceUID", "StudyTime", "SynchronizationFrameOfReferenceUID",
    "TemplateExtensionCreatorUID", "TemplateExtensionOrganizationUID", "TextComments",
    "TextString", "TimezoneOffsetFromUTC", "TopicAuthor", "TopicKeywords", "TopicSubject",
    "TopicTitle", "TransactionUID", "UID", "VerifyingObserverIdentificationCodeSequence",
    "VerifyingObserverName", "VerifyingObserverSequence", "VerifyingOrganization",
    "VisitComments",
)  # fmt: skip

# What a valid SEG / SR must copy from its source (Patient, General Study and Patient Study
# modules): the caller's own values coming back to the caller, documented, nothing else.
ECHOED_IN_SEG_SR = frozenset(
    {
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
        "PatientAge", "PatientSize", "PatientWeight", "IssuerOfPatientID", "OtherPatientIDs",
        "OtherPatientNames", "PatientBirthTime", "EthnicGroup", "PatientComments",
        "StudyDescription", "PatientSexNeutered", "OtherPatientIDsSequence",
        "IssuerOfPatientIDQualifiersSequence", "PatientSpeciesDescription",
        "ReferencedStudySequence", "ReferencedPatientSequence",
        "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
        "SmokingStatus", "PregnancyStatus", "MedicalAlerts", "Allergies",
        "AdditionalPatientHistory", "Occupation", "AdmissionID", "IssuerOfAdmissionID",
        "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeID",
        "PatientState", "ResponsiblePerson", "ResponsibleOrganization",
        "ReferringPhysicianIdentificationSequence", "PhysiciansOfRecordIdentificationSequence",
        "PhysiciansReadingStudyIdentificationSequence", "RequestingService",
        "RequestingServiceCodeSequence", "AdmittingDiagnosesCodeSequence",
        # References to the source instances the masks belong to.
        "FrameOfReferenceUID", "ReferencedSOPInstanceUID", "SOPInstanceUID", "SeriesInstanceUID",
    }
)  # fmt: skip
# The profile attributes the gateway may never echo in a SEG/SR, whatever else is allowed.
NEVER_IN_SEG_SR = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "OperatorsName",
    "DeviceSerialNumber", "StationName", "AcquisitionDateTime", "AcquisitionDate",
    "AcquisitionTime", "PerformingPhysicianName", "ProtocolName", "SeriesDescription",
    "ImageComments", "PatientAddress", "PatientTelephoneNumbers", "MilitaryRank",
)  # fmt: skip
# Every scanner writes a Manufacturer; with one, highdicom copies the source's acquisition
# equipment (institution, station, serial, acquisition time) into the SEG unless told not to.
SCANNER_MANUFACTURER = "CANARY SCANNER WORKS"
PRIVATE_CREATOR = "CTJOINT PHI CANARY"
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})


@dataclass
class Canaries:
    """Every planted value by where it went (keyword or private tag); `values` to grep for."""

    by_attribute: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def needles(self) -> dict[str, str]:
        """value -> where it was planted; UIDs also as their bare SHA-256 prefix (what an
        unkeyed pseudonym would have logged)."""
        out = {}
        for where, value in self.by_attribute.items():
            out[value] = where
            if _is_uid(value):
                out[hashlib.sha256(value.encode()).hexdigest()[:12]] = f"sha256({where})"
        return out


def _is_uid(value: str) -> bool:
    return value.startswith("2.25.")


class CanaryMaker:
    """Unique values that fit each VR (dates and UIDs where the VR needs them)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self._seen: set[str] = set()

    def _unique(self, make: object) -> str:
        while True:
            value = make()  # type: ignore[operator]
            if value not in self._seen:
                self._seen.add(value)
                return str(value)

    def text(self) -> str:
        letters = string.ascii_uppercase + string.digits
        return self._unique(lambda: "PHI" + "".join(self._random.choices(letters, k=7)))

    def date(self) -> str:
        return self._unique(
            lambda: (
                f"{self._random.randint(1901, 1939)}{self._random.randint(1, 12):02d}"
                f"{self._random.randint(1, 28):02d}"
            )
        )

    def time(self) -> str:
        return self._unique(lambda: f"0{self._random.randint(1, 9)}1{self._random.randint(0, 9)}"
                            f"37.{self._random.randint(100000, 999999)}")  # fmt: skip

    def uid(self) -> str:
        return self._unique(lambda: f"2.25.{self._random.getrandbits(120)}")

    def for_vr(self, vr: str) -> str | None:
        if vr in _TEXT_VRS:
            return self.text()
        if vr == "DA":
            return self.date()
        if vr == "TM":
            return self.time()
        if vr == "DT":
            return self.date() + self.time()
        if vr == "UI":
            return self.uid()
        if vr == "DS":
            return self._unique(
                lambda: f"{self._random.randint(1000, 9999)}.{self._random.randint(1000, 9999)}7"
            )
        if vr == "IS":
            return self._unique(lambda: str(self._random.randint(10**8, 10**9)))
        if vr == "AS":
            return self._unique(lambda: f"{self._random.randint(100, 999)}D")
        return None  # binary / numeric VRs cannot hold a greppable string


def plant(ds: Dataset, canaries: Canaries, maker: CanaryMaker, *, per_file: dict[str, str]) -> None:
    """Set every profile attribute of `ds` (shared values from `canaries`, per-file ones from
    `per_file`), plus private tags."""
    for keyword in BASIC_PROFILE:
        if keyword not in keyword_dict:
            continue
        if keyword_dict[keyword] >> 16 in (0x0000, 0x0002):
            # Command and file-meta elements do not belong in a stored dataset's body.
            if keyword not in canaries.skipped:
                canaries.skipped.append(keyword)
            continue
        if keyword in per_file:
            setattr(ds, keyword, per_file[keyword])
            continue
        vr = dictionary_VR(keyword_dict[keyword])
        if vr == "SQ":
            value = canaries.by_attribute.get(keyword) or maker.text()
            item = Dataset()
            item.CodeMeaning = value
            setattr(ds, keyword, DicomSequence([item]))
        else:
            value = canaries.by_attribute.get(keyword) or maker.for_vr(vr.split(" or ")[0])
            if value is None:
                if keyword not in canaries.skipped:
                    canaries.skipped.append(keyword)
                continue
            setattr(ds, keyword, value)
        canaries.by_attribute[keyword] = value
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    for offset, vr in ((0x01, "LO"), (0x02, "PN"), (0x03, "UT"), (0x04, "SH")):
        where = f"private (0011,10{offset:02x}) {vr}"
        value = canaries.by_attribute.get(where) or maker.text()
        block.add_new(offset, vr, value)
        canaries.by_attribute[where] = value


def write_canary_series(folder: Path, canaries: Canaries, maker: CanaryMaker) -> list[Path]:
    """A valid series (consistent study/series/frame UIDs, one SOP instance UID per file) with
    canaries everywhere the profile lists, in every file, the first included, and a scanner's
    Manufacturer (what made highdicom copy the acquisition equipment)."""
    paths = write_ct_series(folder, slices=8, size=32, lesions=SMALL_SERIES_LESIONS)
    for path in paths:
        ds = dcmread(path)
        own = maker.uid()
        canaries.by_attribute[f"SOPInstanceUID {path.name}"] = own
        plant(ds, canaries, maker, per_file={"SOPInstanceUID": own})
        ds.Manufacturer = SCANNER_MANUFACTURER
        ds.file_meta.MediaStorageSOPInstanceUID = own
        ds.save_as(path, enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def canary_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Canaries]:
    canaries = Canaries()
    paths = write_canary_series(
        tmp_path_factory.mktemp("phi") / "series", canaries, CanaryMaker(seed=1505)
    )
    return paths, canaries


@dataclass
class PhiGateway:
    process: GatewayProcess
    scratch: Path  # its TMPDIR and HOME: whatever it writes outside the log lands here


@pytest.fixture(scope="module")
def phi_gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PhiGateway]:
    root = tmp_path_factory.mktemp("phi-gateway")
    scratch = root / "scratch"
    scratch.mkdir()
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "HOME")}
    os.environ.update(TMPDIR=str(scratch), HOME=str(scratch))
    try:
        process = GatewayProcess(
            contract_model_dir, root / "gateway.log", "--log-level", "DEBUG", "--log-format", "json"
        )
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield PhiGateway(process, scratch)
    process.stop()


def _leaks(text: str, canaries: Canaries) -> list[str]:
    return sorted(
        f"{where} ({value})" for value, where in canaries.needles().items() if value in text
    )


def _invalid_variants(
    paths: list[Path], canaries: Canaries, folder: Path
) -> dict[str, list[bytes]]:
    """Scans the gateway must refuse, each failing on a profile attribute (or around it)."""
    contents = file_bytes(paths)
    variants: dict[str, list[bytes]] = {}

    def edited(index: int, change: object) -> list[bytes]:
        ds = dcmread(paths[index])
        change(ds)  # type: ignore[operator]
        out = folder / f"edited{len(variants)}.dcm"
        ds.save_as(out, enforce_file_format=True)
        return [*contents[:index], out.read_bytes(), *contents[index + 1 :]]

    maker = CanaryMaker(seed=77)

    def other_study(ds: Dataset) -> None:
        ds.StudyInstanceUID = canaries.by_attribute["other StudyInstanceUID"] = maker.uid()

    def other_series_not_a_uid(ds: Dataset) -> None:
        value = canaries.by_attribute["bad SeriesInstanceUID"] = maker.text() + "^NOT.A.UID"
        ds.SeriesInstanceUID = value

    def no_series(ds: Dataset) -> None:
        del ds.SeriesInstanceUID

    def duplicate_instance(ds: Dataset) -> None:
        ds.SOPInstanceUID = dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID

    def not_ct(ds: Dataset) -> None:
        ds.Modality = "MR"

    variants["study mixed in"] = edited(3, other_study)
    variants["series UID not a UID"] = edited(2, other_series_not_a_uid)
    variants["series UID missing"] = edited(1, no_series)
    variants["duplicate SOP instance"] = edited(4, duplicate_instance)
    # Values that break their VR (pydicom refuses to write them, so bytes are swapped in at
    # equal length): a date, a number and an age that are not, a UID with letters.
    broken = contents[5]
    for keyword in ("PatientBirthDate", "PatientWeight", "PatientAge", "FrameOfReferenceUID"):
        old = canaries.by_attribute[keyword]
        new = maker.text()[: len(old)].ljust(len(old), "Q")
        canaries.by_attribute[f"bad {keyword}"] = new
        broken = broken.replace(old.encode(), new.encode())
    variants["values breaking their VR"] = [*contents[:5], broken, *contents[6:]]
    variants["not CT"] = edited(5, not_ct)
    # A file cut inside its patient module: unreadable.
    variants["truncated in the patient module"] = [
        *contents[:6],
        contents[6][: contents[6].find(canaries.by_attribute["PatientName"].encode()) + 4],
        *contents[7:],
    ]
    return variants


# pydicom warns (in this process) about the invalid UID the test writes on purpose.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_no_canary_leaves_the_gateway_except_in_the_callers_own_seg_and_sr(
    phi_gateway: PhiGateway,
    canary_series: tuple[list[Path], Canaries],
    tmp_path: Path,
) -> None:
    paths, canaries = canary_series
    gateway = phi_gateway.process
    planted = len(canaries.by_attribute)
    # The valid scan, with every output the gateway can make.
    answer = _analyze_all_outputs(gateway.address, file_bytes(paths))
    errors: dict[str, str] = {}
    for name, contents in _invalid_variants(paths, canaries, tmp_path).items():
        with pytest.raises(grpc.RpcError) as refused:
            analyze(gateway.address, contents, timeout=60)
        errors[name] = f"{refused.value.code().name}: {refused.value.details()}"
    assert all(not e.startswith("OK") for e in errors.values())

    seg, sr = answer.seg_dicom, answer.sr_dicom
    assert seg and sr
    answer.ClearField("seg_dicom")
    answer.ClearField("sr_dicom")
    captured = {
        "answer (without SEG/SR)": str(answer) + answer.SerializeToString().hex(),
        "error messages": "\n".join(errors.values()),
        "metrics": gateway.metrics(),
        "log": gateway.log(),
    }
    for path in sorted(p for p in phi_gateway.scratch.rglob("*") if p.is_file()):
        captured[f"file {path}"] = path.read_bytes().decode("latin-1")
    for where, text in captured.items():
        assert not _leaks(text, canaries), f"canaries in {where}: {_leaks(text, canaries)}"
    assert "DEBUG" in captured["log"]  # debug logging really was on

    # SEG / SR: only the patient and study attributes a valid object must carry.
    echoed = {}
    for name, data in (("SEG", seg), ("SR", sr)):
        text = data.decode("latin-1")
        found = {where for value, where in canaries.needles().items() if value in text}
        echoed[name] = sorted(found)
        unexpected = {w for w in found if w.split(" ")[0] not in ECHOED_IN_SEG_SR}
        assert not unexpected, f"{name} carries {sorted(unexpected)}"
        assert not any(w.startswith("private") for w in found)
        assert not found & set(NEVER_IN_SEG_SR)
        assert SCANNER_MANUFACTURER.encode() not in data
    assert "PatientID" in echoed["SEG"] and "StudyInstanceUID" in echoed["SR"]
    figures.record(
        "phi: canaries planted and grepped",
        attributes=planted,
        profile_keywords=len(BASIC_PROFILE),
        in_pydicom=sum(k in keyword_dict for k in BASIC_PROFILE),
        skipped_binary=len(canaries.skipped),
        refused_scans=len(errors),
        refused_codes="/".join(sorted({e.split(":")[0] for e in errors.values()})),
        captured_bytes=sum(len(t) for t in captured.values()),
        echoed_in_seg=len(echoed["SEG"]),
        echoed_in_sr=len(echoed["SR"]),
    )


def _analyze_all_outputs(address: str, contents: list[bytes]) -> scan_pb2.ScanResult:
    from gateway_process import channel

    from ctjoint.v1 import scan_pb2_grpc

    def stream() -> Iterator[scan_pb2.ScanRequest]:
        outputs = scan_pb2.OutputOptions(masks=True, overlay=True, seg=True, sr=True, cam=True)
        yield scan_pb2.ScanRequest(
            header=scan_pb2.ScanHeader(request_id="phi-test", model="jcs2d", outputs=outputs)
        )
        for content in contents:
            yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))

    with channel(address) as ch:
        return scan_pb2_grpc.ScanServiceStub(ch).AnalyzeScan(stream(), timeout=120)


def test_the_profile_list_covers_the_identifying_core() -> None:
    known = {k for k in BASIC_PROFILE if k in keyword_dict}
    assert len(known) >= 200
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName"} <= known
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= known
