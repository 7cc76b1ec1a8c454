"""Structured gateway logs: one line per event, each carrying the scan's request id.

The request id lives in a ContextVar that the interceptor sets per RPC (every RPC runs in its own
asyncio task, so ids never leak between scans). Identifiers that must be correlated (series
UIDs) are logged only as `pseudonym()` keyed hashes; patient attributes are never logged at all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
import traceback
import uuid
from contextvars import ContextVar
from typing import Any, Final, Literal

from ctjoint.contracts import ENV_PSEUDONYM_KEY

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

# Key of the pseudonyms: a secret shared by a deployment's gateways (so their logs correlate),
# else random per process. Never a bare hash: anyone holding a UID could hash it and find it.
_PSEUDONYM_KEY: Final = os.environ.get(ENV_PSEUDONYM_KEY, "").encode(
    "utf-8"
) or secrets.token_bytes(32)


# Error details and log lines quote at most this much of any message (a caller's 8 MiB
# `model` string must not become 8 MiB of log per call).
MAX_MESSAGE_CHARS: Final = 512


def bounded_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` with control and non-ASCII characters escaped (no forged log lines), cut to
    `limit` characters with a note of how much was left out."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in escaped[: limit + 1])
    if len(escaped) <= limit and len(text) <= limit:
        return escaped
    return f"{escaped[:limit]}... ({len(text)} characters in all)"


class RateLimit:
    """At most one log line per `interval_s` for a repeated event: `allow()` says whether to
    log this one and how many were left out since the last one logged."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last = -1e9
        self._skipped = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._skipped += 1
            return None
        skipped, self._skipped, self._last = self._skipped, 0, now
        return skipped


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
    """A stable, non-reversible short token for an identifier we must correlate but not show
    (HMAC-SHA256 under the pseudonym key: stable within a deployment, not recomputable
    outside it)."""
    digest = hmac.new(_PSEUDONYM_KEY, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return "h:" + digest[:12]


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


# DICOM libraries whose log lines quote attribute values ("Invalid value for VR DA: '...'").
QUOTING_LOGGERS: Final = ("pydicom", "highdicom")
# A captured warning reads "path:line: Category: message\n  source line".
_WARNING_RE: Final = re.compile(r"^(?P<where>.*?:\d+): (?P<category>\w+): ", re.DOTALL)


def withhold_warning_text(message: str) -> str:
    """Where and what kind of warning, without its text: libraries quote values in them
    (highdicom: 'The string "<PatientName>" is unlikely to represent ...')."""
    match = _WARNING_RE.match(message)
    if match is None:
        return "warning (text withheld)"
    return f"{match['category']} at {match['where']} (text withheld: it may quote data)"


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id and scrubs UIDs from its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        if record.name == "py.warnings":
            record.msg, record.args = withhold_warning_text(record.getMessage()), None
        elif record.name.split(".")[0] in QUOTING_LOGGERS:
            where = f"{record.name} {record.module}:{record.lineno}"
            record.msg, record.args = f"{where} (text withheld: it may quote data)", None
        message = record.getMessage()
        scrubbed = scrub_uids(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


def format_exception_safely(exc_info: Any) -> str:
    """A traceback (frames and exception types) without foreign exception messages.

    A library's message may quote the value it choked on (highdicom: "'<PatientSex>' is not a
    valid PatientSexValues"), so only our own errors, whose messages name attributes but never
    their values, keep theirs.
    """
    from ctjoint.gateway.errors import CtJointError

    error = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if not isinstance(error, BaseException):
        return ""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    parts = []
    for item in reversed(chain):
        name = type(item).__module__ + "." + type(item).__qualname__
        if isinstance(item, CtJointError):
            detail = scrub_uids(str(item))
        else:
            detail = f"<message withheld: {len(str(item))} characters that may quote data>"
        frames = "".join(traceback.format_tb(item.__traceback__))
        parts.append(f"Traceback (most recent call last):\n{frames}{name}: {detail}")
    return "\n\nwhich led to:\n\n".join(parts)


class SafeFormatter(logging.Formatter):
    """Text lines whose tracebacks go through `format_exception_safely`."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return format_exception_safely(ei)


class JsonFormatter(SafeFormatter):
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
    handler.setFormatter(JsonFormatter() if fmt == "json" else SafeFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Warnings would go to stderr as they are; through logging they get the filter above.
    logging.captureWarnings(True)
