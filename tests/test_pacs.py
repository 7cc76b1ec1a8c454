"""PACS push: after a scan the gateway C-STOREs its SEG and SR to a real Orthanc on loopback,
and a PACS that is down costs retries and an outcome in the result, never the result."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from inprocess_gateway import free_port, scan_in_process
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.pacs import PacsDestination, push_blocking
from ctjoint.gateway.series import list_series_files
from ctjoint.v1 import scan_pb2

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_AE = "ORTHANC"


@dataclass(frozen=True)
class Orthanc:
    dicom_port: int
    http_port: int

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not os.path.exists(ORTHANC):
        reason = f"{ORTHANC} (Debian orthanc) is not installed"
        if os.geteuid() == 0:
            pytest.fail(f"{reason}; `make test` installs it when run as root")
        pytest.skip(f"{reason}; install the orthanc package to test the PACS push")
    folder = tmp_path_factory.mktemp("orthanc")
    server = Orthanc(free_port(), free_port())
    config = {
        "Name": "ctjoint-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "DicomAet": ORTHANC_AE,
        "DicomPort": server.dicom_port,
        "HttpPort": server.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with {process.returncode}; see {folder}/orthanc.log")
            try:
                server.get("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("Orthanc did not answer HTTP within 30 s")
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    case = tmp_path_factory.mktemp("pacs_phantom")
    write_phantom_case(case, kind="cap", seed=3, slices=8, size=64)
    return [p.read_bytes() for p in list_series_files(case / "series")]


def _scan_through_gateway(
    files: list[bytes], model_dir: Path, pacs: PacsDestination
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
    assert "continuing in the background" in result.pacs.error
    assert elapsed < 15.0
