"""Memory budgets: per scan, for the gateway as a whole, and a bound on each analysis worker.

A scan's memory follows its decoded volume (rows x columns x slices x 4 bytes of float32 HU):
the analysis holds the volume and, beside it, the preprocessed planes, lung and label maps,
the overlay and the DICOM outputs. bench/scan_memory.py measures the peak per decoded byte
(3.8 to 5.2 with every output asked, docs/reliability.md); ANALYSIS_BYTES_PER_DECODED_BYTE
is that with a margin. Budgets are counted in decoded bytes, reserved as the volume's buffer
is allocated (gateway/series.py), before any of it is:

- per scan (`max_scan_bytes`, --max-scan-bytes): a larger volume is RESOURCE_EXHAUSTED;
- for the gateway (`budget_bytes`, --memory-budget): the sum over scans in flight of what
  they reserved, kept in a `MemoryLedger` shared by the analysis workers; a scan that would
  take it past the budget is RESOURCE_EXHAUSTED (retry later) and the others go on;
- per worker: while a scan runs, its worker's RLIMIT_DATA is what it held when the scan began,
  plus WORKER_SLACK_BYTES for one file's decoding, plus ANALYSIS_BYTES_PER_DECODED_BYTE times
  its reservation. An analysis that outgrows it gets MemoryError from the allocator, and its
  scan ends RESOURCE_EXHAUSTED naming the bound, long before the kernel's OOM killer would end
  the worker (or the gateway) without a word.

By default the gateway's budget is what the box (or the memory cgroup the gateway runs in)
leaves after the gateway and its workers, divided by ANALYSIS_BYTES_PER_DECODED_BYTE.

Size: one job, the memory accounting and bounds of scans and workers (ledger, per-worker
limit, freed-heap trimming).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import logging
import mmap
import os
import platform
import resource
import struct
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Final

from ctjoint.gateway.errors import AnalysisMemoryError, LimitExceededError

log = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
# bench/scan_memory.py: 5.2 at 512x512x100, 4.3 at 1024x1024x40, 3.8 at 2048x2048x12 (jcs2d,
# masks + overlay + SEG + SR asked), 4.1-4.6 for deepsc3d; 6 leaves room for what it did not see.
ANALYSIS_BYTES_PER_DECODED_BYTE: Final = 6
# One file's decoding before its slice has a place in the volume: a deflated data set inflates
# to at most 72 MiB (dicom_io.MAX_INFLATED_BYTES), pydicom copies it, and the pixels follow.
WORKER_SLACK_BYTES: Final = 512 * MIB
# What the gateway process and each worker hold before any scan (Python, numpy, pydicom,
# onnxruntime or tritonclient and the models): about 250-350 MiB measured here, rounded up.
PROCESS_BASE_BYTES: Final = 400 * MIB
# The per-scan budget of the decoded volume: 1.5 GiB holds 1,000 slices of 512 x 512 or 375 of
# 1024 x 1024, not 60 of 4096 x 4096.
DEFAULT_MAX_SCAN_BYTES: Final = 1536 * MIB
_SLOT = struct.Struct("=q")


class MemoryLedger:
    """Decoded bytes reserved by each analysis worker, in memory the workers share (a memfd
    they inherit), so that a reservation is checked against the sum over every scan in flight
    at the moment it is made. One slot per worker; a POSIX lock on the file makes check and
    write one step across processes."""

    def __init__(self, fd: int, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a memory ledger needs at least 1 slot, got {slots}")
        self.fd = fd
        self.slots = slots
        self._map = mmap.mmap(fd, slots * _SLOT.size)

    @classmethod
    def create(cls, slots: int) -> MemoryLedger:
        fd = os.memfd_create("ctjoint-memory-ledger", 0)
        os.ftruncate(fd, slots * _SLOT.size)
        return cls(fd, slots)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)

    def in_use(self) -> int:
        with self._locked():
            return self._total()

    def held(self, slot: int) -> int:
        return int(_SLOT.unpack_from(self._map, slot * _SLOT.size)[0])

    def reserve(self, slot: int, nbytes: int, budget: int) -> int | None:
        """Make `slot` hold `nbytes` if the sum over every slot stays within `budget`; None
        when it did, else what the other slots hold (the reservation is left as it was)."""
        with self._locked():
            others = self._total() - self.held(slot)
            if nbytes > self.held(slot) and others + nbytes > budget:
                return others
            _SLOT.pack_into(self._map, slot * _SLOT.size, nbytes)
            return None

    def clear(self, slot: int) -> None:
        """Free what `slot` held (its scan is over, or its worker is gone)."""
        with self._locked():
            _SLOT.pack_into(self._map, slot * _SLOT.size, 0)

    def _total(self) -> int:
        return sum(self.held(slot) for slot in range(self.slots))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


def memory_limit_bytes() -> int:
    """The memory this process may use: the box's, or its memory cgroup's limit if lower."""
    limit = _meminfo_total()
    for path in _cgroup_limit_files():
        with contextlib.suppress(OSError, ValueError):
            text = path.read_text().strip()
            if text != "max":
                limit = min(limit, int(text))
    return limit


def default_budget_bytes(workers: int, max_scan_bytes: int) -> int:
    """What the memory limit leaves after the gateway and `workers` workers, divided by what
    analysis takes per decoded byte; never more than every worker at the per-scan budget."""
    free = memory_limit_bytes() - (1 + workers) * PROCESS_BASE_BYTES - workers * WORKER_SLACK_BYTES
    budget = free // ANALYSIS_BYTES_PER_DECODED_BYTE
    if budget < 64 * MIB:
        log.warning(
            "the memory limit (%d MiB) leaves little for scans: a budget of %d MiB decoded; "
            "set --memory-budget, or give the gateway more memory",
            memory_limit_bytes() // MIB,
            max(budget, 0) // MIB,
        )
        budget = max(budget, 16 * MIB)
    return int(min(budget, workers * max_scan_bytes))


def oom_kills() -> int | None:
    """How many processes the kernel has killed for memory in this process's memory cgroup
    (its own limit's kills; None where the count cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "":
                path = Path("/sys/fs/cgroup", group.lstrip("/"), "memory.events")
            elif "memory" in controllers.split(","):
                path = Path("/sys/fs/cgroup/memory", group.lstrip("/"), "memory.oom_control")
            else:
                continue
            with contextlib.suppress(OSError, ValueError):
                for entry in path.read_text().splitlines():
                    name, _, value = entry.partition(" ")
                    if name == "oom_kill":
                        return int(value)
    return None


def _meminfo_total() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cgroup_limit_files() -> list[Path]:
    """The limit files of this process's memory cgroup and its ancestors (v1 and v2)."""
    files: list[Path] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "":
                root, name = Path("/sys/fs/cgroup"), "memory.max"
            elif "memory" in controllers.split(","):
                root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
            else:
                continue
            parts = Path(group.lstrip("/")).parts
            files += [root.joinpath(*parts[:i], name) for i in range(len(parts) + 1)]
    return files


class ScanMemory:
    """One scan's reservation: checked against the per-scan budget and the gateway's ledger,
    and (in a worker) the worker's memory bound following it."""

    def __init__(
        self,
        max_scan_bytes: int,
        *,
        ledger: MemoryLedger | None = None,
        slot: int = 0,
        budget_bytes: int | None = None,
        bound: bool = False,
    ) -> None:
        self.max_scan_bytes = max_scan_bytes
        self._ledger = ledger
        self._slot = slot
        self._budget = budget_bytes
        self.reserved = 0
        # The worker's data size when the scan began (None: no bound on this process).
        self._base = _data_bytes() if bound else None
        self.limit_bytes: int | None = None
        self._bound()

    def reserve(self, decoded_bytes: int, where: str) -> None:
        """Hold `decoded_bytes` for this scan's volume (more than before), or raise
        LimitExceededError naming `where` (the slice that asked) and the budget."""
        if decoded_bytes <= self.reserved:
            return
        if decoded_bytes > self.max_scan_bytes:
            raise LimitExceededError(
                f"{where}: {decoded_bytes} bytes decoded exceed the budget of "
                f"{self.max_scan_bytes} bytes per scan"
            )
        if self._ledger is not None and self._budget is not None:
            others = self._ledger.reserve(self._slot, decoded_bytes, self._budget)
            if others is not None:
                raise LimitExceededError(
                    f"{where}: the scan needs {decoded_bytes} bytes decoded, and the scans in "
                    f"flight hold {others} of the gateway's memory budget of {self._budget} "
                    "bytes; retry later"
                )
        self.reserved = decoded_bytes
        self._bound()

    def release(self) -> None:
        if self._ledger is not None:
            self._ledger.clear(self._slot)
        self.reserved = 0
        if self._base is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_DATA)
            resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
            self.limit_bytes = None

    def out_of_memory(self) -> AnalysisMemoryError:
        """The error for this scan's MemoryError: what it held, against which bound."""
        bound = (
            f"its worker's memory bound of {self.limit_bytes} bytes"
            if self.limit_bytes is not None
            else "the memory this process could get"
        )
        return AnalysisMemoryError(
            f"the analysis of a scan of {self.reserved} bytes decoded needed more than {bound} "
            f"({ANALYSIS_BYTES_PER_DECODED_BYTE} x its decoded volume, plus "
            f"{WORKER_SLACK_BYTES // MIB} MiB for decoding a file); the scan was ended"
        )

    def _bound(self) -> None:
        if self._base is None:
            return
        limit = self._base + WORKER_SLACK_BYTES + ANALYSIS_BYTES_PER_DECODED_BYTE * self.reserved
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        self.limit_bytes = limit


def _data_bytes() -> int:
    """This process's data segment as the kernel counts it for RLIMIT_DATA (VmData)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


# prctl(2): no transparent huge pages for the calling process.
_PR_SET_THP_DISABLE: Final = 41
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8
# Arrays up to this size come from the heap and go back to it: a 512x512x100 mask is 26 MB.
HEAP_ARRAY_BYTES: Final = 32 * MIB
# Freed heap memory a process may keep for its next allocations before it goes back to the
# kernel (--kept-freed-memory): the per-slice and per-chunk arrays of a scan's next steps are
# reused from it, yet a 512x512x400 scan no longer keeps 0.5-0.9 GB it has freed.
DEFAULT_KEPT_FREED_BYTES: Final = 64 * MIB
# How often a running scan's worker looks at what its heap holds free.
FREED_CHECK_S: Final = 0.1


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class FreedMemory:
    """What a process keeps of the memory it frees (glibc malloc), bounded by `kept_bytes`.

    `tune` lets glibc reuse freed arrays instead of asking the kernel for fresh pages, which it
    zeroes page by page on first touch (after the last file that cost more than the lung step's
    own work): one arena, a 32 MB mmap threshold, and the top of the heap trimmed past
    `kept_bytes`. Freed blocks inside the heap are only handed back by malloc_trim: `bound`
    does that when more than `kept_bytes` lie free (a worker checks every FREED_CHECK_S while
    a scan runs), `release` after each scan, with a garbage collection first so that objects
    in reference cycles give their arrays back too. Does nothing off glibc or when the operator
    set any MALLOC_* variable (glibc then follows those).
    """

    def __init__(self, kept_bytes: int = DEFAULT_KEPT_FREED_BYTES) -> None:
        if kept_bytes < 0:
            raise ValueError(f"kept freed memory cannot be negative, got {kept_bytes}")
        self.kept_bytes = int(kept_bytes)
        self._libc: Any = None
        if any(name.startswith("MALLOC_") for name in os.environ):
            return
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return
        if hasattr(libc, "mallinfo2"):
            libc.mallinfo2.restype = _MallInfo2
            self._libc = libc

    @property
    def active(self) -> bool:
        return self._libc is not None

    def tune(self) -> bool:
        """Apply the malloc settings, and small pages (`small_pages`); True when malloc's
        settings were applied."""
        small_pages()
        if self._libc is None:
            return False
        applied = all(
            self._libc.mallopt(option, value) == 1
            for option, value in (
                (_M_ARENA_MAX, 1),
                (_M_MMAP_THRESHOLD, HEAP_ARRAY_BYTES),
                (_M_TRIM_THRESHOLD, max(self.kept_bytes, 1)),
            )
        )
        log.debug("malloc tuned for volume-sized arrays: %s", applied)
        if applied:
            global _TUNED
            _TUNED = self
        return applied

    def free_bytes(self) -> int:
        """Bytes the heap holds free (allocated from the kernel, not in use); 0 if unknown."""
        return 0 if self._libc is None else int(self._libc.mallinfo2().fordblks)

    def bound(self) -> bool:
        """Hand the heap's free pages back when more than `kept_bytes` lie free; True if so.

        glibc still counts handed-back blocks as free, so past the bound every call trims:
        about 0.5 ms when there is nothing new to hand back, and the kernel's work on the
        pages when there is (about 0.1 s for 0.7 GB)."""
        if self._libc is None or self.free_bytes() <= self.kept_bytes:
            return False
        self._libc.malloc_trim(ctypes.c_size_t(self.kept_bytes))
        return True

    def release(self) -> bool:
        """After a scan: collect its reference cycles, then `bound`."""
        gc.collect()
        return self.bound()

    async def bounding(self) -> None:
        """`bound` every FREED_CHECK_S until cancelled (beside a running scan)."""
        while True:
            await asyncio.sleep(FREED_CHECK_S)
            self.bound()


# The process's FreedMemory once tuned (None: glibc's own behaviour, nothing to bound).
_TUNED: FreedMemory | None = None


def hand_back() -> bool:
    """`FreedMemory.bound` for this process's tuned allocator; nothing when none was tuned.
    For a step that frees much while it holds the event loop, where a worker's periodic
    check cannot run (streaming's final copy frees its batches as it fills one array)."""
    return _TUNED is not None and _TUNED.bound()


def small_pages() -> bool:
    """No transparent huge pages for this process (and the processes it starts); True when
    the kernel agreed (Linux only).

    The analysis writes its volume-sized masks and maps into zeroed (calloc'd) arrays inside
    the box of what they hold, so that pages outside are never touched and never resident.
    NumPy asks for huge pages on large arrays (and a kernel set to "always" uses them anyway):
    one byte then makes 2 MiB resident, eight 512x512 slices of a bool mask, and the box
    saves nothing (the SEG's four masks of a 400-slice scan: 278 MiB instead of 96 MiB).
    """
    if platform.system() != "Linux":
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0)


_CURRENT: ContextVar[ScanMemory | None] = ContextVar("ctjoint_scan_memory", default=None)


def current_scan_memory() -> ScanMemory | None:
    """The reservation of the scan this code runs for (set by whoever runs the scan)."""
    return _CURRENT.get()


@contextlib.contextmanager
def scan_memory(memory: ScanMemory) -> Iterator[ScanMemory]:
    """Run a scan under `memory`; what it reserved is released when it is over."""
    token = _CURRENT.set(memory)
    try:
        yield memory
    finally:
        _CURRENT.reset(token)
        memory.release()


__all__ = [
    "ANALYSIS_BYTES_PER_DECODED_BYTE",
    "DEFAULT_KEPT_FREED_BYTES",
    "DEFAULT_MAX_SCAN_BYTES",
    "FreedMemory",
    "MemoryLedger",
    "ScanMemory",
    "current_scan_memory",
    "default_budget_bytes",
    "hand_back",
    "memory_limit_bytes",
    "oom_kills",
    "scan_memory",
    "small_pages",
]
