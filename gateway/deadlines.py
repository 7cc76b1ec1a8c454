"""The current scan's deadline, carried in a ContextVar from the RPC down to the backend.

The servicer sets it from the client's gRPC deadline; tasks it starts inherit a copy of the
context, so a backend (Triton) passes the time left on to its own calls without the analysis
pipeline having to thread a timeout through every signature.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

# Absolute time.monotonic() by which the scan must be answered; None: no deadline.
_DEADLINE: ContextVar[float | None] = ContextVar("ctjoint_deadline", default=None)


def set_deadline(seconds_left: float | None) -> None:
    """Start the clock for the current context (None clears it)."""
    _DEADLINE.set(None if seconds_left is None else time.monotonic() + seconds_left)


def time_left() -> float | None:
    """Seconds until the deadline (may be <= 0 once it passed); None without a deadline."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()
