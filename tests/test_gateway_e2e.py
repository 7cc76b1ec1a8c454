"""A real gateway process on 127.0.0.1: scans, every refusal with its status code, health,
reflection, model info, progress and metrics. The gateway must still be SERVING after each."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from dicom_factory import SMALL_SERIES_LESIONS, write_ct_series
from gateway_process import GatewayProcess, analyze, channel, file_bytes, requests
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, generate_uid

from ctjoint.client.results import decode_label_map, result_dict
from ctjoint.contracts import CLASS_NAMES, MODEL_DEEPSC3D, MODEL_JCS2D, SEG_CLASS_NAMES
from ctjoint.gateway.analysis import analyze_directory
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

MAX_FILE_BYTES = 200_000
MAX_SLICES = 40
MAX_CONCURRENT = 2


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = GatewayProcess(
        contract_model_dir,
        log,
        "--max-file-bytes",
        str(MAX_FILE_BYTES),
        "--max-slices",
        str(MAX_SLICES),
        "--max-concurrent-scans",
        str(MAX_CONCURRENT),
        "--grace",
        "5",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def still_serving_afterwards(gateway: GatewayProcess) -> Iterator[None]:
    yield
    assert gateway.alive(), gateway.log()
    assert gateway.health() == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    """8 slices of 32x32 with lesions, files in slice order."""
    return write_ct_series(tmp_path / "series", slices=8, size=32, lesions=SMALL_SERIES_LESIONS)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _edited(path: Path, **values: object) -> bytes:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return _bytes(ds)


def _without(path: Path, keyword: str) -> bytes:
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    return _bytes(ds)


def _refused(gateway: GatewayProcess, contents: list[bytes], **header: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        analyze(gateway.address, contents, **header)
    return info.value


# --- scans that work -----------------------------------------------------------------------


@pytest.mark.parametrize("model", [MODEL_JCS2D, MODEL_DEEPSC3D])
def test_masks_and_result_equal_the_embedded_analysis(
    gateway: GatewayProcess, ct_series_dir: Path, contract_model_dir: Path, model: str
) -> None:
    files = sorted(ct_series_dir.iterdir())
    message = analyze(gateway.address, file_bytes(files), model=model, masks=True)
    embedded = analyze_directory(ct_series_dir, model=model, model_dir=contract_model_dir)
    np.testing.assert_array_equal(decode_label_map(message.mask), embedded.label_map)
    assert list(message.mask.class_names) == list(SEG_CLASS_NAMES)
    ours, theirs = result_dict(message), embedded.result.to_dict()
    ours.pop("timings")
    assert set(theirs.pop("timings")) <= set(result_dict(message)["timings"])
    assert ours == theirs


def test_slice_file_numbers_line_the_mask_up_with_the_files(
    gateway: GatewayProcess, ct_series_dir: Path
) -> None:
    # ct_series_dir names files in reverse slice order: file 1 is the last slice.
    files = sorted(ct_series_dir.iterdir())
    message = analyze(gateway.address, file_bytes(files), masks=True)
    assert list(message.slice_file_number) == list(range(len(files), 0, -1))


def test_result_carries_provenance_and_timings(gateway: GatewayProcess, series: list[Path]) -> None:
    message = analyze(gateway.address, file_bytes(series))
    assert message.request_id == "test"
    assert message.label in CLASS_NAMES
    assert message.model.name == MODEL_JCS2D and message.model.version
    assert message.backend == "embedded-onnxruntime"
    stages = {t.stage for t in message.timings}
    assert {"receive", "read", "preprocess", "infer", "postprocess", "encode"} <= stages
    assert not message.HasField("mask") and not message.overlay_png and not message.seg_dicom


def test_progress_stream_reports_each_stage_then_the_result(
    gateway: GatewayProcess, series: list[Path]
) -> None:
    with channel(gateway.address) as ch:
        stub = scan_pb2_grpc.ScanServiceStub(ch)
        events = list(
            stub.AnalyzeScanWithProgress(requests(file_bytes(series), expected=len(series)))
        )
    assert events[-1].HasField("result")
    progress = [e.progress for e in events[:-1]]
    stage = scan_pb2.Progress
    seen = {p.stage for p in progress}
    expected_stages = {
        stage.STAGE_RECEIVED,
        stage.STAGE_VALIDATED,
        stage.STAGE_PREPROCESSED,
        stage.STAGE_INFERRED,
        stage.STAGE_POSTPROCESSED,
    }
    assert seen == expected_stages
    validated = [p.done for p in progress if p.stage == stage.STAGE_VALIDATED]
    assert validated == list(range(1, len(series) + 1))
    assert all(p.total == len(series) for p in progress if p.stage == stage.STAGE_VALIDATED)


def test_model_info_lists_both_models_with_their_geometry(gateway: GatewayProcess) -> None:
    with channel(gateway.address) as ch:
        info = scan_pb2_grpc.ScanServiceStub(ch).GetModelInfo(scan_pb2.GetModelInfoRequest())
    assert info.backend == "embedded-onnxruntime"
    assert info.default_model == MODEL_JCS2D
    models = {m.name: m for m in info.models}
    assert set(models) == {MODEL_JCS2D, MODEL_DEEPSC3D}
    assert models[MODEL_JCS2D].input.kind == "2.5d" and models[MODEL_JCS2D].input.channels == 3
    assert models[MODEL_DEEPSC3D].input.kind == "3d" and models[MODEL_DEEPSC3D].input.depth > 0
    assert list(models[MODEL_JCS2D].class_names) == list(CLASS_NAMES)
    assert all(m.ready for m in models.values())


def test_model_info_for_an_unserved_model_is_not_found(gateway: GatewayProcess) -> None:
    with channel(gateway.address) as ch, pytest.raises(grpc.RpcError) as info:
        scan_pb2_grpc.ScanServiceStub(ch).GetModelInfo(scan_pb2.GetModelInfoRequest(model="x"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# --- health and reflection -----------------------------------------------------------------


def test_health_answers_for_the_server_and_the_scan_service(gateway: GatewayProcess) -> None:
    assert gateway.health("") == health_pb2.HealthCheckResponse.SERVING
    assert gateway.health("ctjoint.v1.ScanService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_scan_service(gateway: GatewayProcess) -> None:
    with channel(gateway.address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        services = set(database.get_services())
        assert {"ctjoint.v1.ScanService", "grpc.health.v1.Health"} <= services
        described = database.FindFileContainingSymbol("ctjoint.v1.ScanService")
        assert described.package == "ctjoint.v1"


# --- INVALID_ARGUMENT: the message names the file and the attribute --------------------------


def test_an_empty_series_is_invalid(gateway: GatewayProcess) -> None:
    error = _refused(gateway, [])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no CT slice" in error.details()


def test_a_stream_without_header_is_invalid(gateway: GatewayProcess, series: list[Path]) -> None:
    with channel(gateway.address) as ch, pytest.raises(grpc.RpcError) as info:
        only_files = iter([scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=b"x"))])
        scan_pb2_grpc.ScanServiceStub(ch).AnalyzeScan(only_files, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ScanHeader" in info.value.details()


def test_an_unknown_model_is_invalid(gateway: GatewayProcess, series: list[Path]) -> None:
    error = _refused(gateway, file_bytes(series), model="resnet")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"ScanHeader: model: unknown model 'resnet'", error.details())


def test_a_non_dicom_file_is_named(gateway: GatewayProcess, series: list[Path]) -> None:
    contents = file_bytes(series)
    contents[2] = b"this is a text file, not an image\n"
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("file 3: not a DICOM")


def test_a_non_ct_file_is_named(gateway: GatewayProcess, series: list[Path]) -> None:
    contents = file_bytes(series)
    contents[1] = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(r"file 2: Modality: is 'MR'", error.details())


def test_a_file_of_another_study_is_named(gateway: GatewayProcess, series: list[Path]) -> None:
    """Several series of one study are chosen among (tests/test_series_choice_study.py);
    another study in the same scan is refused."""
    contents = file_bytes(series)
    contents[4] = _edited(
        series[4], StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid()
    )
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(r"file 5: StudyInstanceUID: belongs to another study", error.details())


def test_missing_pixel_data_is_named(gateway: GatewayProcess, series: list[Path]) -> None:
    contents = file_bytes(series)
    contents[3] = _without(series[3], "PixelData")
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(r"file 4: PixelData: is absent", error.details())


def test_inconsistent_orientation_is_named(gateway: GatewayProcess, series: list[Path]) -> None:
    contents = file_bytes(series)
    contents[5] = _edited(series[5], ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(r"file 6: ImageOrientationPatient: ", error.details())


def test_inconsistent_pixel_spacing_is_named(gateway: GatewayProcess, series: list[Path]) -> None:
    contents = file_bytes(series)
    contents[6] = _edited(series[6], PixelSpacing=[0.9, 0.9])
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.match(r"file 7: PixelSpacing: ", error.details())


def test_a_missing_slice_is_reported_as_uneven_spacing(
    gateway: GatewayProcess, series: list[Path]
) -> None:
    contents = file_bytes(series)
    del contents[4]
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ImagePositionPatient" in error.details() and "file 4" in error.details()


def test_refusals_carry_no_patient_identifier(gateway: GatewayProcess, series: list[Path]) -> None:
    contents = file_bytes(series)
    contents[4] = _edited(series[4], SeriesInstanceUID=generate_uid())
    error = _refused(gateway, contents)
    first = pydicom.dcmread(series[0])
    for identifier in (str(first.PatientName), first.PatientID, first.SeriesInstanceUID):
        assert identifier not in error.details()
    log = gateway.log()
    for identifier in (str(first.PatientName), first.PatientID, first.StudyInstanceUID):
        assert identifier not in log


# --- FAILED_PRECONDITION -----------------------------------------------------------------------


def test_an_unsupported_transfer_syntax_fails_the_precondition(
    gateway: GatewayProcess, series: list[Path]
) -> None:
    if pydicom.pixels.get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here, so the syntax is supported")
    ds = pydicom.dcmread(series[0])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not really jpeg-ls\xff\xd9"])
    contents = file_bytes(series)
    contents[0] = _bytes(ds)
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert re.match(r"file 1: transfer syntax JPEG-LS", error.details())


# --- RESOURCE_EXHAUSTED ------------------------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused(gateway: GatewayProcess, series: list[Path]) -> None:
    contents = file_bytes(series)
    contents[1] = contents[1] + b"\0" * (MAX_FILE_BYTES - len(contents[1]) + 1)
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.match(rf"file 2: {MAX_FILE_BYTES + 1} bytes exceeds the limit", error.details())


def test_a_message_over_the_receive_limit_is_refused_by_grpc(
    gateway: GatewayProcess, series: list[Path]
) -> None:
    contents = file_bytes(series)
    contents[1] = b"\0" * (4 * MAX_FILE_BYTES)
    error = _refused(gateway, contents)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_many_slices_are_refused(gateway: GatewayProcess, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "long", slices=MAX_SLICES + 1, size=16)
    error = _refused(gateway, file_bytes(files))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.match(rf"file {MAX_SLICES + 1}: .*{MAX_SLICES} slices", error.details())


def test_a_header_announcing_too_many_files_is_refused_at_once(
    gateway: GatewayProcess, series: list[Path]
) -> None:
    error = _refused(gateway, file_bytes(series), expected=MAX_SLICES + 1)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "expected_files" in error.details()


def _in_flight(gateway: GatewayProcess) -> float:
    match = re.search(r"^ctjoint_scans_in_flight (\S+)$", gateway.metrics(), re.MULTILINE)
    return float(match.group(1)) if match else -1.0


def _wait_in_flight(gateway: GatewayProcess, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _in_flight(gateway) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{_in_flight(gateway)} scans in flight, expected {count}")
        time.sleep(0.05)


def _held(release: threading.Event) -> Iterator[scan_pb2.ScanRequest]:
    """A scan that sends its header, then waits (as a slow scanner would)."""
    yield from requests([])
    release.wait(30)


def test_scans_past_the_concurrency_limit_are_refused_at_once(
    gateway: GatewayProcess, series: list[Path]
) -> None:
    release = threading.Event()
    with channel(gateway.address) as ch:
        stub = scan_pb2_grpc.ScanServiceStub(ch)
        held = [stub.AnalyzeScan.future(_held(release), timeout=30) for _ in range(MAX_CONCURRENT)]
        try:
            _wait_in_flight(gateway, MAX_CONCURRENT)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.AnalyzeScan(requests(file_bytes(series)), timeout=30)
            assert time.monotonic() - started < 5.0
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit is 2" in info.value.details()
        finally:
            release.set()
        for future in held:  # the held scans had no file: they end as empty series
            assert future.exception(30).code() == grpc.StatusCode.INVALID_ARGUMENT
    _wait_in_flight(gateway, 0)
    assert analyze(gateway.address, file_bytes(series)).label in CLASS_NAMES


# --- DEADLINE_EXCEEDED -------------------------------------------------------------------------


def test_the_client_deadline_is_honoured(gateway: GatewayProcess) -> None:
    release = threading.Event()
    started = time.monotonic()
    with channel(gateway.address) as ch, pytest.raises(grpc.RpcError) as info:
        scan_pb2_grpc.ScanServiceStub(ch).AnalyzeScan(_held(release), timeout=1.0)
    release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5.0
    _wait_in_flight(gateway, 0)  # the gateway gave the slot back


# --- metrics -----------------------------------------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_scans_by_outcome_and_code(
    gateway: GatewayProcess, series: list[Path]
) -> None:
    before = gateway.metrics()
    analyze(gateway.address, file_bytes(series))
    _refused(gateway, [b"not dicom"])
    after = gateway.metrics()
    ok = dict(model=MODEL_JCS2D, outcome="ok", code="OK")
    bad = dict(model=MODEL_JCS2D, outcome="error", code="INVALID_ARGUMENT")
    assert (
        _sample(after, "ctjoint_scans_total", **ok)
        == _sample(before, "ctjoint_scans_total", **ok) + 1
    )
    assert (
        _sample(after, "ctjoint_scans_total", **bad)
        == _sample(before, "ctjoint_scans_total", **bad) + 1
    )
    slices = _sample(after, "ctjoint_slices_processed_total", model=MODEL_JCS2D)
    assert slices >= _sample(before, "ctjoint_slices_processed_total", model=MODEL_JCS2D) + 8
    for stage in ("receive", "decode", "preprocess", "infer", "postprocess"):
        assert _sample(after, "ctjoint_stage_seconds_count", stage=stage) >= 1
    assert _sample(after, "ctjoint_backend_ready") == 1.0
    assert all(
        line.startswith("ctjoint_") for line in after.splitlines() if not line.startswith("#")
    )
