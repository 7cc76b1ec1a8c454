"""`ctjoint listen`: a DICOM storage SCP beside the scanner that forwards each series it
receives to the gateway, once, and writes what comes back.

CT images arrive by C-STORE (from the scanner, or a PACS routing them), one file at a time,
several series possibly interleaved in one association. Files are spooled to disk per series
(by Series Instance UID). DIMSE has no end-of-series message, so a series is complete when
every association that brought it files has ended (released or aborted) and no file of it has
arrived for `quiet_seconds`; a study is complete when each of its series is. When the study
holds several series (a localizer, a dose report, lung and soft-tissue kernels, thin and
thick), the rules of ctjoint/series_rules.py choose one (client/series_choice.py reads the
spooled headers): only that series is forwarded, the others' spools are deleted, and
`OUT/<series key>/selection.json` says which series was analysed and why and why each other
one was not (`OUT/<study key>/selection.json` when none qualifies). The series is sent like
`ctjoint send` does, from the spool folder, and its outputs land in `OUT/<series key>/`. The
key is a hash of the Series Instance UID: no UID or patient data appears in folder names or
logs. Series of a study that arrive after it completed (a sender pausing longer than
`quiet_seconds` between series) form a study of their own.

The SCP accepts every transfer syntax the gateway decodes (`ACCEPTED_TRANSFER_SYNTAXES`),
answers C-ECHO, and can admit only listed calling AE titles and serve DICOM over TLS
(`ListenerSecurity`); an association from any other AE title is rejected.

A spool holds patient data, so it does not outlive its use: a series whose forward fails is
tried again (after 30 s, then twice as long each time, at most 10 min apart) and its spool
deleted once forwarded, or once `retention_seconds` (1 h by default) have passed since the
first failure, whichever comes first. Spool folders left by an earlier run (a crash) are
taken up the same way, their age counted from their last change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    Verification,
    XRayRadiationDoseSRStorage,
)

from ctjoint.client.channel import ChannelSecurity

if TYPE_CHECKING:
    from ctjoint.client.stow import StowSettings
from ctjoint.contracts import ENV_PSEUDONYM_KEY

log = logging.getLogger(__name__)

DEFAULT_QUIET_SECONDS: Final = 5.0
POLL_SECONDS: Final = 0.2
# What the gateway decodes (pydicom with the pylibjpeg, openjpeg and RLE plugins): a scanner may
# push any of them; uncompressed first, so a sender offering several gets those.
ACCEPTED_TRANSFER_SYNTAXES: Final = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
# What a CT study holds besides its images: taken so that the series choice can skip them with
# a reason (docs/interoperability.md) instead of the sender seeing them refused.
ACCEPTED_SOP_CLASSES: Final = (
    CTImageStorage,
    XRayRadiationDoseSRStorage,
    SecondaryCaptureImageStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
)
SELECTION_JSON: Final = "selection.json"
# How long a failed series' spool is kept and retried (docs/interoperability.md).
DEFAULT_RETENTION_SECONDS: Final = 3600.0
FIRST_RETRY_SECONDS: Final = 30.0
MAX_RETRY_SECONDS: Final = 600.0
# C-STORE statuses: success, and "cannot understand" for a data set we cannot file.
STATUS_SUCCESS: Final = 0x0000
STATUS_CANNOT_UNDERSTAND: Final = 0xC000


# Folder and file names stand for UIDs as HMACs under the deployment's pseudonym key (random
# per process when unset): a bare hash would let anyone holding a UID find its folder.
_NAME_KEY: Final = os.environ.get(ENV_PSEUDONYM_KEY, "").encode("utf-8") or secrets.token_bytes(32)


def _keyed_name(uid: str, length: int) -> str:
    digest = hmac.new(_NAME_KEY, uid.encode("ascii", "replace"), hashlib.sha256)
    return digest.hexdigest()[:length]


def series_key(series_uid: str) -> str:
    """A stable, identifier-free name for a series (folder names, logs): stable within a
    process, and across processes that share $CTJOINT_PSEUDONYM_KEY."""
    return _keyed_name(series_uid, 12)


@dataclass
class _Series:
    key: str
    folder: Path
    # The study it belongs to (its UID; the series' own when the instances carry none).
    study: str = ""
    sop_classes: set[str] = field(default_factory=set)
    files: int = 0
    last_file_at: float = 0.0
    open_associations: set[int] = field(default_factory=set)
    seen_associations: set[int] = field(default_factory=set)


@dataclass
class _Retry:
    """A complete series whose forward failed: its spool waits for the next try."""

    key: str
    folder: Path
    files: int
    first_failed_at: float  # time.time(): spools found at start-up are dated by their mtime
    next_try_at: float
    delay: float


# What forwarding a complete series does: (spool folder, series key) -> None.
Forward = Callable[[Path, str], None]


class SeriesListener:
    """Storage SCP state: spools files per series, decides when a series is complete."""

    def __init__(
        self,
        spool: Path,
        forward: Forward,
        *,
        quiet_seconds: float,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        first_retry_seconds: float = FIRST_RETRY_SECONDS,
        results: Path | None = None,
    ) -> None:
        if retention_seconds < 0 or first_retry_seconds <= 0:
            raise ValueError("retention cannot be negative, and retries need a positive delay")
        self._spool = spool
        self._forward = forward
        self._quiet = quiet_seconds
        self._retention = retention_seconds
        self._first_retry = first_retry_seconds
        # Where selection.json goes (the forward's results root); None: not written.
        self._results = results
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}
        self._retries: dict[str, _Retry] = {}
        self.forwarded: list[str] = []
        self.dropped: list[str] = []
        self._adopt_leftovers()

    # --- pynetdicom event handlers (run on the association's thread) -------------------------

    def on_store(self, event: Any) -> int:
        dataset: Dataset = event.dataset
        dataset.file_meta = event.file_meta
        return self.store(dataset, id(event.assoc))

    def on_association_end(self, event: Any) -> None:
        self.sender_done(id(event.assoc))

    # --- what any way in (DIMSE association, STOW-RS request) does ---------------------------

    def store(self, dataset: Dataset, association: int) -> int:
        """Spool one instance (with its file meta) for its series; `association` identifies
        the sender's association or request, which keeps the series open until it ends."""
        uid = str(getattr(dataset, "SeriesInstanceUID", ""))
        instance = str(getattr(dataset, "SOPInstanceUID", ""))
        if not uid or not instance:
            return STATUS_CANNOT_UNDERSTAND
        with self._lock:
            series = self._series.get(uid)
            if series is None:
                key = series_key(uid)
                study = str(getattr(dataset, "StudyInstanceUID", "") or "") or f"series {uid}"
                series = _Series(key, self._spool / key, study)
                series.folder.mkdir(parents=True, exist_ok=True)
                self._series[uid] = series
                log.info("series %s: first file received", key)
            series.open_associations.add(association)
            series.seen_associations.add(association)
            series.sop_classes.add(str(getattr(dataset, "SOPClassUID", "")))
            name = f"{_keyed_name(instance, 16)}.dcm"
            target = series.folder / name
        dataset.save_as(target, enforce_file_format=True)
        with self._lock:
            series.files += 1
            series.last_file_at = time.monotonic()
        return STATUS_SUCCESS

    def sender_done(self, association: int) -> None:
        """The association or request `association` ended: its series may now complete."""
        with self._lock:
            for series in self._series.values():
                series.open_associations.discard(association)

    # --- completion ------------------------------------------------------------------------

    def complete_series(self, now: float | None = None) -> list[tuple[str, _Series]]:
        """Series of complete studies (removed): a study is complete when every association
        that brought any of its series ended and none of them had a file for `quiet_seconds`."""
        moment = time.monotonic() if now is None else now
        done: list[tuple[str, _Series]] = []
        with self._lock:
            busy = {
                series.study
                for series in self._series.values()
                if series.open_associations or moment - series.last_file_at < self._quiet
            }
            for uid, series in list(self._series.items()):
                if series.study not in busy:
                    done.append((uid, self._series.pop(uid)))
        return done

    def forward_complete(self, now: float | None = None) -> int:
        """Forward the chosen series of every complete study, and retry failed ones that are
        due; a failure keeps the spool for a retry until the retention ends, then deletes it.
        `now`: time.time()."""
        moment = time.time() if now is None else now
        count = 0
        studies: dict[str, list[_Series]] = {}
        for _, series in self.complete_series():
            studies.setdefault(series.study, []).append(series)
        for study, members in studies.items():
            series = members[0]
            if self._needs_choice(members):
                chosen = self._choose(study, members)
                if chosen is None:
                    continue
                series = chosen
            log.info("series %s complete: %d files, forwarding", series.key, series.files)
            retry = _Retry(series.key, series.folder, series.files, moment, moment, 0.0)
            count += self._attempt(retry, moment)
        with self._lock:
            due = [r for r in self._retries.values() if r.next_try_at <= moment]
        for retry in due:
            count += self._attempt(retry, moment)
        return count

    @staticmethod
    def _needs_choice(members: list[_Series]) -> bool:
        """Several series, or one that is not made of CT images (a dose report alone)."""
        return len(members) > 1 or any(
            sop != ACCEPTED_SOP_CLASSES[0] for sop in members[0].sop_classes
        )

    def _choose(self, study: str, members: list[_Series]) -> _Series | None:
        """The series the rules choose (client/series_choice.py); the others' spools and the
        localizer images of the chosen one are deleted, and selection.json says why."""
        from ctjoint.client.series_choice import choose_series

        files = sorted(p for series in members for p in series.folder.glob("*.dcm"))
        choice = choose_series(files)
        by_key = {series.key: series for series in members}
        chosen = by_key.get(choice.chosen.key) if choice.chosen is not None else None
        for series in members:
            if series is not chosen:
                shutil.rmtree(series.folder, ignore_errors=True)
        if chosen is None:
            log.warning("study %s: %d series, none to analyse", series_key(study), len(members))
        else:
            for path in choice.chosen.localizers if choice.chosen is not None else ():
                path.unlink(missing_ok=True)
                chosen.files -= 1
            log.info(
                "study %s: %d series, series %s chosen (%s)",
                series_key(study),
                len(members),
                chosen.key,
                choice.reason,
            )
        if self._results is not None:
            folder = self._results / (chosen.key if chosen is not None else series_key(study))
            try:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / SELECTION_JSON).write_text(
                    json.dumps(choice.to_dict(), indent=2) + "\n", encoding="utf-8"
                )
            except OSError as err:
                log.error("study %s: cannot write %s: %s", series_key(study), SELECTION_JSON, err)
        return chosen

    @property
    def retrying(self) -> list[str]:
        """Keys of the series whose spool waits for another forward."""
        with self._lock:
            return sorted(self._retries)

    def _attempt(self, retry: _Retry, now: float) -> int:
        """Forward one series; 1 when it went, else 0 (kept for a retry, or dropped)."""
        try:
            self._forward(retry.folder, retry.key)
        except Exception as err:  # one bad series must not stop the listener
            log.error("series %s: forwarding failed: %s", retry.key, type(err).__name__)
        else:
            with self._lock:
                self._retries.pop(retry.key, None)
            self.forwarded.append(retry.key)
            shutil.rmtree(retry.folder, ignore_errors=True)
            return 1
        if now - retry.first_failed_at >= self._retention:
            self._drop(retry, "its retention ended")
            return 0
        retry.delay = min(max(retry.delay * 2, self._first_retry), MAX_RETRY_SECONDS)
        retry.next_try_at = now + retry.delay
        with self._lock:
            self._retries[retry.key] = retry
        log.warning(
            "series %s: spool kept, next try in %.0f s (deleted %.0f s after the first failure)",
            retry.key,
            retry.delay,
            self._retention,
        )
        return 0

    def _drop(self, retry: _Retry, why: str) -> None:
        with self._lock:
            self._retries.pop(retry.key, None)
        shutil.rmtree(retry.folder, ignore_errors=True)
        self.dropped.append(retry.key)
        log.error(
            "series %s: not forwarded; its %d spooled files deleted: %s",
            retry.key,
            retry.files,
            why,
        )

    def _adopt_leftovers(self) -> None:
        """Spool folders of an earlier run: retried now, or deleted if older than retention."""
        if not self._spool.is_dir():
            return
        now = time.time()
        for folder in sorted(p for p in self._spool.iterdir() if p.is_dir()):
            changed = folder.stat().st_mtime
            files = sum(1 for _ in folder.glob("*.dcm"))
            retry = _Retry(folder.name, folder, files, changed, now, 0.0)
            if now - changed >= self._retention:
                self._drop(retry, "left by an earlier run, past its retention")
            else:
                self._retries[folder.name] = retry
                log.warning("series %s: spool left by an earlier run, retrying", folder.name)


def gateway_forward(
    *,
    gateway: str,
    model: str,
    out_root: Path,
    timeout: float,
    seg: bool,
    sr: bool,
    security: ChannelSecurity | None = None,
) -> Forward:
    """Forwarding by `ctjoint send`: results into `out_root/<series key>/`."""
    from ctjoint.client.send import send_series

    def forward(folder: Path, key: str) -> None:
        send_series(
            folder,
            gateway=gateway,
            model=model,
            out_dir=out_root / key,
            timeout=timeout,
            show_progress=False,
            seg=seg,
            sr=sr,
            security=security,
        )

    return forward


@dataclass(frozen=True)
class ListenerSecurity:
    """Who may associate, and whether over TLS.

    `allowed_calling_aes`: the calling AE titles admitted (empty: any). `tls_cert` and
    `tls_key` (PEM): serve DICOM over TLS (PS3.15 B.1, TLS 1.2 or later); with `tls_client_ca`
    the sender must present a certificate that CA signed.
    """

    allowed_calling_aes: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_calling_aes", tuple(self.allowed_calling_aes))
        for title in self.allowed_calling_aes:
            if not title or len(title) > 16 or "\\" in title:
                raise ValueError(f"AE title {title!r} must be 1-16 characters, no backslash")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its private key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("a client CA needs TLS (a certificate and key) too")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context, or None for plain TCP."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_client_ca is not None:
            context.load_verify_locations(self.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def make_ae(ae_title: str, security: ListenerSecurity | None = None) -> AE:
    """A storage SCP for CT studies (`ACCEPTED_SOP_CLASSES`) in every accepted transfer
    syntax, answering C-ECHO."""
    ae = AE(ae_title=ae_title)
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    ae.require_called_aet = False
    if security is not None and security.allowed_calling_aes:
        ae.require_calling_aet = list(security.allowed_calling_aes)
    return ae


def handlers(listener: SeriesListener) -> list[evt.EventHandlerType]:
    """The pynetdicom events the listener follows: stores, and every way an association ends."""
    return [
        (evt.EVT_C_STORE, listener.on_store),
        (evt.EVT_RELEASED, listener.on_association_end),
        (evt.EVT_ABORTED, listener.on_association_end),
    ]


def listen(
    *,
    ae_title: str,
    port: int,
    host: str,
    spool: Path,
    forward: Forward,
    quiet_seconds: float = DEFAULT_QUIET_SECONDS,
    retention_seconds: float = DEFAULT_RETENTION_SECONDS,
    security: ListenerSecurity | None = None,
    stow: StowSettings | None = None,
    results: Path | None = None,
    stop: threading.Event | None = None,
    started: Callable[[int], None] | None = None,
    stow_started: Callable[[int], None] | None = None,
) -> SeriesListener:
    """Serve C-STORE on host:port (and STOW-RS when `stow` is given) until `stop` is set,
    forwarding the chosen series of each complete study (selection.json under `results`)."""
    listener = SeriesListener(
        spool,
        forward,
        quiet_seconds=quiet_seconds,
        retention_seconds=retention_seconds,
        results=results,
    )
    ae = make_ae(ae_title, security)
    server = ae.start_server(
        (host, port),
        block=False,
        evt_handlers=handlers(listener),
        ssl_context=security.ssl_context() if security is not None else None,
    )
    if server is None:  # only a blocking server returns None
        raise RuntimeError("the storage SCP did not start")
    bound = int(server.server_address[1])
    log.info(
        "listening for C-STORE and C-ECHO as %s on %s:%d (tls=%s, calling AE titles: %s)",
        ae_title,
        host,
        bound,
        "on" if security is not None and security.tls_cert is not None else "off",
        ",".join(security.allowed_calling_aes)
        if security and security.allowed_calling_aes
        else "any",
    )
    stop_stow: Callable[[], None] | None = None
    try:
        if stow is not None:
            from ctjoint.client.stow import StowServer

            stow_server = StowServer(listener, stow, security)
            stop_stow = stow_server.start()
            log.info("listening for STOW-RS on %s:%d", stow.host, stow_server.port)
            if stow_started is not None:
                stow_started(stow_server.port)
        if started is not None:
            started(bound)
        halt = stop or threading.Event()
        while not halt.wait(POLL_SECONDS):
            listener.forward_complete()
    finally:
        if stop_stow is not None:
            stop_stow()
        server.shutdown()
        listener.forward_complete()
    return listener


__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "ACCEPTED_TRANSFER_SYNTAXES",
    "ListenerSecurity",
    "SeriesListener",
    "gateway_forward",
    "listen",
    "series_key",
]
