"""Structured gateway logs: one line per event, each carrying the scan's request id.

The request id lives in a ContextVar that the interceptor sets per RPC (every RPC runs in its own
asyncio task, so ids never leak between scans). Identifiers that must be correlated (series
UIDs) are logged only as `pseudonym()` hashes; patient attributes are never logged at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Final, Literal

NO_REQUEST: Final = "-"
REQUEST_ID: ContextVar[str] = ContextVar("ctjoint_request_id", default=NO_REQUEST)

# Caller-chosen ids end up in logs and metrics-free traces: keep them short and plain so that
# nobody can smuggle log lines (newlines) or long free text (a patient name) through them.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
# Candidate DICOM UIDs: digits in dot-separated components (PS3.5 9.1). `_looks_like_uid`
# then keeps version numbers (1.85.1) and IPv4 addresses (127.0.0.1) out.
_UID_RE = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){2,}(?![\w.])")
# Real UIDs have many components (1.2.840.10008...) or one long one (2.25.<128-bit integer>).
_UID_MIN_COMPONENTS = 5
_UID_LONG_COMPONENT = 10

LogFormat = Literal["text", "json"]


def new_request_id() -> str:
    """A fresh random request id (random, so it reveals nothing about the scan)."""
    return uuid.uuid4().hex[:16]


def clean_request_id(candidate: str | None) -> str:
    """The caller's id if it is a plain short token, else a fresh one."""
    # A UID-shaped id would put a study or series UID in every log line: refuse it too.
    if candidate and _REQUEST_ID_RE.match(candidate) and not _looks_like_uid(candidate):
        return candidate
    return new_request_id()


def pseudonym(value: str) -> str:
    """A stable, non-reversible short token for an identifier we must correlate but not show."""
    return "h:" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]


def _looks_like_uid(text: str) -> bool:
    if not _UID_RE.fullmatch(text):
        return False
    parts = text.split(".")
    return len(parts) >= _UID_MIN_COMPONENTS or max(map(len, parts)) >= _UID_LONG_COMPONENT


def scrub_uids(text: str) -> str:
    """Replace anything shaped like a DICOM UID by its pseudonym (defence in depth for messages
    that leave the process: error details and log lines)."""

    def replace(match: re.Match[str]) -> str:
        value = match.group(0)
        return pseudonym(value) if _looks_like_uid(value) else value

    return _UID_RE.sub(replace, text)


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id and scrubs UIDs from its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        message = record.getMessage()
        scrubbed = scrub_uids(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", NO_REQUEST),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s"


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Route the root logger to stderr with request ids; safe to call more than once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
