"""STOW-RS into `ctjoint listen`: Orthanc's DICOMweb plugin, told to send a study to the
listener, is a real third-party STOW-RS client; the study's series is forwarded to the gateway
once, as a C-STORE series is. Malformed bodies and other media types are refused whole with a
clear 4xx and nothing is forwarded; a bearer token and TLS guard the endpoint."""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from gateway_process import GatewayProcess
from orthanc_server import Orthanc, running_orthanc
from tls_certs import self_signed

from ctjoint.client.listen import (
    Forward,
    ListenerSecurity,
    SeriesListener,
    gateway_forward,
    listen,
    series_key,
)
from ctjoint.client.send import RESULT_JSON
from ctjoint.client.stow import REASON_CANNOT_UNDERSTAND, StowSettings
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.series import list_series_files


@pytest.fixture(scope="module")
def gateway(contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("stow_gateway") / "gateway.log"
    process = GatewayProcess(contract_model_dir, log).start()
    try:
        yield process.address
    finally:
        process.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("stow_phantom")
    write_phantom_case(root, kind="covid19", seed=31, slices=4, size=32)
    return list_series_files(root / "series")


@contextlib.contextmanager
def stow_listener(
    tmp_path: Path,
    forward: Forward,
    *,
    token: str = "",
    security: ListenerSecurity | None = None,
) -> Iterator[tuple[int, dict[str, SeriesListener]]]:
    """`listen` with STOW-RS on free loopback ports; yields (STOW port, {"listener": ...})."""
    ports: list[int] = []
    ready, stop = threading.Event(), threading.Event()
    holder: dict[str, SeriesListener] = {}

    def serve() -> None:
        holder["listener"] = listen(
            ae_title="CTJOINT",
            port=0,
            host="127.0.0.1",
            spool=tmp_path / "spool",
            forward=forward,
            quiet_seconds=0.5,
            security=security,
            stow=StowSettings(token=token),
            stop=stop,
            stow_started=lambda port: (ports.append(port), ready.set()),
        )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the listener did not start"
        yield ports[0], holder
    finally:
        stop.set()
        thread.join(30)


def _multipart(parts: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
        for kind, data in parts
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return content_type, body + f"--{boundary}--\r\n".encode()


def _post(
    url: str,
    content_type: str,
    body: bytes,
    *,
    token: str = "",
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_orthanc_sends_a_study_by_stow_rs_and_it_reaches_the_gateway_once(
    gateway: str, orthanc: Orthanc, series: list[Path], tmp_path: Path
) -> None:
    study_ids = {orthanc.call("POST", "/instances", p.read_bytes())["ParentStudy"] for p in series}
    [study] = study_ids
    out = tmp_path / "results"
    forward = gateway_forward(
        gateway=gateway, model="jcs2d", out_root=out, timeout=60.0, seg=False, sr=False
    )
    key = series_key(str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID))
    with stow_listener(tmp_path, forward) as (port, holder):
        orthanc.call(
            "PUT",
            "/dicom-web/servers/ctjoint",
            json.dumps({"Url": f"http://127.0.0.1:{port}/"}).encode(),
        )
        orthanc.call(
            "POST", "/dicom-web/servers/ctjoint/stow", json.dumps({"Resources": [study]}).encode()
        )
        deadline = time.monotonic() + 60
        while not (out / key / RESULT_JSON).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # a second forward would show up by now
    assert holder["listener"].forwarded == [key]
    assert json.loads((out / key / RESULT_JSON).read_text())["series"]["slices"] == len(series)


def test_bad_bodies_get_a_clear_4xx_and_nothing_is_forwarded(
    series: list[Path], tmp_path: Path
) -> None:
    forwarded: list[str] = []
    dicom = series[0].read_bytes()
    with stow_listener(tmp_path, lambda folder, key: forwarded.append(key)) as (port, _):
        url = f"http://127.0.0.1:{port}/studies"
        content_type, body = _multipart([("application/dicom", dicom)])
        # Malformed: the closing boundary and half the part are missing.
        status, answer = _post(url, content_type, body[: len(body) // 2])
        assert status == 400 and answer == {"error": "malformed multipart/related body"}
        # A part that is not DICOM, beside one that is: the request is refused whole.
        content_type, body = _multipart([("application/dicom", dicom), ("text/plain", b"hi")])
        status, answer = _post(url, content_type, body)
        assert status == 415 and "text/plain" in answer["error"]
        # Not multipart at all.
        status, _ = _post(url, "application/dicom", dicom)
        assert status == 415
        # Claims to be DICOM, is not: that instance fails, so the request does (409).
        content_type, body = _multipart([("application/dicom", b"not a DICOM file")])
        status, answer = _post(url, content_type, body)
        assert status == 409
        [failed] = answer["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [REASON_CANNOT_UNDERSTAND]
        time.sleep(1.0)
    assert forwarded == [] and not any((tmp_path / "spool").glob("*/*.dcm"))


def test_stow_rs_over_tls_needs_the_bearer_token(series: list[Path], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "stow")
    forwarded: list[str] = []
    security = ListenerSecurity(tls_cert=cert, tls_key=key)
    context = ssl.create_default_context(cafile=str(cert))
    content_type, body = _multipart([("application/dicom", p.read_bytes()) for p in series])
    with stow_listener(
        tmp_path, lambda folder, key: forwarded.append(key), token="s3cret", security=security
    ) as (port, _):
        url = f"https://127.0.0.1:{port}/studies"
        status, answer = _post(url, content_type, body, context=context)
        assert status == 401 and answer == {"error": "a bearer token is required"}
        status, answer = _post(url, content_type, body, token="s3cret", context=context)
        assert status == 200
        assert len(answer["00081199"]["Value"]) == len(series)
        deadline = time.monotonic() + 20
        while not forwarded and time.monotonic() < deadline:
            time.sleep(0.2)
    uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    assert forwarded == [series_key(uid)]
