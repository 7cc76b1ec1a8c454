"""Find the patient's prior analysis in the PACS: the most recent earlier SR of this algorithm.

Keys: the current study's PatientID and IssuerOfPatientID (from the first file's header) and
its StudyDate/StudyTime. A DIMSE PACS (`PacsDestination`) is asked with C-FIND (Study Root,
SERIES level: SR series of this project's report, study date up to the current one) and the
chosen series fetched with C-GET on the same association; a DICOMweb one (`StowDestination`)
with QIDO-RS and WADO-RS. Candidates are taken newest first, strictly before the current
study; the first whose SR was written by this project for the same model, for the same
PatientID and issuer, is the prior (at most `MAX_CANDIDATES` are fetched).

`PriorFinder` runs look-ups on its own threads and bounds each with its deadline
(`--prior-deadline`, 2 s by default): a slow, absent or failing PACS ends in an outcome that
says why, never in an error or a later answer. The keys stay inside the PACS query: logs,
metrics and reasons name the destination and the outcome only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

import pydicom
from prometheus_client import CollectorRegistry, Counter
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from ctjoint.gateway.comparison import study_datetime
from ctjoint.gateway.pacs import Destination, StowDestination
from ctjoint.gateway.prior_report import (
    SR_SERIES_DESCRIPTION,
    PriorReport,
    PriorReportError,
    report_from_sr,
)

log = logging.getLogger(__name__)

# pynetdicom logs every C-FIND/C-GET identifier (PatientID included) at INFO by default; the
# keys must stay inside the query (its documented switches, pynetdicom._config).
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

DEFAULT_DEADLINE_S: Final = 2.0
MAX_CANDIDATES: Final = 3
# How look-ups ended (the metric's label).
FOUND: Final = "found"
NONE: Final = "none"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
OUTCOMES: Final = (FOUND, NONE, FAILED, TIMED_OUT)
_PENDING: Final = 0xFF00, 0xFF01


class _LookupError(Exception):
    """A look-up failed; the message is safe to log (no patient data, no UIDs)."""


@dataclass(frozen=True)
class PriorKeys:
    """What identifies the patient and the current study (never logged or repr'd)."""

    patient_id: str = field(repr=False)
    issuer: str = field(repr=False)
    study_datetime: dt.datetime = field(repr=False)
    study_instance_uid: str = field(repr=False)
    model: str

    @classmethod
    def from_file(cls, content: bytes, model: str) -> PriorKeys | str:
        """The keys of a scan's first file, or why there are none."""
        try:
            header = pydicom.dcmread(
                io.BytesIO(content),
                stop_before_pixels=True,
                specific_tags=[
                    "PatientID",
                    "IssuerOfPatientID",
                    "StudyDate",
                    "StudyTime",
                    "StudyInstanceUID",
                ],
            )
            patient = str(header.get("PatientID", "") or "").strip()
            issuer = str(header.get("IssuerOfPatientID", "") or "").strip()
            date = str(header.get("StudyDate", "") or "")
            time_ = str(header.get("StudyTime", "") or "")
            study = str(header.get("StudyInstanceUID", "") or "")
        except Exception:  # any unreadable header: no look-up, and the analysis will say why
            return "the first file's header could not be read"
        when = study_datetime(date, time_)
        if not patient:
            return "the scan has no PatientID"
        if when is None:
            return "the scan has no valid StudyDate"
        return cls(patient, issuer, when, study, model)


@dataclass(frozen=True)
class PriorOutcome:
    """The prior report, or why there is none; `outcome` is one of OUTCOMES."""

    outcome: str
    report: PriorReport | None = None
    reason: str = ""
    elapsed_ms: float = 0.0


@dataclass(frozen=True)
class _Candidate:
    study_uid: str
    series_uid: str
    when: dt.datetime


def _candidates(found: list[Dataset], keys: PriorKeys) -> list[_Candidate]:
    """Query answers strictly before the current study, newest first."""
    out = []
    for ds in found:
        when = study_datetime(
            str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or "")
        )
        study = str(ds.get("StudyInstanceUID", "") or "")
        series = str(ds.get("SeriesInstanceUID", "") or "")
        if when is None or not series or study == keys.study_instance_uid:
            continue
        # Matched here too: a PACS may ignore the key (Orthanc's QIDO-RS matches no value
        # with a space in it), and the SR itself is checked once fetched anyway.
        if str(ds.get("SeriesDescription", "") or "") not in ("", SR_SERIES_DESCRIPTION):
            continue
        if when < keys.study_datetime:
            out.append(_Candidate(study, series, when))
    out.sort(key=lambda c: c.when, reverse=True)
    return out[:MAX_CANDIDATES]


def _same_patient(ds: Dataset, keys: PriorKeys) -> bool:
    return (
        str(ds.get("PatientID", "") or "").strip() == keys.patient_id
        and str(ds.get("IssuerOfPatientID", "") or "").strip() == keys.issuer
    )


def _choose(datasets: list[Dataset], keys: PriorKeys, where: str) -> PriorReport | None:
    for ds in datasets:
        if not _same_patient(ds, keys):
            continue
        try:
            report = report_from_sr(ds, where)
        except PriorReportError:
            continue  # not one of ours, or unreadable: the next candidate may be
        when = report.measurements.study_datetime
        if (
            report.measurements.model == keys.model
            and when is not None
            and when < keys.study_datetime
        ):
            return report
    return None


def _query(keys: PriorKeys) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.PatientID = keys.patient_id
    query.IssuerOfPatientID = keys.issuer
    query.StudyDate = f"-{keys.study_datetime:%Y%m%d}"
    query.StudyTime = ""
    query.StudyInstanceUID = ""
    query.SeriesInstanceUID = ""
    query.Modality = "SR"
    query.SeriesDescription = SR_SERIES_DESCRIPTION
    return query


def _find_dimse(destination: Any, keys: PriorKeys, timeout_s: float) -> PriorReport | None:
    """C-FIND then C-GET on one association (Study Root)."""
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append(dataset)
        return 0x0000

    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(Comprehensive3DSRStorage)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        ext_neg=[build_role(Comprehensive3DSRStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise _LookupError(f"association with {destination.name} was not established")
    try:
        found = []
        for status, identifier in assoc.send_c_find(
            _query(keys), StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code is None:
                raise _LookupError(f"no C-FIND response from {destination.name}")
            if int(code) in _PENDING and identifier is not None:
                found.append(identifier)
            elif int(code) != 0x0000:
                raise _LookupError(f"C-FIND status 0x{int(code):04X} from {destination.name}")
        for candidate in _candidates(found, keys):
            received.clear()
            get = Dataset()
            get.QueryRetrieveLevel = "SERIES"
            get.StudyInstanceUID = candidate.study_uid
            get.SeriesInstanceUID = candidate.series_uid
            for status, _ in assoc.send_c_get(get, StudyRootQueryRetrieveInformationModelGet):
                if getattr(status, "Status", None) is None:
                    raise _LookupError(f"no C-GET response from {destination.name}")
            report = _choose(list(received), keys, destination.name)
            if report is not None:
                return report
        return None
    finally:
        assoc.release()


def _find_dicomweb(destination: StowDestination, keys: PriorKeys, timeout_s: float) -> Any:
    """QIDO-RS for the series, WADO-RS for their instances."""
    from dicomweb_client.api import DICOMwebClient
    from requests import RequestException, Session

    session = Session()
    if destination.username:
        session.auth = (destination.username, destination.password)
    if destination.ca_file:
        session.verify = destination.ca_file
    headers = {"Authorization": f"Bearer {destination.token}"} if destination.token else None
    client = DICOMwebClient(destination.url, session=session, headers=headers, timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    filters = {
        "PatientID": keys.patient_id,
        "Modality": "SR",
        "StudyDate": f"-{keys.study_datetime:%Y%m%d}",
    }
    try:
        answers = client.search_for_series(
            search_filters=filters,
            fields=[
                "StudyDate",
                "StudyTime",
                "StudyInstanceUID",
                "SeriesInstanceUID",
                "SeriesDescription",
            ],
        )
        found = [Dataset.from_json(answer) for answer in answers]
        for candidate in _candidates(found, keys):
            instances = client.retrieve_series(candidate.study_uid, candidate.series_uid)
            report = _choose(list(instances), keys, destination.name)
            if report is not None:
                return report
        return None
    except RequestException as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        what = f"HTTP {status}" if status is not None else type(err).__name__
        raise _LookupError(f"DICOMweb query to {destination.name}: {what}") from None
    finally:
        session.close()


def find_prior_blocking(
    destination: Destination, keys: PriorKeys, timeout_s: float = DEFAULT_DEADLINE_S
) -> PriorOutcome:
    """One look-up (module docstring); never raises for a PACS failure."""
    started = time.perf_counter()

    def done(outcome: str, report: PriorReport | None = None, reason: str = "") -> PriorOutcome:
        return PriorOutcome(outcome, report, reason, (time.perf_counter() - started) * 1e3)

    try:
        if isinstance(destination, StowDestination):
            report = _find_dicomweb(destination, keys, timeout_s)
        else:
            report = _find_dimse(destination, keys, timeout_s)
    except _LookupError as err:
        return done(FAILED, reason=str(err))
    except Exception as err:  # pynetdicom, sockets, HTTP: any failure is an outcome, not a crash
        return done(FAILED, reason=f"{type(err).__name__} talking to {destination.name}")
    if report is None:
        return done(NONE, reason=f"no earlier {keys.model} analysis in {destination.name}")
    return done(FOUND, report)


class PriorFinder:
    """Look-ups on threads of their own, each bounded by `deadline_s` from its start."""

    def __init__(
        self,
        destination: Destination,
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        workers: int = 4,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"the prior look-up deadline must be > 0 s, got {deadline_s}")
        self.destination = destination
        self.deadline_s = deadline_s
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "prior-lookup")
        self._count = Counter(
            "ctjoint_prior_lookups",
            "Prior-analysis look-ups by how they ended: found, none, failed, timed_out.",
            ("outcome",),
            registry=registry,
        )
        for outcome in OUTCOMES:
            self._count.labels(outcome=outcome)

    async def find(self, keys: PriorKeys | str) -> PriorOutcome:
        """The prior of `keys` within the deadline (a str: why there are no keys)."""
        if isinstance(keys, str):
            outcome = PriorOutcome(NONE, reason=keys)
        else:
            started = time.perf_counter()
            # The PACS's own timeouts are the deadline too, so a thread ends soon after.
            future = self._pool.submit(find_prior_blocking, self.destination, keys, self.deadline_s)
            try:
                outcome = await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(future)), self.deadline_s
                )
            except TimeoutError:
                elapsed = (time.perf_counter() - started) * 1e3
                outcome = PriorOutcome(
                    TIMED_OUT,
                    reason=f"{self.destination.name} did not answer within {self.deadline_s:g} s",
                    elapsed_ms=elapsed,
                )
        self._count.labels(outcome=outcome.outcome).inc()
        log.info("prior look-up: %s in %.0f ms", outcome.outcome, outcome.elapsed_ms)
        return outcome

    def close(self) -> None:
        """Take no more look-ups; running ones end with their PACS timeouts."""
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "DEFAULT_DEADLINE_S",
    "OUTCOMES",
    "PriorFinder",
    "PriorKeys",
    "PriorOutcome",
    "find_prior_blocking",
]
