"""The prior look-up's parts that need no PACS: keys from the first file, the choice of
candidates, and the deadline against peers that accept a connection and never answer."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import socket
import time
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset

from ctjoint.export.phantom import generate_phantom, write_series
from ctjoint.gateway.pacs import PacsDestination, StowDestination
from ctjoint.gateway.prior import TIMED_OUT, PriorFinder, PriorKeys, _candidates
from ctjoint.gateway.prior_report import SR_SERIES_DESCRIPTION


@pytest.fixture(scope="module")
def first_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("prior_keys")
    phantom = generate_phantom(kind="normal", seed=2, slices=2, size=32)
    return write_series(phantom, folder)[0].read_bytes()


def _edited(content: bytes, **values: str | None) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(content))
    for keyword, value in values.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_keys_come_from_the_first_file_and_are_never_repr_d(first_file: bytes) -> None:
    source = pydicom.dcmread(io.BytesIO(first_file))
    keys = PriorKeys.from_file(_edited(first_file, IssuerOfPatientID="HOSP"), "jcs2d")
    assert isinstance(keys, PriorKeys)
    assert keys.patient_id == source.PatientID and keys.issuer == "HOSP"
    assert keys.study_datetime.strftime("%Y%m%d%H%M%S") == source.StudyDate + source.StudyTime
    assert source.PatientID not in repr(keys) and "HOSP" not in repr(keys)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"PatientID": None}, "the scan has no PatientID"),
        ({"StudyDate": None}, "the scan has no valid StudyDate"),
    ],
)
def test_a_file_without_keys_says_why(
    first_file: bytes, edit: dict[str, str | None], reason: str
) -> None:
    assert PriorKeys.from_file(_edited(first_file, **edit), "jcs2d") == reason
    assert PriorKeys.from_file(b"not dicom", "jcs2d") == "the first file's header could not be read"


def _answer(study: str, series: str, date: str, time_: str, description: str = "") -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.StudyTime = date, time_
    ds.SeriesDescription = description or SR_SERIES_DESCRIPTION
    return ds


def test_candidates_are_strictly_earlier_newest_first_and_ours() -> None:
    keys = PriorKeys("P", "", dt.datetime(2024, 5, 10, 12, 0), "1.2.99", "jcs2d")
    answers = [
        _answer("1.2.1", "1.2.1.1", "20240301", "080000"),
        _answer("1.2.2", "1.2.2.1", "20240510", "115959"),  # same day, earlier: a prior
        _answer("1.2.3", "1.2.3.1", "20240510", "120000"),  # same date-time: not earlier
        _answer("1.2.99", "1.2.99.1", "20240101", "000000"),  # the current study's own
        _answer("1.2.4", "1.2.4.1", "20240401", "000000", "dose report"),  # not our report
        _answer("1.2.5", "1.2.5.1", "20240201", "000000"),
        _answer("1.2.6", "1.2.6.1", "20240101", "000000"),  # fourth: beyond MAX_CANDIDATES
        _answer("1.2.7", "1.2.7.1", "", "000000"),  # no date: cannot be placed
    ]
    chosen = _candidates(answers, keys)
    assert [c.study_uid for c in chosen] == ["1.2.2", "1.2.1", "1.2.5"]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A socket that accepts connections (the backlog does) and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield int(silent.getsockname()[1])


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_a_pacs_that_never_answers_costs_the_deadline_and_no_more(
    silent_port: int, kind: str
) -> None:
    destination = (
        PacsDestination("SILENT", "127.0.0.1", silent_port)
        if kind == "dimse"
        else StowDestination(f"http://127.0.0.1:{silent_port}/dicom-web")
    )
    finder = PriorFinder(destination, deadline_s=0.5)
    keys = PriorKeys("P", "", dt.datetime(2024, 5, 10, 12, 0), "1.2.3", "jcs2d")
    try:
        started = time.perf_counter()
        outcome = asyncio.run(finder.find(keys))
        elapsed = time.perf_counter() - started
    finally:
        finder.close()
    assert outcome.outcome == TIMED_OUT and outcome.report is None
    assert outcome.reason == f"{destination.name} did not answer within 0.5 s"
    assert 0.5 <= elapsed < 0.8
