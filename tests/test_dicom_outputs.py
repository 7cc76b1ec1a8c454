"""DICOM SEG and Comprehensive 3D SR of a scan: dciodvfy-valid, read back into the same masks,
frames on their source slices, measurements equal to the result."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import SMALL_SERIES_LESIONS, write_ct_series
from inprocess_gateway import analyze, served_gateway
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from typer.testing import CliRunner

from ctjoint.cli import app
from ctjoint.client.send import SEG_DCM, SR_DCM, write_outputs
from ctjoint.contracts import MODEL_JCS2D, SEG_CONSOLIDATION, SEG_GROUND_GLASS
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.analysis import ScanAnalysis, analyze_directory
from ctjoint.gateway.dicom_outputs import (
    CLASS_CODES,
    CONSOLIDATION_CODE,
    DIAGNOSIS_CODE,
    LESION_SEGMENTS,
    LUNG_SEGMENTS,
    PNEUMONIA_CODE,
    REVIEW_CODE,
    OutputSettings,
    ScanObjects,
    analysis_objects,
    masks_overlap,
    scan_objects,
    segment_label_map,
    segment_masks,
)
from ctjoint.gateway.series import list_series_files
from ctjoint.v1 import scan_pb2


def dciodvfy_errors(path: Path) -> list[str]:
    """The `Error - ` lines dciodvfy prints for a file (it reports on stderr only)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        reason = "dciodvfy (Debian dicom3tools) is not installed"
        if os.geteuid() == 0:
            pytest.fail(f"{reason}; `make test` installs it when run as root")
        pytest.skip(f"{reason}; install dicom3tools (apt-get) to validate DICOM outputs")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error - " in line]


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = tmp_path_factory.mktemp("seg_phantom")
    write_phantom_case(case, kind="covid19", seed=3, slices=10, size=64)
    return case / "series"


@pytest.fixture(scope="module")
def analysed(phantom_series: Path, contract_model_dir: Path) -> tuple[ScanAnalysis, ScanObjects]:
    analysis = analyze_directory(phantom_series, model=MODEL_JCS2D, model_dir=contract_model_dir)
    objects = scan_objects(
        analysis.result,
        analysis.volume,
        analysis.source_header,
        analysis.label_map,
        analysis.lung_map,
    )
    return analysis, objects


def _write(tmp_path: Path, name: str, data: bytes | None) -> Path:
    assert data is not None
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_seg_and_sr_pass_dciodvfy(
    analysed: tuple[ScanAnalysis, ScanObjects], tmp_path: Path
) -> None:
    _, objects = analysed
    assert dciodvfy_errors(_write(tmp_path, "seg.dcm", objects.seg)) == []
    assert dciodvfy_errors(_write(tmp_path, "sr.dcm", objects.sr)) == []


def test_seg_reads_back_into_the_same_masks(analysed: tuple[ScanAnalysis, ScanObjects]) -> None:
    analysis, objects = analysed
    assert objects.seg is not None and analysis.lung_map is not None
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(objects.seg))
    numbers = [*LESION_SEGMENTS.values(), *LUNG_SEGMENTS.values()]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(analysis.volume.sop_instance_uids),
        segment_numbers=numbers,
    )
    expected = segment_masks(analysis.label_map, analysis.lung_map)
    assert expected[..., :2].any() and expected[..., 2:].any()
    np.testing.assert_array_equal(pixels.astype(bool), expected)


def test_each_seg_frame_lies_on_its_source_slice(
    analysed: tuple[ScanAnalysis, ScanObjects], phantom_series: Path
) -> None:
    analysis, objects = analysed
    assert objects.seg is not None
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(objects.seg))
    sources = {
        ds.SOPInstanceUID: ds
        for ds in (
            pydicom.dcmread(p, stop_before_pixels=True) for p in list_series_files(phantom_series)
        )
    }
    assert seg.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == analysis.volume.series_uid
    assert seg.FrameOfReferenceUID == analysis.volume.frame_of_reference_uid
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in sources[uid].ImagePositionPatient])


def test_segments_name_the_algorithm(analysed: tuple[ScanAnalysis, ScanObjects]) -> None:
    analysis, objects = analysed
    assert objects.seg is not None
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(objects.seg))
    first = seg.get_segment_description(LESION_SEGMENTS["ground_glass"])
    assert first.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert first.algorithm_identification[0].AlgorithmName == f"ctjoint {analysis.result.model}"
    assert first.segmented_property_type == codes.DCM.GroundGlassOpacity


def test_sr_holds_the_volumes_percentages_and_label(
    analysed: tuple[ScanAnalysis, ScanObjects],
) -> None:
    analysis, objects = analysed
    assert objects.sr is not None and objects.seg is not None
    sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(objects.sr))
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(objects.seg))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    volumes: dict[int, float] = {}
    percent: dict[int, float] = {}
    for group in groups:
        [number] = group.referenced_segment.referenced_segment_numbers
        for measurement in group.get_measurements():
            if measurement.name == codes.SCT.Volume:
                volumes[number] = measurement.value
            elif measurement.unit == codes.UCUM.Percent:
                percent[number] = measurement.value
    lesions = analysis.result.lesions.volumes_ml
    quantification = analysis.result.quantification
    assert quantification is not None
    assert volumes[LESION_SEGMENTS["ground_glass"]] == pytest.approx(lesions["ground_glass"])
    assert volumes[LESION_SEGMENTS["consolidation"]] == pytest.approx(lesions["consolidation"])
    for side, number in LUNG_SEGMENTS.items():
        lung = quantification.lung(side)
        assert volumes[number] == pytest.approx(lung.volume_ml)
        assert percent[number] == pytest.approx(lung.percent_involved)
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == seg.StudyInstanceUID
    [scan] = sr.content.get_image_measurement_groups()
    probability = next(m for m in scan.get_measurements() if m.name == codes.DCM.Probability)
    label = analysis.result.label
    assert probability.value == pytest.approx(analysis.result.probabilities[label])
    assert scan.finding_type == PNEUMONIA_CODE
    evaluations = {e.name.value: e.value for e in scan.get_qualitative_evaluations()}
    assert evaluations[DIAGNOSIS_CODE.value] == CLASS_CODES[label]
    review = analysis.result.review.needed
    assert evaluations[REVIEW_CODE.value] == (codes.SCT.Yes if review else codes.SCT.No)


def test_diagnoses_and_findings_use_snomed_ct_codes() -> None:
    """The code table of docs/interoperability.md: standard codes where a concept exists."""
    assert (CLASS_CODES["covid19"].scheme_designator, CLASS_CODES["covid19"].value) == (
        "SCT",
        "840539006",
    )
    assert (CLASS_CODES["cap"].scheme_designator, CLASS_CODES["cap"].value) == ("SCT", "385093006")
    assert CLASS_CODES["normal"].scheme_designator == "99CTJOINT"
    assert (PNEUMONIA_CODE.value, CONSOLIDATION_CODE.value) == ("233604007", "95436008")
    assert hd.sr.CodedConcept("439401001", "SCT", "Diagnosis") == DIAGNOSIS_CODE


def test_analyze_writes_seg_and_sr_files(
    phantom_series: Path, contract_model_dir: Path, tmp_path: Path
) -> None:
    seg_path, sr_path = tmp_path / "out.seg.dcm", tmp_path / "out.sr.dcm"
    result = CliRunner().invoke(
        app,
        [
            *("analyze", str(phantom_series), "--model-dir", str(contract_model_dir)),
            *("--seg", str(seg_path), "--sr", str(sr_path)),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "Distribution:" in result.output
    assert pydicom.dcmread(seg_path).SOPClassUID == SegmentationStorage
    assert pydicom.dcmread(sr_path).SOPClassUID == Comprehensive3DSRStorage


def test_send_writes_the_seg_and_sr_it_received(tmp_path: Path) -> None:
    message = scan_pb2.ScanResult(label="normal", seg_dicom=b"SEG", sr_dicom=b"SR")
    written = write_outputs(message, {"label": "normal"}, [], tmp_path)
    assert (tmp_path / SEG_DCM).read_bytes() == b"SEG"
    assert (tmp_path / SR_DCM).read_bytes() == b"SR"
    assert {p.name for p in written} >= {SEG_DCM, SR_DCM}


# A scanner's acquisition equipment as every file states it (issue 21: highdicom copied it
# into the SEG's Contributing Equipment from the first file whenever Manufacturer was set).
SOURCE_EQUIPMENT = {
    "Manufacturer": "ACME MEDICAL",
    "InstitutionName": "CANARY GENERAL HOSPITAL",
    "InstitutionAddress": "1 CANARY STREET",
    "InstitutionalDepartmentName": "CANARY RADIOLOGY",
    "StationName": "CANARYCT01",
    "DeviceSerialNumber": "CANARY-SN-4711",
    "AcquisitionDateTime": "19990102030405",
}


def _edited_series(folder: Path, changes: dict[str, str]) -> Path:
    """The small test series with `changes` set in every file, the first included."""
    for path in write_ct_series(folder, slices=8, size=32, lesions=SMALL_SERIES_LESIONS):
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def equipment_analysis(
    tmp_path_factory: pytest.TempPathFactory, contract_model_dir: Path
) -> ScanAnalysis:
    folder = _edited_series(tmp_path_factory.mktemp("equipment") / "series", SOURCE_EQUIPMENT)
    return analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir)


def test_seg_and_sr_carry_no_source_equipment_by_default(
    equipment_analysis: ScanAnalysis,
) -> None:
    objects = analysis_objects(equipment_analysis)
    assert objects.seg is not None and objects.sr is not None
    for data in (objects.seg, objects.sr):
        for keyword, value in SOURCE_EQUIPMENT.items():
            assert value.encode() not in data, keyword
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(objects.seg))
    # Our model and highdicom, no acquisition equipment.
    assert [item.Manufacturer for item in seg.ContributingEquipmentSequence] == [
        "ctjoint",
        "Highdicom open-source contributors",
    ]
    assert seg.Manufacturer == "ctjoint"


def test_source_equipment_is_copied_only_when_the_operator_opts_in(
    equipment_analysis: ScanAnalysis,
) -> None:
    objects = analysis_objects(
        equipment_analysis, settings=OutputSettings(copy_source_equipment=True)
    )
    assert objects.seg is not None
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(objects.seg))
    acquisition = seg.ContributingEquipmentSequence[0]
    assert acquisition.Manufacturer == "ACME MEDICAL"
    assert acquisition.InstitutionName == "CANARY GENERAL HOSPITAL"
    assert acquisition.StationName == "CANARYCT01"
    assert acquisition.DeviceSerialNumber == "CANARY-SN-4711"


def test_invalid_dates_and_times_are_emptied_not_fatal(
    tmp_path: Path, contract_model_dir: Path
) -> None:
    invalid = {"PatientBirthDate": "19231345", "StudyDate": "NOTADATE", "StudyTime": "NOTATIME"}
    folder = _edited_series(tmp_path / "series", {**invalid, "AcquisitionDate": "NOTADATE"})
    analysis = analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir)
    objects = analysis_objects(analysis, settings=OutputSettings(copy_source_equipment=True))
    assert objects.seg is not None and objects.sr is not None
    for name, data in (("seg.dcm", objects.seg), ("sr.dcm", objects.sr)):
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert (ds.PatientBirthDate, ds.StudyDate, ds.StudyTime) == ("", "", "")
        assert dciodvfy_errors(_write(tmp_path, name, data)) == []


def test_binary_seg_leaves_empty_frames_out(equipment_analysis: ScanAnalysis) -> None:
    analysis = equipment_analysis  # lesions on 3 of its 8 slices
    objects = analysis_objects(analysis)
    assert objects.seg is not None and analysis.lung_map is not None
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(objects.seg))
    masks = segment_masks(analysis.label_map, analysis.lung_map)
    non_empty = int(masks.any(axis=(1, 2)).sum())  # (slice, segment) pairs with a pixel
    assert non_empty < masks.shape[0] * masks.shape[-1]  # the phantom has empty ones
    assert int(seg.NumberOfFrames) == non_empty


def test_labelmap_seg_reads_back_into_the_same_label_map(
    analysed: tuple[ScanAnalysis, ScanObjects],
) -> None:
    analysis, _ = analysed
    assert analysis.lung_map is not None
    objects = analysis_objects(analysis, settings=OutputSettings(seg_type="labelmap"))
    assert objects.seg is not None and objects.sr is not None
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(objects.seg))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    uids = list(analysis.volume.sop_instance_uids)
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    expected = segment_label_map(analysis.label_map, analysis.lung_map)
    assert (expected == 1).any() and (expected == 3).any() and (expected == 4).any()
    np.testing.assert_array_equal(labels, expected)
    # Its lesions are the binary SEG's lesions, pixel for pixel.
    masks = segment_masks(analysis.label_map, analysis.lung_map)
    np.testing.assert_array_equal(labels == 1, masks[..., 0])
    np.testing.assert_array_equal(labels == 2, masks[..., 1])
    assert seg.get_segment_description(3).segment_label == "Right lung without lesions"
    # Not validated with dciodvfy: Debian 12's dicom3tools (2022) predates Supplement 243 and
    # answers "Information Object Not found" for the label-map SOP class (and so flags the
    # SR's segment references to it); docs/interoperability.md says so.
    sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(objects.sr))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    referenced = {g.referenced_segment.referenced_sop_instance_uid for g in groups}
    assert referenced == {seg.SOPInstanceUID}


def test_an_unknown_seg_type_is_refused() -> None:
    with pytest.raises(ValueError, match="seg_type must be one of"):
        OutputSettings(seg_type="fractional")


def test_the_overlap_check_agrees_with_summing_the_segments() -> None:
    rng = np.random.default_rng(5)
    for density in (0.0, 0.01, 0.2):
        stack = rng.random((3, 16, 16, 4)) < density
        stack[..., 1] &= ~stack[..., 0]  # some cases without overlap
        expected = bool((stack.sum(axis=-1) > 1).any())
        assert masks_overlap(stack) is expected
        assert (
            masks_overlap(np.moveaxis(np.ascontiguousarray(np.moveaxis(stack, -1, 0)), 0, -1))
            is expected
        )


def test_binary_seg_says_its_segments_overlap(analysed: tuple[ScanAnalysis, ScanObjects]) -> None:
    # Lesions lie inside the lungs, so lesion and lung segments share pixels.
    _, objects = analysed
    assert objects.seg is not None
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(objects.seg)).SegmentsOverlap == "YES"


def test_the_gateway_applies_the_operators_seg_settings(
    tmp_path: Path, contract_model_dir: Path
) -> None:
    folder = _edited_series(tmp_path / "series", SOURCE_EQUIPMENT)
    files = [p.read_bytes() for p in list_series_files(folder)]
    settings = OutputSettings(copy_source_equipment=True, seg_type="labelmap")

    async def main() -> scan_pb2.ScanResult:
        async with served_gateway(contract_model_dir, dicom_outputs=settings) as channel:
            return await analyze(channel, files, scan_pb2.OutputOptions(seg=True))

    result = asyncio.run(main())
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(result.seg_dicom))
    assert seg.SegmentationType == "LABELMAP"
    assert seg.ContributingEquipmentSequence[0].InstitutionName == "CANARY GENERAL HOSPITAL"


def test_seg_and_sr_name_the_model_as_contributing_equipment(
    analysed: tuple[ScanAnalysis, ScanObjects],
) -> None:
    analysis, objects = analysed
    for data in (objects.seg, objects.sr):
        assert data is not None
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        models = {
            (item.ManufacturerModelName, item.SoftwareVersions)
            for item in ds.ContributingEquipmentSequence
            if item.Manufacturer == "ctjoint"
        }
        result = analysis.result
        assert (f"ctjoint {result.model}", result.model_version) in models


def test_seg_and_sr_name_the_weights_by_their_sha256(
    analysed: tuple[ScanAnalysis, ScanObjects], contract_model_dir: Path
) -> None:
    analysis, objects = analysed
    assert objects.seg is not None and objects.sr is not None
    weights = contract_model_dir / f"{analysis.result.model}.onnx"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert analysis.result.model_sha256 == expected
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(objects.seg))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmParameters == f"weights_sha256={expected}"
    assert f"weights_sha256={expected}".encode() in objects.sr


def test_masks_and_label_map_equal_the_plain_definition() -> None:
    # Box-restricted writes into calloc'd arrays (issue 22, point 3) against plain comparisons.
    rng = np.random.default_rng(22)
    label_map = np.zeros((40, 24, 24), dtype=np.uint8)
    lungs = np.zeros_like(label_map)
    lungs[5:35, 3:20, 2:11] = 1
    lungs[6:33, 4:21, 12:22] = 2
    label_map[20:30, 8:16, 4:18] = rng.integers(0, 3, size=(10, 8, 14), dtype=np.uint8)
    masks = segment_masks(label_map, lungs)
    plain = np.stack(
        [label_map == SEG_GROUND_GLASS, label_map == SEG_CONSOLIDATION, lungs == 1, lungs == 2],
        axis=-1,
    )
    np.testing.assert_array_equal(masks, plain)
    expected = np.zeros_like(label_map)
    expected[lungs == 1] = 3
    expected[lungs == 2] = 4
    expected[label_map == SEG_GROUND_GLASS] = 1
    expected[label_map == SEG_CONSOLIDATION] = 2
    np.testing.assert_array_equal(segment_label_map(label_map, lungs), expected)
    empty = np.zeros_like(label_map)
    assert not segment_masks(empty, empty).any()
    assert not segment_label_map(empty, empty).any()
    # Overlap from slice 20 on, then in the last slice only: past masks_overlap's first chunk.
    assert masks_overlap(masks)
    assert not masks_overlap(masks[:20])
    stack = np.zeros((40, 4, 4, 2), dtype=bool)
    stack[39, 1, 1] = True
    assert masks_overlap(stack) and not masks_overlap(stack[:39])
