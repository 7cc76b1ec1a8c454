"""What one gateway accepts: file size, slices per scan, concurrent scans, gRPC message size.

Every limit fails fast with `LimitExceededError` (RESOURCE_EXHAUSTED): a scan past a limit is
rejected the moment we know, never queued without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from ctjoint.gateway.errors import AdmissionRefusedError, LimitExceededError
from ctjoint.gateway.memory import (
    DEFAULT_KEPT_FREED_BYTES,
    DEFAULT_MAX_SCAN_BYTES,
    default_budget_bytes,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# A 512x512 int16 CT slice is 512 KiB of pixels plus a few KiB of header; 1024x1024 slices or
# long private headers stay well under 8 MiB, while a mistaken multi-frame dump does not.
DEFAULT_MAX_FILE_BYTES = 8 * MIB
# Thin-slice chest CT reaches ~600-800 images; 1000 leaves room without letting a whole study
# (several series) through as one scan.
DEFAULT_MAX_SLICES = 1000
# Each scan holds its series (~150 MiB for 300 slices) and the backend's working set; a small
# box serves a few at once and tells the rest to retry rather than swapping.
DEFAULT_MAX_CONCURRENT_SCANS = 4
# Protobuf framing around one DicomFile message (field tags, lengths): tiny, but the receive
# limit must not reject a file that is exactly max_file_bytes.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
# The overload gate (OverloadGate): a burst is over when no scan was refused for QUIET_S; new
# scan work waits at most MAX_HOLD_S at a stretch, and then runs for at least MIN_RUN_S.
QUIET_S = 0.005
MAX_HOLD_S = 0.1
MIN_RUN_S = 0.1
# Threads that run scans' CPU-bound work (ScanCpuPool). Most of that work holds the GIL
# (pydicom, Python loops), so a second thread only pays while the first waits without it (on a
# compressed-pixel decode worker, as many as decode_pool starts, or in numpy), and each one
# more is one more thread the event loop queues behind for the GIL.
DEFAULT_CPU_THREADS = 2

_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True)
class GatewayLimits:
    """The configurable limits of one gateway process."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_slices: int = DEFAULT_MAX_SLICES
    max_concurrent_scans: int = DEFAULT_MAX_CONCURRENT_SCANS
    # Decoded bytes (rows x columns x slices x 4) one scan may hold, and all scans in flight
    # together; None: from the memory the box or cgroup has (gateway/memory.py).
    max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES
    memory_budget_bytes: int | None = None
    # Freed memory each process may keep for reuse before handing it back (memory.FreedMemory).
    kept_freed_bytes: int = DEFAULT_KEPT_FREED_BYTES

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_slices", "max_concurrent_scans", "max_scan_bytes"):
            value = int(getattr(self, name))
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            object.__setattr__(self, name, value)
        if int(self.kept_freed_bytes) < 0:
            raise ValueError(f"kept_freed_bytes cannot be negative, got {self.kept_freed_bytes}")
        if self.memory_budget_bytes is not None and int(self.memory_budget_bytes) < 1:
            raise ValueError(
                f"memory_budget_bytes must be at least 1, got {self.memory_budget_bytes}"
            )

    def memory_budget(self) -> int:
        """The gateway's budget of decoded bytes over every scan in flight."""
        if self.memory_budget_bytes is not None:
            return int(self.memory_budget_bytes)
        return default_budget_bytes(self.max_concurrent_scans, self.max_scan_bytes)

    @property
    def max_receive_message_bytes(self) -> int:
        """gRPC's receive limit: one file per message, so one file plus framing.

        Set deliberately rather than left at gRPC's 4 MiB default (too small for a large
        slice) or unlimited (a client could make us buffer anything). A message above it is
        refused by gRPC itself with RESOURCE_EXHAUSTED before it reaches the service.
        """
        return self.max_file_bytes + MESSAGE_OVERHEAD_BYTES

    def check_file_size(self, source: str, size: int) -> None:
        """Refuse a file larger than max_file_bytes (source: how errors name the file)."""
        if size > self.max_file_bytes:
            raise LimitExceededError(
                f"{source}: {size} bytes exceeds the limit of {self.max_file_bytes} bytes per file"
            )

    def check_slice_count(self, source: str, count: int) -> None:
        """Refuse the scan as soon as its count-th file is one more than max_slices allows."""
        if count > self.max_slices:
            raise LimitExceededError(
                f"{source}: the scan has more than {self.max_slices} slices (the limit)"
            )


class ScanSlots:
    """Admission control for concurrent scans: a free slot or an immediate refusal.

    Used from the event loop only, so a plain counter is race-free; deliberately not a
    semaphore, which would queue excess scans (and their memory) without bound.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def full(self) -> bool:
        return self._in_use >= self.capacity

    def refusal(self) -> AdmissionRefusedError:
        """The error for a scan that finds every slot taken; noted by the overload gate."""
        OVERLOAD_GATE.note_refusal()
        return AdmissionRefusedError(
            f"{self._in_use} scans in progress, the limit is {self.capacity}; retry later"
        )

    @contextmanager
    def acquire(self) -> Iterator[None]:
        """Hold one slot for the duration of a scan; raise AdmissionRefusedError if none is
        free. The gateway's interceptor refuses most such scans before they get here (see
        ScanServiceInterceptor); this is the authority, for scans admitted in between."""
        if self.full:
            raise self.refusal()
        self._in_use += 1
        try:
            yield
        finally:
            self._in_use -= 1


class OverloadGate:
    """Holds new CPU-bound scan work back while the gateway is refusing a burst of scans.

    grpc.aio takes new calls from gRPC core one at a time, and each hand-over between gRPC's
    poller thread and the event loop needs the GIL. Worker threads parsing DICOM or measuring
    lesions hold it in short stretches that add up: with admitted scans at work, a burst's
    refusals came out many times slower than idle (figures: docs/reliability.md). So while
    refusals keep coming, new thread jobs of admitted scans wait (asyncio, holding nothing)
    and the refusals go out first; jobs already queued when the burst began wait in their
    worker thread (`hold_in_thread`, see ScanCpuPool). Bounded both ways: a job waits at most
    MAX_HOLD_S at a stretch and the gate then stays open for MIN_RUN_S, so a storm that never
    ends slows admitted scans but never stops them.
    Process-wide, like the GIL.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        # Clock and sleep are parameters so that tests can drive the gate in simulated time.
        self._clock = clock
        self._sleep = sleep
        self._last_refusal = -1e9
        self._held_since: float | None = None
        self._open_until = -1e9
        self.holds = 0

    def note_refusal(self) -> None:
        now = self._clock()
        self._last_refusal = now
        if self._held_since is None and now >= self._open_until:
            self._held_since = now

    async def wait(self) -> None:
        """Return at once unless a burst of refusals is going on (see the class)."""
        counted = False
        while True:
            now = self._clock()
            if now < self._open_until or now - self._last_refusal >= QUIET_S:
                self._held_since = None
                return
            held_since = self._held_since if self._held_since is not None else now
            self._held_since = held_since
            if now - held_since >= MAX_HOLD_S:
                self._open_until = now + MIN_RUN_S
                self._held_since = None
                return
            if not counted:
                self.holds += 1
                counted = True
            until = min(self._last_refusal + QUIET_S, held_since + MAX_HOLD_S)
            await self._sleep(max(until - now, 0.0005))

    def hold_in_thread(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """The same rule for a job queued before the burst began, waited in the worker thread
        about to run it (`wait` only sees jobs submitted since). Sleeping, the thread leaves
        the GIL to the event loop. It only reads the loop's state, but for opening the gate
        after a hold of MAX_HOLD_S (one float written, so a race costs nothing)."""
        started = self._clock()
        while True:
            now = self._clock()
            quiet_at = self._last_refusal + QUIET_S
            if now >= quiet_at or now < self._open_until:
                return
            if now - started >= MAX_HOLD_S:
                self._open_until = now + MIN_RUN_S
                return
            sleep(max(min(quiet_at, started + MAX_HOLD_S) - now, 0.0005))


OVERLOAD_GATE = OverloadGate()


class ScanCpuPool:
    """The threads that run scans' CPU-bound work: a pool of its own, `DEFAULT_CPU_THREADS`
    unless the gateway is told otherwise.

    Why not asyncio's default pool (cores + 4 threads): threads that mostly hold the GIL run
    no faster side by side, and with six of them the event loop waited behind several for the
    GIL each time it took a call (on 2 cores both scans and refusals were slower on it;
    figures: docs/reliability.md). Jobs pass the overload gate twice: before they are queued,
    and in the thread just before they run, so that jobs queued before a burst began also
    wait it out.
    """

    def __init__(self, threads: int = DEFAULT_CPU_THREADS) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.configure(threads)

    def configure(self, threads: int) -> None:
        """Use `threads` threads from now on (a gateway does this once, as it starts)."""
        if threads < 1:
            raise ValueError(f"the scan CPU pool needs at least 1 thread, got {threads}")
        self.shutdown()
        self._threads = threads

    def shutdown(self) -> None:
        """Let the threads go once their queued jobs are done; the next job starts new ones."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def run(self, func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        await OVERLOAD_GATE.wait()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="ctjoint-scan-cpu"
            )
        call = functools.partial(_after_the_gate, functools.partial(func, *args, **kwargs))
        # Like asyncio.to_thread: the job sees the caller's context (the request id in logs).
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, call)


def _after_the_gate(job: Callable[[], _T]) -> _T:
    OVERLOAD_GATE.hold_in_thread()
    return job()


SCAN_CPU = ScanCpuPool()


async def cpu_bound(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run a scan's CPU-bound work on the scan CPU pool, after the overload gate."""
    return await SCAN_CPU.run(func, *args, **kwargs)
