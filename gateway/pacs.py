"""Push a scan's DICOM outputs (SEG, SR) to a PACS: DIMSE C-STORE (pynetdicom) or STOW-RS
(dicomweb-client).

`PacsDestination` is a DIMSE node (`ctjoint gateway serve --pacs-ae/--pacs-host/--pacs-port`),
`StowDestination` a DICOMweb server (`--pacs-stow-url`, basic or bearer auth, TLS with an
optional CA file). `push_blocking` sends every object in one association, retrying the whole set
with backoff when the association fails or a store is refused, and returns a `PacsOutcome`; it
never raises for a network or PACS failure, so the scan result always reaches the caller,
carrying the outcome. `PacsPusher` runs pushes on a bounded pool of its own threads and decides
how long a scan's answer waits for its push: at most `wait_s` (1 s by default), and not at all
while the PACS has left an earlier push unanswered past its wait, so a slow or silent PACS
costs one answer the bound, not every answer. Every push ends counted in the metrics
(`ctjoint_pacs_pushes{status}`: stored, failed, skipped). Logs and errors name the destination
and the object kind ("seg", "sr"), never patient data or UIDs.

Size: one job, the push to a PACS over either protocol, with its retry and wait policy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import pydicom
from prometheus_client import CollectorRegistry, Counter, Gauge
from pynetdicom import AE

log = logging.getLogger(__name__)

DEFAULT_CALLING_AE: Final = "CTJOINT"
# C-STORE status 0x0000 is success; 0xB000, 0xB007 and 0xB006 are warnings the standard counts
# as stored (coercion, elements discarded).
STORED_STATUSES: Final = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
# How long an answer waits for its push by default (docs/interoperability.md).
DEFAULT_WAIT_S: Final = 1.0
# What became of a push (PacsOutcome.status, the proto's PacsOutcome.status, the metric label).
STORED: Final = "stored"
FAILED: Final = "failed"
SKIPPED: Final = "skipped"
PENDING: Final = "pending"
FINAL_STATUSES: Final = (STORED, FAILED, SKIPPED)


@dataclass(frozen=True)
class PacsDestination:
    """A DICOM node to store results in, and how hard to try."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = DEFAULT_CALLING_AE
    attempts: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    # How long a scan's answer waits for its push (also bounded by the caller's deadline); a
    # push still running then goes on in the background and the answer says so.
    wait_s: float = DEFAULT_WAIT_S
    # Threads that push, and pushes that may wait for one; a push beyond them is skipped.
    workers: int = 2
    queued: int = 16

    def __post_init__(self) -> None:
        for name in ("ae_title", "calling_ae_title"):
            value = getattr(self, name)
            if not value or len(value) > 16 or "\\" in value:
                raise ValueError(f"{name} must be 1-16 characters without a backslash")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.workers < 1 or self.queued < 1:
            raise ValueError("workers and queued must be at least 1")
        if min(self.backoff_s, self.timeout_s, self.wait_s) < 0:
            raise ValueError("backoff, timeout and wait cannot be negative")

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class PacsOutcome:
    """What happened to one scan's objects: stored or not, after how many attempts, why not.

    `status`: stored, failed (every attempt failed), skipped (nothing was sent) or pending
    (still sending when the answer left); left empty, it follows `stored`.
    """

    destination: str
    stored: bool
    attempts: int
    error: str
    objects: tuple[str, ...]
    status: str = field(default="")

    def __post_init__(self) -> None:
        if not self.status:
            object.__setattr__(self, "status", STORED if self.stored else FAILED)
        if self.status not in (*FINAL_STATUSES, PENDING):
            raise ValueError(f"unknown push status {self.status!r}")


class _StoreFailedError(Exception):
    """One attempt failed; the message is safe to log (no patient data)."""


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server to store results in by STOW-RS (PS3.18 10.5), and how hard to try.

    `url` is the service root (Orthanc: http://HOST:8042/dicom-web); objects are POSTed to
    `{url}/studies` as multipart/related; type="application/dicom". `username`/`password`:
    HTTP basic auth; `token`: a bearer token (not both). `ca_file`: the CA bundle that signs
    an https server's certificate (default: the system's).
    """

    url: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    ca_file: str = ""
    attempts: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    wait_s: float = DEFAULT_WAIT_S
    workers: int = 2
    queued: int = 16

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"the STOW-RS URL must be http(s)://HOST[:PORT]/PATH, got {self.url!r}"
            )
        if parsed.username or parsed.password:
            raise ValueError("put credentials in username/password, not in the URL")
        if self.token and (self.username or self.password):
            raise ValueError("give basic auth or a bearer token, not both")
        if self.attempts < 1 or self.workers < 1 or self.queued < 1:
            raise ValueError("attempts, workers and queued must be at least 1")
        if min(self.backoff_s, self.timeout_s, self.wait_s) < 0:
            raise ValueError("backoff, timeout and wait cannot be negative")

    @property
    def name(self) -> str:
        """The URL without its query (no credentials can be in it)."""
        parsed = urllib.parse.urlsplit(self.url)
        return f"{parsed.scheme}://{parsed.netloc}{parsed.path}"

    def store(self, objects: Sequence[tuple[str, bytes]]) -> None:
        """One STOW-RS request with every object; raises _StoreFailedError on any failure."""
        from dicomweb_client.api import DICOMwebClient
        from requests import RequestException, Session

        session = Session()
        if self.username:
            session.auth = (self.username, self.password)
        if self.ca_file:
            session.verify = self.ca_file
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        client = DICOMwebClient(self.url, session=session, headers=headers, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)  # our attempts and backoff, not its own
        datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in objects]
        try:
            response = client.store_instances(datasets)
        except RequestException as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            what = f"HTTP {status}" if status is not None else type(err).__name__
            raise _StoreFailedError(f"STOW-RS to {self.name}: {what}") from None
        finally:
            session.close()
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            kinds = dict(
                zip(
                    (str(ds.SOPInstanceUID) for ds in datasets),
                    (k for k, _ in objects),
                    strict=True,
                )
            )
            reasons = [
                f"{kinds.get(str(item.get('ReferencedSOPInstanceUID', '')), 'object')}: failure "
                f"reason 0x{int(item.get('FailureReason', 0)):04X}"
                for item in failed
            ]
            raise _StoreFailedError(f"STOW-RS to {self.name}: " + "; ".join(reasons))


# Where a push goes: a DIMSE node or a DICOMweb server.
Destination = PacsDestination | StowDestination


def _store_all(destination: PacsDestination, objects: Sequence[tuple[str, bytes]]) -> None:
    """One association, one C-STORE per object; raises _StoreFailedError on any failure."""
    datasets = [(kind, pydicom.dcmread(io.BytesIO(data))) for kind, data in objects]
    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    # Propose exactly what the objects need (SEG, Comprehensive 3D SR) with pynetdicom's default
    # uncompressed transfer syntaxes; highdicom writes explicit VR little endian.
    for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
        ae.add_requested_context(sop_class)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise _StoreFailedError(f"association with {destination.name} was not established")
    try:
        for kind, dataset in datasets:
            status = assoc.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code is None:
                raise _StoreFailedError(f"{kind}: no C-STORE response from {destination.name}")
            if int(code) not in STORED_STATUSES:
                raise _StoreFailedError(f"{kind}: C-STORE status 0x{int(code):04X}")
    finally:
        assoc.release()


def push_blocking(destination: Destination, objects: Sequence[tuple[str, bytes]]) -> PacsOutcome:
    """Store `objects` ((kind, Part-10 bytes) pairs) with retries; never raises for failures.

    A retry sends every object again: storing an instance the PACS already holds replaces it
    with the same content (same SOP Instance UID), so a partly stored set is simply completed.
    """
    kinds = tuple(kind for kind, _ in objects)
    if not objects:
        return PacsOutcome(destination.name, True, 0, "", kinds)
    error = ""
    for attempt in range(1, destination.attempts + 1):
        started = time.perf_counter()
        try:
            if isinstance(destination, StowDestination):
                destination.store(objects)
            else:
                _store_all(destination, objects)
        except _StoreFailedError as err:
            error = str(err)
        except (OSError, RuntimeError, ValueError) as err:
            # pynetdicom and the socket layer raise these for refused or broken connections.
            error = f"{type(err).__name__} talking to {destination.name}"
        else:
            log.info(
                "pacs stored %s at %s (attempt %d, %.0f ms)",
                ",".join(kinds),
                destination.name,
                attempt,
                (time.perf_counter() - started) * 1000.0,
            )
            return PacsOutcome(destination.name, True, attempt, "", kinds)
        log.warning("pacs attempt %d/%d failed: %s", attempt, destination.attempts, error)
        if attempt < destination.attempts:
            time.sleep(destination.backoff_s * 2 ** (attempt - 1))
    return PacsOutcome(destination.name, False, destination.attempts, error, kinds)


@dataclass(frozen=True)
class _Job:
    objects: tuple[tuple[str, bytes], ...]
    future: concurrent.futures.Future[PacsOutcome]


class PacsPusher:
    """Pushes to one destination on threads of its own, never on the scans' threads.

    At most `workers` pushes run and `queued` wait; a push beyond them is skipped and reported.
    The threads are daemons: a push stuck on a silent PACS cannot hold the gateway's exit.
    The answer waits for its push at most `wait_s` (and within the caller's deadline); once an
    answer has stopped waiting, the PACS counts as slow and later answers do not wait at all
    (status pending) until a push stores again.
    """

    def __init__(
        self, destination: Destination, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.destination = destination
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=destination.queued)
        self._slow = False
        self._closed = False
        self._pushes = Counter(
            "ctjoint_pacs_pushes",
            "PACS pushes by how they ended: stored, failed (every attempt), skipped (not sent).",
            ("status",),
            registry=registry,
        )
        self._in_flight = Gauge(
            "ctjoint_pacs_pushes_in_flight",
            "PACS pushes sending or waiting for a pushing thread.",
            registry=registry,
        )
        for status in FINAL_STATUSES:
            self._pushes.labels(status=status)
        self._threads = [
            threading.Thread(target=self._work, name=f"pacs-push-{n}", daemon=True)
            for n in range(destination.workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def slow(self) -> bool:
        """True while an answer has given up waiting and no push has stored since."""
        return self._slow

    def skipped(self, reason: str, objects: Sequence[str] = ()) -> PacsOutcome:
        """A push that is not sent (no objects to send, or no room), counted and logged."""
        self._pushes.labels(status=SKIPPED).inc()
        log.warning("pacs push to %s skipped: %s", self.destination.name, reason)
        return PacsOutcome(self.destination.name, False, 0, reason, tuple(objects), SKIPPED)

    def submit(
        self, objects: Sequence[tuple[str, bytes]]
    ) -> concurrent.futures.Future[PacsOutcome] | PacsOutcome:
        """Queue a push; its future, or a skipped outcome when the queue is full or closed."""
        kinds = [kind for kind, _ in objects]
        if self._closed:
            return self.skipped("the gateway is stopping", kinds)
        job = _Job(tuple(objects), concurrent.futures.Future())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            return self.skipped(
                f"{self.destination.workers + self.destination.queued} pushes already in "
                "flight; not sent",
                kinds,
            )
        self._in_flight.inc()
        return job.future

    async def push_for_answer(
        self, objects: Sequence[tuple[str, bytes]], time_remaining: float | None
    ) -> PacsOutcome:
        """Push `objects`; the outcome when it ends within the wait, else a pending one."""
        submitted = self.submit(objects)
        if isinstance(submitted, PacsOutcome):
            return submitted
        limit = 0.0 if self._slow else self.destination.wait_s
        if time_remaining is not None:
            limit = max(0.0, min(limit, time_remaining - ANSWER_MARGIN_S))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(submitted)), limit)
        except TimeoutError:
            self._slow = True
            return PacsOutcome(
                self.destination.name,
                False,
                0,
                f"still sending after {limit:.1f} s; continuing in the background",
                tuple(kind for kind, _ in objects),
                PENDING,
            )

    def close(self) -> None:
        """Take no more pushes; queued ones are dropped (counted skipped), running ones end
        with their process at the latest."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._in_flight.dec()
                job.future.set_result(self.skipped("the gateway stopped", ()))
        for _ in self._threads:
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                break

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                outcome = push_blocking(self.destination, job.objects)
            except Exception as err:  # a bug must not kill the pushing thread silently
                outcome = PacsOutcome(
                    self.destination.name, False, 0, type(err).__name__, (), FAILED
                )
            self._in_flight.dec()
            self._pushes.labels(status=outcome.status).inc()
            if outcome.stored:
                self._slow = False
            job.future.set_result(outcome)


# Time kept back from the caller's deadline to send the answer after a PACS push.
ANSWER_MARGIN_S: Final = 1.0


__all__ = [
    "Destination",
    "PacsDestination",
    "PacsOutcome",
    "PacsPusher",
    "StowDestination",
    "push_blocking",
]
