"""A real Orthanc (Debian `orthanc` with its DICOMweb plugin, `orthanc-dicomweb`) on loopback
for tests: the PACS the pushes land in, and a DICOMweb client of the listener's STOW-RS."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from inprocess_gateway import free_port

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_AE = "ORTHANC"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# Orthanc's REST and DICOMweb API want HTTP basic auth (what a STOW-RS push must give).
ORTHANC_USER, ORTHANC_PASSWORD = "ctjoint", "stow-secret"


@dataclass(frozen=True)
class Orthanc:
    dicom_port: int
    http_port: int

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def call(self, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> Any:
        """One REST call with the test user's basic auth; the JSON answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        token = base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read() or b"null")


@contextlib.contextmanager
def running_orthanc(folder: Path, extra: dict[str, Any] | None = None) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb and basic auth, on free ports, until the block ends (it listens on
    all interfaces; tests talk to it on 127.0.0.1 only); `extra` adds configuration keys
    (e.g. DicomModalities, so an AE may query and retrieve)."""
    for path, package in ((ORTHANC, "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb")):
        if not os.path.exists(path):
            reason = f"{path} (Debian {package}) is not installed"
            if os.geteuid() == 0:
                pytest.fail(f"{reason}; `make test` installs it when run as root")
            pytest.skip(f"{reason}; install it to test against Orthanc")
    server = Orthanc(free_port(), free_port())
    config = {
        "Name": "ctjoint-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "DicomAet": ORTHANC_AE,
        "DicomPort": server.dicom_port,
        "HttpPort": server.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **(extra or {}),
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
