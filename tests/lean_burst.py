"""A burst of AnalyzeScan calls fired by h2load (nghttp2's load generator, written in C).

Why: on a 2-core machine a grpc.aio client spends about as much CPU per call as the gateway
does to refuse it, so a burst fired from Python measures the client as much as the gateway.
h2load opens one HTTP/2 connection, starts every call at once as a gRPC request (the
length-prefixed message, `content-type: application/grpc`, `te: trailers`) and logs each
call's time from its start to the end of its response, for about 0.02 ms of CPU a call
(192 calls: 9.4 ms, of which 5.6 ms is starting h2load; a grpc.aio client: 0.17 ms a call).
It cannot read gRPC trailers, so whoever uses it checks the statuses on the gateway's side
(its metrics count each scan by code).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ctjoint.v1 import scan_pb2

SCAN_METHOD = "/ctjoint.v1.ScanService/AnalyzeScan"


def h2load_path() -> str | None:
    return shutil.which("h2load")


def grpc_frame(message: scan_pb2.ScanRequest) -> bytes:
    """One gRPC length-prefixed message: uncompressed flag, 4-byte big-endian length, body."""
    payload = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


@dataclass(frozen=True)
class Burst:
    """What h2load saw: per call, the HTTP status and the seconds from start to response end."""

    http_statuses: tuple[str, ...]
    seconds: tuple[float, ...]
    start_spread_s: float
    summary: str


def fire(address: str, calls: int, request: scan_pb2.ScanRequest, *, timeout: float = 60) -> Burst:
    """Start `calls` AnalyzeScan calls at once on one connection, each sending `request` and
    half-closing; return when all have ended. Raises RuntimeError if h2load fails."""
    h2load = h2load_path()
    if h2load is None:
        raise RuntimeError("h2load is not installed (Debian package nghttp2-client)")
    with tempfile.TemporaryDirectory(prefix="ctjoint-h2load-") as tmp:
        body = Path(tmp) / "request"
        body.write_bytes(grpc_frame(request))
        log = Path(tmp) / "calls.tsv"
        completed = subprocess.run(
            [
                h2load,
                f"--requests={calls}",
                "--clients=1",
                f"--max-concurrent-streams={calls}",
                "--header=content-type: application/grpc",
                "--header=te: trailers",
                f"--data={body}",
                f"--log-file={log}",
                f"http://{address}{SCAN_METHOD}",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if completed.returncode != 0 or not log.exists():
            raise RuntimeError(f"h2load failed ({completed.returncode}): {completed.stdout[-800:]}")
        # Columns: start (microseconds since the epoch), HTTP status, microseconds to the end.
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    starts = [int(row[0]) for row in rows]
    return Burst(
        http_statuses=tuple(row[1] for row in rows),
        seconds=tuple(int(row[2]) / 1e6 for row in rows),
        start_spread_s=(max(starts) - min(starts)) / 1e6 if starts else 0.0,
        summary=_summary(completed.stdout),
    )


def _summary(stdout: str) -> str:
    """h2load's own lines on requests and status codes, for failure messages."""
    keep = ("requests:", "status codes:", "finished in")
    return "; ".join(line.strip() for line in stdout.splitlines() if line.startswith(keep))
