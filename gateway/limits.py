"""What one gateway accepts: file size, slices per scan, concurrent scans, gRPC message size.

Every limit fails fast with `LimitExceededError` (RESOURCE_EXHAUSTED): a scan past a limit is
rejected the moment we know, never queued without bound.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import numpy as np

from ctjoint.gateway.errors import LimitExceededError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# TEST-ONLY switches (tests/test_load.py): a gateway that leaks on purpose, so the memory
# check is known to catch a leak. Read only when CTJOINT_TEST_MODE=1 is set as well.
ENV_TEST_MODE: Final = "CTJOINT_TEST_MODE"
ENV_TEST_LEAK_BYTES_PER_SCAN: Final = "CTJOINT_TEST_LEAK_BYTES_PER_SCAN"

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


@dataclass(frozen=True)
class GatewayLimits:
    """The configurable limits of one gateway process."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_slices: int = DEFAULT_MAX_SLICES
    max_concurrent_scans: int = DEFAULT_MAX_CONCURRENT_SCANS

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_slices", "max_concurrent_scans"):
            value = int(getattr(self, name))
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            object.__setattr__(self, name, value)

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

    @contextmanager
    def acquire(self) -> Iterator[None]:
        """Hold one slot for the duration of a scan; raise LimitExceededError if none is free."""
        if self._in_use >= self.capacity:
            raise LimitExceededError(
                f"{self._in_use} scans in progress, the limit is {self.capacity}; retry later"
            )
        self._in_use += 1
        try:
            yield
        finally:
            self._in_use -= 1


class TestLeak:
    """TEST-ONLY: keeps `bytes_per_scan` bytes of every finished scan's pixel buffer for ever.

    Exists so the load test can prove that its memory check trips on a real leak. It is only
    ever built from the environment, and only when both ENV_TEST_MODE=1 and
    ENV_TEST_LEAK_BYTES_PER_SCAN are set; a production gateway never has one.
    """

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, bytes_per_scan: int) -> None:
        if bytes_per_scan < 1:
            raise ValueError(f"{ENV_TEST_LEAK_BYTES_PER_SCAN} must be at least 1")
        self.bytes_per_scan = bytes_per_scan
        self._kept: list[np.ndarray] = []

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> TestLeak | None:
        env = os.environ if environ is None else environ
        raw = env.get(ENV_TEST_LEAK_BYTES_PER_SCAN, "")
        if env.get(ENV_TEST_MODE) != "1" or not raw:
            return None
        try:
            leak = cls(int(raw))
        except ValueError as err:
            raise ValueError(
                f"{ENV_TEST_LEAK_BYTES_PER_SCAN}={raw!r}: expected a positive byte count ({err})"
            ) from None
        log.warning(
            "TEST-ONLY: leaking %d bytes per scan (%s); never set this outside tests",
            leak.bytes_per_scan,
            ENV_TEST_LEAK_BYTES_PER_SCAN,
        )
        return leak

    @property
    def kept_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self._kept)

    def keep(self, buffer: np.ndarray) -> None:
        """Hold a copy of `buffer`'s bytes, repeated or cut to exactly bytes_per_scan (every
        page written, so the resident set really grows)."""
        raw = np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)
        self._kept.append(np.resize(raw, self.bytes_per_scan))
