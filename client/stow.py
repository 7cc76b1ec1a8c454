"""STOW-RS (DICOMweb, PS3.18 10.5) into `ctjoint listen`: a PACS or modality that speaks
DICOMweb POSTs CT instances, which join the same spool, series grouping and forwarding as
C-STORE (client/listen.py).

`POST /studies` and `POST /studies/{study}` take multipart/related; type="application/dicom".
The answer is the PS3.18 store response (application/dicom+json): every stored instance in
ReferencedSOPSequence, every refused one in FailedSOPSequence with its reason; 200 when all
were stored, 202 when some were, 409 when none was. A body that is not such a multipart
message is refused whole (400 malformed, 415 another media type, 413 too large) before
anything is stored. Optional bearer token (401 without it) and TLS. Logs carry counts and
status codes, never UIDs.
"""

from __future__ import annotations

import email.parser
import email.policy
import hmac
import http.server
import io
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ctjoint.client.errors import ClientError
from ctjoint.client.listen import (
    ACCEPTED_SOP_CLASSES,
    STATUS_SUCCESS,
    ListenerSecurity,
    SeriesListener,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES: Final = 2 * 1024**3
# Failure reasons of FailedSOPSequence (PS3.4 C.4.2.1.4 / PS3.18 Table 10.5.3-2).
REASON_CANNOT_UNDERSTAND: Final = 0xC000
REASON_SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
REASON_STUDY_MISMATCH: Final = 0xA900
_PATH: Final = re.compile(r"^/studies(?:/(?P<study>[0-9.]{1,64}))?/?$")


@dataclass(frozen=True)
class StowSettings:
    """How the STOW-RS endpoint is reached and guarded."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str = field(default="", repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class _RefusedError(ClientError):
    """The whole request is refused with `status` (nothing stored)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def dicom_parts(content_type: str, body: bytes) -> list[bytes]:
    """The application/dicom parts of a multipart/related body; _RefusedError when the body is not
    one (400), or is of another media type or holds other parts (415)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if message.get_content_type() != "multipart/related":
        raise _RefusedError(415, "the body must be multipart/related")
    if message.get_param("type") not in ("application/dicom", None):
        raise _RefusedError(415, 'only multipart/related; type="application/dicom" is accepted')
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if message.defects or not parts:
        raise _RefusedError(400, "malformed multipart/related body")
    out = []
    for part in parts:
        if part.get_content_type() != "application/dicom":
            raise _RefusedError(415, f"a part is {part.get_content_type()}, not application/dicom")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise _RefusedError(400, "malformed multipart/related body")
        out.append(payload)
    return out


def _reference(dataset: Dataset | None, reason: int | None) -> Dataset:
    item = Dataset()
    if dataset is not None:
        item.ReferencedSOPClassUID = str(getattr(dataset, "SOPClassUID", "") or "")
        item.ReferencedSOPInstanceUID = str(getattr(dataset, "SOPInstanceUID", "") or "")
    if reason is not None:
        item.FailureReason = reason
    return item


class StowHandler(http.server.BaseHTTPRequestHandler):
    """One request; the server holds the listener and settings (`StowServer`)."""

    server: StowServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        try:
            status, response = self._store()
        except _RefusedError as refused:
            log.warning("stow-rs request refused: %d %s", refused.status, refused.reason)
            # The rest of a refused body may still be on the way: do not read it as a request.
            self.close_connection = True
            self._send(refused.status, json.dumps({"error": refused.reason}).encode(), "json")
            return
        self._send(status, json.dumps(response.to_json_dict()).encode(), "dicom+json")

    def do_GET(self) -> None:
        self._send(405, b'{"error": "only STOW-RS (POST) is served"}', "json")

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: the request line carries Study UIDs; `_store` logs what matters."""

    def _store(self) -> tuple[int, Dataset]:
        settings = self.server.settings
        if settings.token:
            offered = self.headers.get("Authorization", "")
            if not hmac.compare_digest(offered.encode(), f"Bearer {settings.token}".encode()):
                raise _RefusedError(401, "a bearer token is required")
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            raise _RefusedError(404, "POST to /studies or /studies/{StudyInstanceUID}")
        body = self._body(settings.max_body_bytes)
        parts = dicom_parts(self.headers.get("Content-Type", ""), body)
        study = match.group("study")
        listener = self.server.listener
        request = id(self)
        stored: list[Dataset] = []
        failed: list[Dataset] = []
        try:
            for data in parts:
                dataset, reason = self._one(data, study)
                if (
                    dataset is not None
                    and reason is None
                    and listener.store(dataset, request) != STATUS_SUCCESS
                ):
                    reason = REASON_CANNOT_UNDERSTAND
                (failed if reason is not None else stored).append(_reference(dataset, reason))
        finally:
            listener.sender_done(request)
        response = Dataset()
        if stored:
            response.ReferencedSOPSequence = stored
        if failed:
            response.FailedSOPSequence = failed
        status = 200 if not failed else 202 if stored else 409
        log.info("stow-rs: %d stored, %d failed (%d)", len(stored), len(failed), status)
        return status, response

    def _body(self, limit: int) -> bytes:
        """The request body, by Content-Length or chunked (Orthanc sends chunks), at most
        `limit` bytes."""
        too_large = _RefusedError(413, f"the body must be 1 to {limit} bytes")
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise _RefusedError(411, "Content-Length or chunked encoding is required") from None
            if not 0 < length <= limit:
                raise too_large
            return self.rfile.read(length)
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _RefusedError(400, "malformed chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields, unused
                break
            total += size
            if total > limit:
                raise too_large
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after the chunk
        if not total:
            raise too_large
        return b"".join(chunks)

    @staticmethod
    def _one(data: bytes, study: str | None) -> tuple[Dataset | None, int | None]:
        """A part as a data set with its file meta, or why it is refused."""
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except (InvalidDicomError, ValueError, EOFError, OSError):
            return None, REASON_CANNOT_UNDERSTAND
        # CT images, and what a CT study holds besides (the series choice skips those).
        if str(getattr(dataset, "SOPClassUID", "")) not in ACCEPTED_SOP_CLASSES:
            return dataset, REASON_SOP_CLASS_NOT_SUPPORTED
        if study is not None and str(getattr(dataset, "StudyInstanceUID", "")) != study:
            return dataset, REASON_STUDY_MISMATCH
        return dataset, None

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"application/{kind}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class StowServer(http.server.ThreadingHTTPServer):
    """The STOW-RS endpoint of a listener (TLS when `security` has a certificate)."""

    daemon_threads = True

    def __init__(
        self,
        listener: SeriesListener,
        settings: StowSettings,
        security: ListenerSecurity | None = None,
    ) -> None:
        super().__init__((settings.host, settings.port), StowHandler)
        self.listener = listener
        self.settings = settings
        context = security.ssl_context() if security is not None else None
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> Callable[[], None]:
        """Serve on a thread; returns what stops it."""
        thread = threading.Thread(target=self.serve_forever, name="stow-rs", daemon=True)
        thread.start()

        def stop() -> None:
            self.shutdown()
            self.server_close()
            thread.join(10)

        return stop


__all__ = ["StowServer", "StowSettings", "dicom_parts"]
