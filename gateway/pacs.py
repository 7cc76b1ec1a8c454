"""Push a scan's DICOM outputs (SEG, SR) to a PACS with DIMSE C-STORE (pynetdicom).

`PacsDestination` is the configured node (`ctjoint gateway serve --pacs-ae/--pacs-host/
--pacs-port`). `push` sends every object in one association, retrying the whole set with
backoff when the association fails or a store is refused, and returns a `PacsOutcome`; it never
raises for a network or PACS failure, so the scan result always reaches the caller, carrying
the outcome. Logs and errors name the destination and the object kind ("seg", "sr"), never
patient data or UIDs.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import pydicom
from pynetdicom import AE

log = logging.getLogger(__name__)

DEFAULT_CALLING_AE: Final = "CTJOINT"
# C-STORE status 0x0000 is success; 0xB000, 0xB007 and 0xB006 are warnings the standard counts
# as stored (coercion, elements discarded).
STORED_STATUSES: Final = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


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
    wait_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("ae_title", "calling_ae_title"):
            value = getattr(self, name)
            if not value or len(value) > 16 or "\\" in value:
                raise ValueError(f"{name} must be 1-16 characters without a backslash")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.backoff_s, self.timeout_s, self.wait_s) < 0:
            raise ValueError("backoff, timeout and wait cannot be negative")

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class PacsOutcome:
    """What happened to one scan's objects: stored or not, after how many attempts, why not."""

    destination: str
    stored: bool
    attempts: int
    error: str
    objects: tuple[str, ...]


class _StoreFailedError(Exception):
    """One attempt failed; the message is safe to log (no patient data)."""


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


def push_blocking(
    destination: PacsDestination, objects: Sequence[tuple[str, bytes]]
) -> PacsOutcome:
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


async def push(destination: PacsDestination, objects: Sequence[tuple[str, bytes]]) -> PacsOutcome:
    """`push_blocking` in a worker thread, so the gateway's event loop keeps serving."""
    return await asyncio.to_thread(push_blocking, destination, objects)


__all__ = ["PacsDestination", "PacsOutcome", "push", "push_blocking"]
