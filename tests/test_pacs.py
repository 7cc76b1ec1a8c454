"""PACS push: after a scan the gateway C-STOREs its SEG and SR to a real Orthanc on loopback;
a PACS that is down costs retries and an outcome in the result, never the result; a PACS that
never answers does not slow the answers; a push that fails or is skipped is in the result and
the metrics."""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import figures
import pydicom
import pytest
from inprocess_gateway import analyze, free_port, scan_in_process, served_gateway
from orthanc_server import ORTHANC_AE, ORTHANC_PASSWORD, ORTHANC_USER, Orthanc, running_orthanc
from prometheus_client import CollectorRegistry
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom import AE, evt

from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.pacs import (
    DEFAULT_WAIT_S,
    PacsDestination,
    PacsOutcome,
    PacsPusher,
    StowDestination,
    push_blocking,
)
from ctjoint.gateway.series import list_series_files
from ctjoint.v1 import scan_pb2


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    case = tmp_path_factory.mktemp("pacs_phantom")
    write_phantom_case(case, kind="cap", seed=3, slices=8, size=64)
    return [p.read_bytes() for p in list_series_files(case / "series")]


def _scan_through_gateway(
    files: list[bytes], model_dir: Path, pacs: PacsDestination | StowDestination
) -> scan_pb2.ScanResult:
    outputs = scan_pb2.OutputOptions(seg=True, sr=True)
    return scan_in_process(files, model_dir, outputs=outputs, pacs=pacs)


def test_seg_and_sr_land_in_orthanc_and_reference_the_study(
    orthanc: Orthanc,
    phantom_files: list[bytes],
    contract_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pacs = PacsDestination(ORTHANC_AE, "127.0.0.1", orthanc.dicom_port, backoff_s=0.1)
    with caplog.at_level(logging.DEBUG, logger="ctjoint"):
        result = _scan_through_gateway(phantom_files, contract_model_dir, pacs)
    assert result.pacs.stored, result.pacs.error
    assert result.pacs.attempts == 1
    assert list(result.pacs.objects) == ["seg", "sr"]
    source = pydicom.dcmread(pydicom.filebase.DicomBytesIO(phantom_files[0]))
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(result.seg_dicom))
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(result.sr_dicom))
    stored = {}
    for instance in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        stored[tags["SOPInstanceUID"]] = tags
    assert stored[seg.SOPInstanceUID]["SOPClassUID"] == SegmentationStorage
    assert stored[sr.SOPInstanceUID]["SOPClassUID"] == Comprehensive3DSRStorage
    for uid in (seg.SOPInstanceUID, sr.SOPInstanceUID):
        assert stored[uid]["StudyInstanceUID"] == source.StudyInstanceUID
        assert stored[uid]["PatientID"] == source.PatientID
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == source.SeriesInstanceUID
    assert "pacs stored seg,sr" in caplog.text
    for identifier in (str(source.PatientName), source.PatientID, source.StudyInstanceUID):
        assert identifier not in caplog.text


def test_a_pacs_that_is_down_is_retried_and_reported_not_raised(
    phantom_files: list[bytes], contract_model_dir: Path
) -> None:
    down = PacsDestination("NOBODY", "127.0.0.1", free_port(), attempts=2, backoff_s=0.05)
    result = _scan_through_gateway(phantom_files, contract_model_dir, down)
    assert result.label and result.seg_dicom and result.sr_dicom  # the scan result survives
    assert not result.pacs.stored
    assert result.pacs.attempts == 2
    assert "NOBODY@127.0.0.1" in result.pacs.error
    source = pydicom.dcmread(pydicom.filebase.DicomBytesIO(phantom_files[0]))
    assert str(source.PatientName) not in result.pacs.error


def test_nothing_to_send_opens_no_association() -> None:
    nobody = PacsDestination("NOBODY", "127.0.0.1", free_port(), attempts=1)
    outcome = push_blocking(nobody, [])
    assert outcome.stored and outcome.attempts == 0 and outcome.objects == ()


def test_a_pacs_that_hangs_does_not_hold_the_answer_past_its_wait(
    phantom_files: list[bytes], contract_model_dir: Path
) -> None:
    # A socket that accepts connections (the backlog does) but never speaks DICOM.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = int(silent.getsockname()[1])
        hanging = PacsDestination(
            "SILENT", "127.0.0.1", port, attempts=1, timeout_s=3.0, wait_s=0.5
        )
        started = time.monotonic()
        result = _scan_through_gateway(phantom_files, contract_model_dir, hanging)
        elapsed = time.monotonic() - started
    assert result.label and result.seg_dicom
    assert not result.pacs.stored
    assert result.pacs.status == "pending"
    assert "continuing in the background" in result.pacs.error
    assert elapsed < 15.0


@dataclass
class SilentPacs:
    """A real DIMSE peer (pynetdicom storage SCP) that accepts associations and C-STORE
    requests, and then never answers them: the PACS that hangs."""

    port: int
    received: threading.Event
    release: threading.Event


@pytest.fixture
def silent_pacs() -> Iterator[SilentPacs]:
    received, release = threading.Event(), threading.Event()

    def hold(event: Any) -> int:
        received.set()
        release.wait(60)
        return 0xA700  # out of resources, should it ever answer

    ae = AE(ae_title="SILENT")
    ae.add_supported_context(SegmentationStorage)
    ae.add_supported_context(Comprehensive3DSRStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, hold)])
    try:
        yield SilentPacs(int(server.server_address[1]), received, release)
    finally:
        release.set()
        server.shutdown()


def test_a_pacs_that_never_answers_does_not_slow_the_answers(
    phantom_files: list[bytes], contract_model_dir: Path, silent_pacs: SilentPacs
) -> None:
    """Two gateways, one without a PACS and one pushing to the silent peer, scanned in turn:
    only the first answer of the second waits (the bound, 1 s); the others do not wait."""
    outputs = scan_pb2.OutputOptions(seg=True, sr=True)
    pacs = PacsDestination("SILENT", "127.0.0.1", silent_pacs.port)
    assert pacs.wait_s == DEFAULT_WAIT_S == 1.0
    metrics_port = free_port()

    async def timed(channel: Any) -> tuple[float, scan_pb2.ScanResult]:
        started = time.perf_counter()
        result = await analyze(channel, phantom_files, outputs)
        return time.perf_counter() - started, result

    async def main() -> tuple[list[float], list[float], list[scan_pb2.ScanResult], str]:
        async with (
            served_gateway(contract_model_dir) as plain,
            served_gateway(contract_model_dir, pacs=pacs, metrics_port=metrics_port) as pushing,
        ):
            await timed(plain)  # warm both
            first, answer = await timed(pushing)
            assert answer.pacs.status == "pending", answer.pacs
            assert first < 1.0 + DEFAULT_WAIT_S + 5.0
            without, with_pacs, answers = [], [], []
            for _ in range(6):
                seconds, _ = await timed(plain)
                without.append(seconds)
                seconds, answer = await timed(pushing)
                with_pacs.append(seconds)
                answers.append(answer)
            scrape = await asyncio.to_thread(_get_text, f"http://127.0.0.1:{metrics_port}/metrics")
            return without, with_pacs, answers, scrape

    without, with_pacs, answers, scrape = asyncio.run(main())
    assert silent_pacs.received.is_set()  # the peer really took the association and a store
    assert all(a.pacs.status == "pending" and not a.pacs.stored for a in answers)
    assert all("still sending after 0.0 s" in a.pacs.error for a in answers)
    figures.record(
        "pacs that never answers: scan seconds (median of 6, paired)",
        without_pacs=round(statistics.median(without), 3),
        silent_pacs=round(statistics.median(with_pacs), 3),
        ratio=round(statistics.median(with_pacs) / statistics.median(without), 3),
    )
    # A wait for the peer would add the whole bound (1 s) to every answer; the pushing
    # gateway's own extra work (SEG, SR, queueing the store) is far less. Half the bound keeps
    # this a test of "no wait", not a ratio that a loaded machine's noise can break.
    slower = statistics.median(with_pacs) - statistics.median(without)
    assert slower < 0.5 * DEFAULT_WAIT_S, (without, with_pacs)
    # Seven pushes: two sending (held by the peer), five queued; none has ended yet.
    assert "ctjoint_pacs_pushes_in_flight 7.0" in scrape


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def test_pushes_beyond_the_bounded_queue_are_skipped_and_counted(
    silent_pacs: SilentPacs,
) -> None:
    registry = CollectorRegistry()
    pacs = PacsDestination("SILENT", "127.0.0.1", silent_pacs.port, workers=1, queued=1)
    pusher = PacsPusher(pacs, registry=registry)
    try:
        sending = pusher.submit([("seg", _tiny_seg_bytes())])
        assert silent_pacs.received.wait(10)
        waiting = pusher.submit([("seg", b"")])
        refused = pusher.submit([("seg", b""), ("sr", b"")])
        assert not isinstance(sending, PacsOutcome) and not isinstance(waiting, PacsOutcome)
        assert isinstance(refused, PacsOutcome)
        assert refused.status == "skipped" and refused.objects == ("seg", "sr")
        assert refused.error == "2 pushes already in flight; not sent"
        skipped = registry.get_sample_value("ctjoint_pacs_pushes_total", {"status": "skipped"})
        assert skipped == 1.0
        assert registry.get_sample_value("ctjoint_pacs_pushes_in_flight") == 2.0
    finally:
        pusher.close()
    # Closing drops what waits (counted as skipped) and takes no more.
    assert waiting.result(timeout=5).status == "skipped"
    assert pusher.submit([("sr", b"")]).status == "skipped"  # type: ignore[union-attr]
    assert registry.get_sample_value("ctjoint_pacs_pushes_total", {"status": "skipped"}) == 3.0


def _tiny_seg_bytes() -> bytes:
    """Any Part-10 data set the silent peer accepts a C-STORE of (it never answers)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _edited(files: list[bytes], change: Any) -> list[bytes]:
    """`files` with `change(dataset)` applied to every one, the first included."""
    out = []
    for content in files:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(content))
        change(ds)
        buffer = pydicom.filebase.DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_invalid_dates_give_seg_sr_and_a_stored_push_not_internal(
    orthanc: Orthanc, phantom_files: list[bytes], contract_model_dir: Path
) -> None:
    def invalid_dates(ds: pydicom.Dataset) -> None:
        ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19231345", "NOTADATE", "NOTATIME"

    pacs = PacsDestination(ORTHANC_AE, "127.0.0.1", orthanc.dicom_port, backoff_s=0.1)
    result = _scan_through_gateway(_edited(phantom_files, invalid_dates), contract_model_dir, pacs)
    assert result.pacs.status == "stored", result.pacs.error
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(result.seg_dicom))
    assert (seg.PatientBirthDate, seg.StudyDate, seg.StudyTime) == ("", "", "")


def test_a_push_without_dicom_outputs_is_reported_skipped_in_result_and_metrics(
    phantom_files: list[bytes], contract_model_dir: Path
) -> None:
    def no_frame_of_reference(ds: pydicom.Dataset) -> None:
        del ds.FrameOfReferenceUID

    files = _edited(phantom_files, no_frame_of_reference)
    nobody = PacsDestination("NOBODY", "127.0.0.1", free_port(), attempts=1)
    metrics_port = free_port()

    async def main() -> tuple[scan_pb2.ScanResult, str]:
        async with served_gateway(
            contract_model_dir, pacs=nobody, metrics_port=metrics_port
        ) as channel:
            # The caller asks for no SEG/SR: the scan answers, the push cannot be made.
            result = await analyze(channel, files, scan_pb2.OutputOptions())
            scrape = await asyncio.to_thread(_get_text, f"http://127.0.0.1:{metrics_port}/metrics")
            return result, scrape

    result, scrape = asyncio.run(main())
    assert result.label
    assert result.pacs.status == "skipped" and not result.pacs.stored
    assert result.pacs.attempts == 0
    assert result.pacs.error.startswith("no DICOM outputs: ")
    assert "FrameOfReferenceUID" in result.pacs.error
    assert 'ctjoint_pacs_pushes_total{status="skipped"} 1.0' in scrape


# --- STOW-RS (DICOMweb) to Orthanc's DICOMweb plugin -----------------------------------------


def test_seg_and_sr_land_in_orthanc_by_stow_rs_and_qido_rs_finds_them(
    orthanc: Orthanc, phantom_files: list[bytes], contract_model_dir: Path
) -> None:
    stow = StowDestination(
        orthanc.dicomweb, username=ORTHANC_USER, password=ORTHANC_PASSWORD, backoff_s=0.1
    )
    result = _scan_through_gateway(phantom_files, contract_model_dir, stow)
    assert result.pacs.status == "stored", result.pacs.error
    assert (result.pacs.attempts, list(result.pacs.objects)) == (1, ["seg", "sr"])
    assert result.pacs.destination == orthanc.dicomweb
    source = pydicom.dcmread(pydicom.filebase.DicomBytesIO(phantom_files[0]))
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(result.seg_dicom))
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(result.sr_dicom))
    # QIDO-RS: the study's series, as a DICOMweb client finds them (PS3.18 JSON).
    found = orthanc.get(f"/dicom-web/studies/{source.StudyInstanceUID}/series")
    series = {item["0020000E"]["Value"][0]: item["00080060"]["Value"][0] for item in found}
    assert series[seg.SeriesInstanceUID] == "SEG"
    assert series[sr.SeriesInstanceUID] == "SR"
    instances = orthanc.get(
        f"/dicom-web/studies/{source.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/instances"
    )
    assert [i["00080018"]["Value"][0] for i in instances] == [seg.SOPInstanceUID]


def test_a_stow_rs_server_refusing_the_push_is_retried_and_reported(
    orthanc: Orthanc, phantom_files: list[bytes], contract_model_dir: Path
) -> None:
    wrong = StowDestination(
        orthanc.dicomweb, username=ORTHANC_USER, password="wrong", attempts=2, backoff_s=0.05
    )
    result = _scan_through_gateway(phantom_files, contract_model_dir, wrong)
    assert result.label and result.seg_dicom
    assert (result.pacs.status, result.pacs.attempts) == ("failed", 2)
    assert result.pacs.error == f"STOW-RS to {orthanc.dicomweb}: HTTP 401"
    assert "wrong" not in result.pacs.error


def test_a_stow_rs_server_that_is_down_is_retried_and_reported() -> None:
    down = StowDestination(f"http://127.0.0.1:{free_port()}/dicom-web", attempts=2, backoff_s=0.05)
    outcome = push_blocking(down, [("seg", _tiny_seg_bytes())])
    assert (outcome.status, outcome.attempts, outcome.objects) == ("failed", 2, ("seg",))
    assert outcome.error == f"STOW-RS to {down.name}: ConnectionError"


def test_stow_destinations_refuse_ambiguous_settings() -> None:
    with pytest.raises(ValueError, match="not in the URL"):
        StowDestination("http://user:secret@127.0.0.1:8042/dicom-web")
    with pytest.raises(ValueError, match="not both"):
        StowDestination("https://pacs.example/dicom-web", username="a", token="t")
    with pytest.raises(ValueError, match="http"):
        StowDestination("ftp://pacs.example/dicom-web")
