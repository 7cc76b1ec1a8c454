"""What one gateway accepts: file size, slices per scan, concurrent scans, gRPC message size.

Every limit fails fast with `LimitExceededError` (RESOURCE_EXHAUSTED): a scan past a limit is
rejected the moment we know, never queued without bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ctjoint.gateway.errors import LimitExceededError

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
