"""Follow-up through a real gateway and a real Orthanc: the first study's SR is pushed, each
follow-up is compared with it (found by C-FIND/C-GET or by QIDO-RS/WADO-RS), and a patient
without a prior, an Orthanc that is down and one that hangs each still get their answer on
time, saying why there is no comparison.

Categories are asserted against the phantom truth with the bundled jcs2d weights, whose
labels and volumes are reliable on these phantoms (docs/follow-up.md). For deepsc3d the test
also asserts that the gateway's comparison is the comparison of its two answers; its truth
categories are asserted too, the resolved follow-up as a strict expected failure (the bundled
deepsc3d still labels that lesion-free rescan pneumonia, a known open issue).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import figures
import grpc.aio
import pydicom
import pytest
from inprocess_gateway import free_port
from orthanc_server import ORTHANC_AE, ORTHANC_PASSWORD, ORTHANC_USER, Orthanc, running_orthanc
from test_dicom_outputs import dciodvfy_errors

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.export.phantom import write_phantom_case
from ctjoint.export.phantom_followup import CHANGES, write_follow_up
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.comparison import compare
from ctjoint.gateway.comparison_sr import CHANGE_CATEGORY_CODE
from ctjoint.gateway.pacs import Destination, PacsDestination, StowDestination
from ctjoint.gateway.prior_report import measurements_from_message
from ctjoint.gateway.series import list_series_files
from ctjoint.gateway.server import GatewayConfig, serve
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

SIZE, SLICES = 96, 24
MODELS = (MODEL_JCS2D, MODEL_DEEPSC3D)
CALLING_AE = "CTJOINT"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    # The gateway's AE is a known modality: Orthanc answers its C-FIND and C-GET.
    modalities = {"DicomModalities": {"ctjoint": [CALLING_AE, "127.0.0.1", free_port()]}}
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), modalities) as server:
        yield server


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[bytes]]:
    """The first study, a follow-up per change, and another patient's study (files)."""
    root = tmp_path_factory.mktemp("followup")
    write_phantom_case(root / "first", kind="covid19", seed=3, slices=SLICES, size=SIZE)
    for change in CHANGES:
        write_follow_up(root / "first", root / change, change=change)
    write_phantom_case(root / "stranger", kind="cap", seed=5, slices=16, size=64)
    return {
        name: [p.read_bytes() for p in list_series_files(root / name / "series")]
        for name in ("first", *CHANGES, "stranger")
    }


def _dimse(orthanc: Orthanc) -> PacsDestination:
    return PacsDestination(
        ORTHANC_AE, "127.0.0.1", orthanc.dicom_port, calling_ae_title=CALLING_AE, backoff_s=0.1
    )


def _dicomweb(orthanc: Orthanc) -> StowDestination:
    return StowDestination(
        orthanc.dicomweb, username=ORTHANC_USER, password=ORTHANC_PASSWORD, backoff_s=0.1
    )


@contextlib.asynccontextmanager
async def _gateway(pacs: Destination | None, deadline_s: float = 2.0) -> AsyncIterator[Any]:
    """A gateway serving both bundled networks in this event loop, with a PACS."""
    port = free_port()
    config = GatewayConfig(
        port=port,
        models=MODELS,
        grace_seconds=1.0,
        pacs=pacs,
        prior_deadline_s=deadline_s,
    )
    backend = EmbeddedBackend(MODELS, intra_op_threads=2)
    server = asyncio.ensure_future(serve(config, backend=backend))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            for _ in range(600):
                try:
                    await stub.GetModelInfo(scan_pb2.GetModelInfoRequest(), timeout=1)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
            yield stub
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def _scan(
    stub: Any, files: list[bytes], model: str, overlay: bool = False
) -> tuple[float, scan_pb2.ScanResult]:
    async def requests() -> AsyncIterator[scan_pb2.ScanRequest]:
        outputs = scan_pb2.OutputOptions(sr=True, overlay=overlay)
        yield scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model=model, outputs=outputs))
        for content in files:
            yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))

    started = time.perf_counter()
    result = await stub.AnalyzeScan(requests(), timeout=60)
    return time.perf_counter() - started, result


@pytest.fixture(scope="module")
def follow_ups(orthanc: Orthanc, cases: dict[str, list[bytes]]) -> dict[str, Any]:
    """Each model: the first study analysed (SR pushed), then each follow-up; jcs2d through a
    gateway querying by DIMSE, deepsc3d through one querying by DICOMweb, and jcs2d's
    progressed follow-up through the DICOMweb one too."""

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with _gateway(_dimse(orthanc)) as dimse, _gateway(_dicomweb(orthanc)) as web:
            for model, stub in ((MODEL_JCS2D, dimse), (MODEL_DEEPSC3D, web)):
                _, out[(model, "first")] = await _scan(stub, cases["first"], model)
                for change in CHANGES:
                    out[(model, change)] = await _scan(
                        stub, cases[change], model, overlay=change == "progress"
                    )
            out["web-jcs2d-progress"] = await _scan(web, cases["progress"], MODEL_JCS2D)
        return out

    return asyncio.run(main())


def test_the_first_study_has_no_prior_and_its_sr_is_stored(follow_ups: dict[str, Any]) -> None:
    for model in MODELS:
        first = follow_ups[(model, "first")]
        assert first.pacs.stored, first.pacs.error
        assert not first.comparison.available
        assert first.comparison.reason.startswith(f"no earlier {model} analysis in ")


@pytest.mark.parametrize("change", list(CHANGES))
def test_jcs2d_follow_up_category_matches_the_truth(
    follow_ups: dict[str, Any], change: str
) -> None:
    _, result = follow_ups[(MODEL_JCS2D, change)]
    comparison = result.comparison
    assert comparison.available, comparison.reason
    assert comparison.category == CHANGES[change].category
    assert comparison.interval_days == pytest.approx(14.0, abs=1.0)
    assert comparison.prior_label == "covid19"
    first = follow_ups[(MODEL_JCS2D, "first")]
    assert comparison.prior_total_ml == pytest.approx(first.lesions.total_volume_ml, abs=1e-3)


def test_the_dicomweb_look_up_finds_the_same_prior(follow_ups: dict[str, Any]) -> None:
    _, by_dimse = follow_ups[(MODEL_JCS2D, "progress")]
    _, by_web = follow_ups["web-jcs2d-progress"]
    assert by_web.comparison.available, by_web.comparison.reason
    assert by_web.comparison.category == "progressed"
    assert by_web.comparison.prior_total_ml == by_dimse.comparison.prior_total_ml


@pytest.mark.parametrize("change", list(CHANGES))
def test_deepsc3d_comparison_is_that_of_its_two_answers(
    follow_ups: dict[str, Any], change: str
) -> None:
    first = follow_ups[(MODEL_DEEPSC3D, "first")]
    _, result = follow_ups[(MODEL_DEEPSC3D, change)]
    assert result.comparison.available, result.comparison.reason
    expected = compare(measurements_from_message(first), measurements_from_message(result))
    assert result.comparison.category == expected.category
    assert result.comparison.prior_total_ml == pytest.approx(expected.prior_total_ml, abs=1e-3)


@pytest.mark.parametrize(
    "change",
    [
        "stable",
        "progress",
        "improve",
        # Until 2026-12-04 the bundled deepsc3d labelled this lesion-free rescan pneumonia
        # (a strict xfail); the averaged weights call it normal: `resolved`.
        "resolve",
    ],
)
def test_deepsc3d_follow_up_category_against_the_truth(
    follow_ups: dict[str, Any], change: str
) -> None:
    _, result = follow_ups[(MODEL_DEEPSC3D, change)]
    assert result.comparison.category == CHANGES[change].category


def test_the_sr_references_the_prior_sr_and_carries_the_change(
    follow_ups: dict[str, Any], orthanc: Orthanc, tmp_path: Path
) -> None:
    first = pydicom.dcmread(io.BytesIO(follow_ups[(MODEL_JCS2D, "first")].sr_dicom))
    _, result = follow_ups[(MODEL_JCS2D, "improve")]
    sr = pydicom.dcmread(io.BytesIO(result.sr_dicom))
    evidence = sr.PertinentOtherEvidenceSequence[0]
    assert evidence.StudyInstanceUID == first.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == first.SOPInstanceUID
    codes = []
    for container in sr.ContentSequence:
        for group in container.get("ContentSequence", []):
            for item in group.get("ContentSequence", []):
                if item.ConceptNameCodeSequence[0].get("CodeValue") == CHANGE_CATEGORY_CODE.value:
                    codes.append(item.ConceptCodeSequence[0].CodeValue)
    assert codes == ["improved"]
    path = tmp_path / "sr.dcm"
    path.write_bytes(result.sr_dicom)
    assert dciodvfy_errors(path) == []
    # What the PACS holds is the amended SR.
    assert result.pacs.stored, result.pacs.error
    found = orthanc.call("POST", "/tools/lookup", sr.SOPInstanceUID.encode())
    tags = orthanc.get(f"/instances/{found[0]['ID']}/tags?simplify")
    assert "PertinentOtherEvidenceSequence" in tags


def test_the_overlay_carries_the_comparison_line(follow_ups: dict[str, Any]) -> None:
    import numpy as np
    from PIL import Image

    from ctjoint.render import CAPTION_PLAIN, text_strip_height

    _, result = follow_ups[(MODEL_JCS2D, "progress")]
    with Image.open(io.BytesIO(result.overlay_png)) as image:
        pixels = np.asarray(image.convert("RGB"))
    # The last strip is the comparison line ("vs prior: PROGRESSED ..."), in plain grey.
    last = pixels[-text_strip_height() :]
    assert (last == np.array(CAPTION_PLAIN, dtype=np.uint8)).all(axis=-1).any()


def _stranger_and_failures(
    cases: dict[str, list[bytes]], orthanc: Orthanc
) -> dict[str, tuple[float, scan_pb2.ScanResult]]:
    files = cases["stranger"]

    async def main() -> dict[str, tuple[float, scan_pb2.ScanResult]]:
        out = {}
        async with _gateway(None) as alone:
            await _scan(alone, files, MODEL_JCS2D)  # warm up
            out["alone"] = await _scan(alone, files, MODEL_JCS2D)
        async with _gateway(_dimse(orthanc)) as dimse:
            out["stranger"] = await _scan(dimse, files, MODEL_JCS2D)
            # The first study's PatientID under another issuer is another patient.
            out["issuer"] = await _scan(dimse, _with_issuer(cases["progress"]), MODEL_JCS2D)
        down = PacsDestination("NOBODY", "127.0.0.1", free_port(), attempts=1, wait_s=0.2)
        async with _gateway(down) as gateway:
            out["down"] = await _scan(gateway, files, MODEL_JCS2D)
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = int(silent.getsockname()[1])
            hanging = PacsDestination("SILENT", "127.0.0.1", port, attempts=1, wait_s=0.2)
            async with _gateway(hanging, deadline_s=1.0) as gateway:
                out["hangs"] = await _scan(gateway, files, MODEL_JCS2D)
        return out

    return asyncio.run(main())


def _with_issuer(files: list[bytes]) -> list[bytes]:
    out = []
    for content in files:
        dataset = pydicom.dcmread(io.BytesIO(content))
        dataset.IssuerOfPatientID = "OTHER-HOSPITAL"
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def test_no_prior_down_or_hanging_pacs_still_answer_on_time_with_the_reason(
    cases: dict[str, list[bytes]],
    orthanc: Orthanc,
    follow_ups: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        out = _stranger_and_failures(cases, orthanc)
    # The look-up keys stay in the query: pynetdicom logs none of its identifiers either.
    for name in ("stranger", "progress"):
        source = pydicom.dcmread(io.BytesIO(cases[name][0]))
        assert "C-FIND" in caplog.text or "Find" in caplog.text
        assert source.PatientID not in caplog.text
        assert str(source.PatientName) not in caplog.text
    alone_s, alone = out["alone"]
    assert not alone.HasField("comparison")  # no PACS, no look-up
    for name, why in (
        ("stranger", "no earlier jcs2d analysis in ORTHANC@127.0.0.1"),
        ("down", "association with NOBODY@127.0.0.1"),
        ("hangs", "did not answer within 1 s"),
    ):
        seconds, result = out[name]
        # The correct current answer: the same label and volumes as without a PACS.
        assert result.label == alone.label
        assert result.lesions.total_volume_ml == pytest.approx(alone.lesions.total_volume_ml)
        assert not result.comparison.available
        assert why in result.comparison.reason, result.comparison.reason
        source = pydicom.dcmread(io.BytesIO(cases["stranger"][0]))
        assert source.PatientID not in result.comparison.reason
        # On time: at most the look-up's deadline (1-2 s) and the push's wait beyond the scan.
        assert seconds < alone_s + 2.0 + 0.2 + 1.0, (name, seconds, alone_s)
    other = out["issuer"][1].comparison
    assert not other.available
    assert other.reason.startswith("no earlier jcs2d analysis in ORTHANC@127.0.0.1")
    # The answer never waits for the look-up past its deadline (1 s here).
    assert _timing(out["hangs"][1], "prior_wait") <= 1000.0 + 300.0
    found = [follow_ups[(MODEL_JCS2D, c)][1] for c in CHANGES]
    figures.record(
        "prior look-up (jcs2d, 96x96x24, Orthanc C-FIND + C-GET)",
        lookup_ms_median=round(statistics.median(_timing(r, "prior_lookup") for r in found), 1),
        answer_waited_ms_max=round(max(_timing(r, "prior_wait") for r in found), 1),
        answer_s_without_pacs=round(alone_s, 3),
        answer_s_hanging_pacs=round(out["hangs"][0], 3),
        answer_s_down_pacs=round(out["down"][0], 3),
    )


def _timing(result: scan_pb2.ScanResult, stage: str) -> float:
    return next(t.milliseconds for t in result.timings if t.stage == stage)
