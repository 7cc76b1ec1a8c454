"""pydicom's own test files (issue 8, point 1) through the real client to a real gateway.

Every file that ships with pydicom here (CT, MR, US, RT, SEG, SR, compressed, big endian and
deliberately broken ones) goes out with `ctjoint.client.send.send_series`: once as a one-file
scan asking for every output (masks, overlay, SEG, SR), once in the middle of an otherwise
valid phantom series. Each must come back as a result
or as INVALID_ARGUMENT / FAILED_PRECONDITION naming the file and the problem, and the gateway
must be alive and SERVING at the end. What was tried and answered is printed as figures.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import figures
import pytest
from dicom_factory import write_ct_series
from gateway_process import GatewayProcess
from grpc_health.v1 import health_pb2
from pydicom.data import get_testdata_files
from rich.console import Console

from ctjoint.client.send import SendError, send_series
from ctjoint.contracts import MODEL_JCS2D

# Answers a file may get; anything else (UNKNOWN, INTERNAL, UNAVAILABLE) is a crash or a bug.
ACCEPTED = {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}
# "file 3: Modality: is 'MR', ..." (the gateway) and "(file 3 is x.dcm)" (the client's hint).
_NAMES_FILE = re.compile(r"\bfile (\d+)\b[^:]*: \S")
# A one-file scan whose only file is a localizer has no CT slice at all: no file is at fault.
_EMPTY_SERIES = "no CT slice was received"
_ONE_SLICE = "series: slices: has 1 slice(s)"
# Series-level problems ("series: FrameOfReferenceUID: ... a DICOM SEG needs it"): in a
# one-file scan the series is that file.
_SERIES_PROBLEM = re.compile(r"\bseries: [A-Za-z]+: \S")
PHANTOM_SLICES = 4


def corpus() -> list[Path]:
    """pydicom's test files that are present on this machine (the big ones download on demand
    elsewhere; never here, so the count is what this installation ships)."""
    paths = {Path(p) for p in get_testdata_files()}
    return sorted((p for p in paths if p.is_file()), key=lambda p: (p.name, str(p)))


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("corpus_gateway") / "gateway.log"
    process = GatewayProcess(contract_model_dir, log).start()
    try:
        yield process
    finally:
        process.stop()


def send(folder: Path, address: str, out_dir: Path | None = None) -> tuple[str, str, int]:
    """One real `send_series` call: ("OK", "", slices analysed) or (status name, the client's
    error line, 0). With `out_dir`, everything is asked for (masks, overlay, SEG, SR) and
    written there, as a scanner-side user would."""
    quiet = Console(file=io.StringIO())
    try:
        outcome = send_series(
            folder,
            gateway=address,
            model=MODEL_JCS2D,
            out_dir=out_dir,
            timeout=60,
            retries=0,
            show_progress=False,
            console=quiet,
            seg=out_dir is not None,
            sr=out_dir is not None,
        )
    except SendError as err:
        return err.code or "LOCAL", str(err), 0
    return "OK", "", int(outcome.result["series"]["slices"])


def check_answer(code: str, message: str, *, one_file: bool) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    if code not in ACCEPTED:
        return f"{code}: {message}"
    if code == "OK":
        return None
    if _EMPTY_SERIES in message:
        return None
    if one_file and _SERIES_PROBLEM.search(message):
        return None
    match = _NAMES_FILE.search(message)
    if match is None:
        return f"names no file and problem: {message}"
    return None


def test_pydicom_test_files_get_a_result_or_a_typed_error_naming_the_file(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    files = corpus()
    assert len(files) >= 150, f"only {len(files)} pydicom test files here"
    phantom = write_ct_series(tmp_path / "phantom", slices=PHANTOM_SLICES, size=32)
    one_file: Counter[str] = Counter()
    in_series: Counter[str] = Counter()
    problems: list[str] = []
    valid_single_slices = 0
    started = time.perf_counter()
    for index, path in enumerate(files):
        single = tmp_path / "one" / str(index)
        single.mkdir(parents=True)
        shutil.copy(path, single / path.name)
        code, message, _ = send(single, gateway.address, out_dir=tmp_path / "out" / str(index))
        one_file[code] += 1
        # A valid CT slice passes every per-file check and is then refused as a series of one
        # (series.MIN_SLICES): the message says so.
        valid_single_slices += _ONE_SLICE in message
        problem = check_answer(code, message, one_file=True)
        if problem:
            problems.append(f"{path.name} alone: {problem}")

        # The odd file is the third of five: IM0001, IM0002, IM0002x (it), IM0003, IM0004.
        mixed = tmp_path / "mixed" / str(index)
        mixed.mkdir(parents=True)
        for slice_path in phantom:
            shutil.copy(slice_path, mixed / slice_path.name)
        shutil.copy(path, mixed / "IM0002x.dcm")
        code, message, slices = send(mixed, gateway.address)
        in_series[code] += 1
        problem = check_answer(code, message, one_file=False)
        if problem:
            problems.append(f"{path.name} in a series: {problem}")
        elif code == "OK" and slices != PHANTOM_SLICES:
            # Only a file the series selection skips (a localizer) may leave the scan intact.
            problems.append(f"{path.name} was analysed as part of the phantom series")
        if not gateway.alive():
            pytest.fail(f"the gateway died on {path.name}:\n{gateway.log()[-4000:]}")
    seconds = time.perf_counter() - started
    health = gateway.health()
    figures.record(
        "pydicom corpus through client + gateway",
        files_tried=len(files),
        scans=2 * len(files),
        seconds=round(seconds, 1),
        one_file=json.dumps(dict(one_file), sort_keys=True),
        valid_single_slices=valid_single_slices,
        in_series=json.dumps(dict(in_series), sort_keys=True),
        bad_answers=len(problems),
        serving_after=health == health_pb2.HealthCheckResponse.SERVING,
    )
    assert problems == [], "\n".join(problems[:20])
    assert gateway.alive()
    assert health == health_pb2.HealthCheckResponse.SERVING
    # Some of pydicom's CT files are valid single slices: the corpus is not refused wholesale.
    assert valid_single_slices > 0
