"""`ctjoint send`: stream one series folder to the gateway and save what comes back.

One DICOM file per message after a header, a rich progress display fed by the gateway's own
progress events, retries with backoff while the gateway is UNAVAILABLE (not up yet, loading
its models, draining), and on failure one line naming the gRPC status code and the gateway's
message. Scanner-side code: imports grpc, numpy, rich, the generated proto and nothing heavy.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ctjoint.client.channel import ChannelSecurity, open_channel
from ctjoint.client.errors import (
    EXIT_LOCAL,
    ChannelConfigError,
    ResultFormatError,
    SendError,
)
from ctjoint.client.render import format_summary, write_result_json
from ctjoint.client.results import decode_label_map, result_dict
from ctjoint.client.series_choice import choose_series
from ctjoint.contracts import ADMITTED_METADATA, REQUEST_ID_METADATA
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

log = logging.getLogger(__name__)

RESULT_JSON: Final = "result.json"
OVERLAY_PNG: Final = "overlay.png"
SELECTION_JSON: Final = "selection.json"
SEG_DCM: Final = "seg.dcm"
SR_DCM: Final = "sr.dcm"
MASKS_NPZ: Final = "masks.npz"
# Results carry a zlib'd label map and a PNG: raise gRPC's 4 MiB receive default deliberately.
MAX_RECEIVE_MESSAGE_BYTES: Final = 256 * 1024 * 1024
# Backoff between attempts while the gateway is UNAVAILABLE: 0.5 s doubling to 8 s.
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 8.0
_FILE_REF: Final = re.compile(r"\bfile (\d+)\b")


@dataclass(frozen=True)
class SendOutcome:
    """What one successful send produced."""

    message: scan_pb2.ScanResult
    result: dict[str, Any]
    files: tuple[Path, ...]
    seconds: float
    attempts: int
    written: tuple[Path, ...] = field(default=())


def list_series_files(folder: Path) -> list[Path]:
    """The files to send: non-hidden regular files directly in `folder`, sorted by name."""
    if not folder.is_dir():
        raise SendError(f"{folder}: not a folder", exit_code=EXIT_LOCAL)
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not files:
        raise SendError(f"{folder}: no file to send", exit_code=EXIT_LOCAL)
    return files


def scan_requests(
    files: Sequence[Path],
    header: scan_pb2.ScanHeader,
    on_sent: Callable[[int], None] | None = None,
    admitted: Callable[[], bool] | None = None,
) -> Iterator[scan_pb2.ScanRequest]:
    """The request stream: the header, then each file read only when gRPC asks for it. With
    `admitted`, files follow only once it says the gateway holds a slot for the scan."""
    yield scan_pb2.ScanRequest(header=header)
    if admitted is not None and not admitted():
        return
    for count, path in enumerate(files, start=1):
        yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=path.read_bytes()))
        if on_sent is not None:
            on_sent(count)


def send_series(
    series_dir: Path,
    *,
    gateway: str,
    model: str,
    out_dir: Path | None = None,
    timeout: float = 600.0,
    retries: int = 5,
    show_progress: bool = True,
    console: Console | None = None,
    seg: bool = False,
    sr: bool = False,
    security: ChannelSecurity | None = None,
) -> SendOutcome:
    """Send a series, print a short summary, write result.json/overlay.png/masks.npz to out_dir
    (and seg.dcm / sr.dcm when `seg` / `sr` ask the gateway for them)."""
    # soft_wrap: summary lines stay whole when piped (rich would wrap them at 80 columns).
    out = console or Console(soft_wrap=True, highlight=False)
    files = list_series_files(series_dir)
    choice = choose_series(files)
    if choice.several:
        # A study: send the one series the rules choose (client/series_choice.py).
        if choice.chosen is None:
            reasons = "; ".join(f"series {c.number}: {why}" for c, why in choice.skipped)
            raise SendError(f"{series_dir}: no series to analyse ({reasons})", exit_code=EXIT_LOCAL)
        files = list(choice.files)
        out.print(f"series {choice.chosen.number} chosen: {choice.reason}", markup=False)
        for candidate, why in choice.skipped:
            out.print(f"series {candidate.number} skipped: {why}", markup=False)
    header = scan_pb2.ScanHeader(
        request_id=uuid.uuid4().hex[:16],
        model=model,
        outputs=scan_pb2.OutputOptions(
            masks=out_dir is not None, overlay=out_dir is not None, seg=seg, sr=sr
        ),
        expected_files=len(files),
    )
    started = time.perf_counter()
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    message, attempts = _call_with_retries(
        gateway,
        files,
        header,
        timeout=timeout,
        retries=retries,
        show_progress=show_progress,
        notify=lambda text: errors.print(text, markup=False),
        security=security,
    )
    seconds = time.perf_counter() - started
    try:
        result = result_dict(message)
    except ResultFormatError as err:
        raise SendError(f"the gateway's answer does not decode: {err}") from err
    out.print(format_summary(result), markup=False)
    written: tuple[Path, ...] = ()
    if out_dir is not None:
        written = write_outputs(message, result, files, out_dir)
        if choice.several:
            selection = out_dir / SELECTION_JSON
            selection.write_text(json.dumps(choice.to_dict(), indent=2) + "\n", encoding="utf-8")
            written = (*written, selection)
        for path in written:
            out.print(f"wrote {path}", markup=False)
    log.info("request %s done in %.2f s after %d attempt(s)", header.request_id, seconds, attempts)
    return SendOutcome(message, result, tuple(files), seconds, attempts, written)


def write_outputs(
    message: scan_pb2.ScanResult, result: dict[str, Any], files: Sequence[Path], out_dir: Path
) -> tuple[Path, ...]:
    """result.json always; overlay.png, masks.npz, seg.dcm and sr.dcm when the answer carries
    them."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / RESULT_JSON]
        write_result_json(result, written[0])
        if message.overlay_png:
            (out_dir / OVERLAY_PNG).write_bytes(message.overlay_png)
            written.append(out_dir / OVERLAY_PNG)
        for name, data in ((SEG_DCM, message.seg_dicom), (SR_DCM, message.sr_dicom)):
            if data:
                (out_dir / name).write_bytes(data)
                written.append(out_dir / name)
        if message.HasField("mask"):
            labels = decode_label_map(message.mask)
            numbers = np.asarray(message.slice_file_number, dtype=np.int64)
            np.savez_compressed(
                out_dir / MASKS_NPZ,
                # [slices, rows, columns] uint8 in assembled order (ascending along the normal).
                labels=labels,
                class_names=np.asarray(list(message.mask.class_names)),
                # For each mask slice, the 1-based number of its file in the order sent (the
                # sorted folder listing). Not the file names: they can carry patient data, and
                # the masks file travels further than the series folder.
                slice_file_number=numbers,
                spacing_mm=np.asarray(result["series"]["spacing_mm"], dtype=np.float64),
            )
            written.append(out_dir / MASKS_NPZ)
    except OSError as err:
        raise SendError(f"cannot write results to {out_dir}: {err}", exit_code=EXIT_LOCAL) from err
    except ResultFormatError as err:
        raise SendError(f"the gateway's mask does not decode: {err}") from err
    return tuple(written)


# --- the call ----------------------------------------------------------------------------------


def _call_with_retries(
    gateway: str,
    files: Sequence[Path],
    header: scan_pb2.ScanHeader,
    *,
    timeout: float,
    retries: int,
    show_progress: bool,
    notify: Callable[[str], None],
    security: ChannelSecurity | None = None,
) -> tuple[scan_pb2.ScanResult, int]:
    deadline = time.monotonic() + timeout
    delay = BACKOFF_FIRST_S
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SendError(
                f"DEADLINE_EXCEEDED: no answer within {timeout:g} s", code="DEADLINE_EXCEEDED"
            )
        try:
            return _call_once(gateway, files, header, remaining, show_progress, security), attempt
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            details = (err.details() if hasattr(err, "details") else None) or str(code)
            retryable = code == grpc.StatusCode.UNAVAILABLE
            if retryable and attempt <= retries and deadline - time.monotonic() > delay:
                notify(f"gateway unavailable ({details}); retry {attempt}/{retries} in {delay:g} s")
                time.sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)
                continue
            raise SendError(
                f"{code.name}: {details}{_file_hint(details, files)}", code=code.name
            ) from None


def _call_once(
    gateway: str,
    files: Sequence[Path],
    header: scan_pb2.ScanHeader,
    timeout: float,
    show_progress: bool,
    security: ChannelSecurity | None = None,
) -> scan_pb2.ScanResult:
    options = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.max_send_message_length", -1),
    ]
    try:
        channel = open_channel(gateway, security, options)
    except ChannelConfigError as err:
        raise SendError(str(err), exit_code=EXIT_LOCAL) from None
    display = _ProgressDisplay(len(files), enabled=show_progress)
    with channel, display:
        stub = scan_pb2_grpc.ScanServiceStub(channel)
        admission = _Admission()
        events = stub.AnalyzeScanWithProgress(
            scan_requests(files, header, display.sent, admission.wait),
            timeout=timeout,
            metadata=((REQUEST_ID_METADATA, header.request_id),),
        )
        admission.follow(events)
        for event in events:
            if event.HasField("result"):
                return event.result
            display.update(event.progress)
    raise SendError("the gateway closed the stream without a result", code="INTERNAL")


class _Admission:
    """Whether the gateway admitted the scan: its ADMITTED_METADATA, read on gRPC's request
    thread before any file is sent. A refused scan (RESOURCE_EXHAUSTED, UNAVAILABLE) then
    costs no upload, and its status is what the caller sees."""

    def __init__(self) -> None:
        self._call: grpc.Call | None = None
        self._known = threading.Event()

    def follow(self, call: grpc.Call) -> None:
        self._call = call
        self._known.set()

    def wait(self) -> bool:
        self._known.wait()
        if self._call is None:
            return False
        # Blocks until the gateway's initial metadata arrives, or the call ends without it.
        metadata = self._call.initial_metadata() or ()
        return any(key == ADMITTED_METADATA and value == "1" for key, value in metadata)


class _ProgressDisplay:
    """Bars for files sent (our side) and for the gateway's validated / inferred counts."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not (enabled and console.is_terminal),
        )
        self._sent = self._progress.add_task("sent", total=total)
        self._validated = self._progress.add_task("validated", total=total)
        self._inferred = self._progress.add_task("inferred", total=None, visible=False)

    def __enter__(self) -> _ProgressDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def sent(self, count: int) -> None:
        # Called from gRPC's request-sending thread; rich's updates are thread-safe.
        self._progress.update(self._sent, completed=count)

    def update(self, event: scan_pb2.Progress) -> None:
        total = event.total or None
        if event.stage == scan_pb2.Progress.STAGE_VALIDATED:
            self._progress.update(self._validated, completed=event.done, total=total)
        elif event.stage == scan_pb2.Progress.STAGE_INFERRED:
            self._progress.update(self._inferred, completed=event.done, total=total, visible=True)


def _file_hint(details: str, files: Sequence[Path]) -> str:
    """' (file 3 is IM0003.dcm)': the gateway names files by number, we know their names."""
    match = _FILE_REF.search(details)
    if match is None:
        return ""
    number = int(match.group(1))
    if not 1 <= number <= len(files):
        return ""
    return f" (file {number} is {files[number - 1].name})"
