"""A gateway built to leak, so tests/test_load.py can show that its memory check trips.

The analyser of every gateway process and analysis worker is wrapped so that each analysed
scan leaves exactly `bytes_per_scan` bytes of its pixels behind for good. It gets in through
tests/leaking_build/sitecustomize.py, which Python runs at start-up in every process whose
PYTHONPATH names that folder (the workers inherit the gateway's path): production code has no
switch for it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

ENV_LEAK_BYTES_PER_SCAN = "CTJOINT_TEST_LEAK_BYTES_PER_SCAN"


class Leak:
    """Keeps `bytes_per_scan` bytes of every buffer it is given, for ever."""

    def __init__(self, bytes_per_scan: int) -> None:
        if bytes_per_scan < 1:
            raise ValueError(f"{ENV_LEAK_BYTES_PER_SCAN} must be at least 1")
        self.bytes_per_scan = bytes_per_scan
        self._kept: list[np.ndarray] = []

    @property
    def kept_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self._kept)

    def keep(self, buffer: np.ndarray) -> None:
        """A copy of `buffer`'s bytes, repeated or cut to exactly bytes_per_scan (every page
        written, so the resident set really grows)."""
        raw = np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)
        self._kept.append(np.resize(raw, self.bytes_per_scan))


class LeakingAnalyzer:
    """The gateway's analyser, unchanged except that each analysis's pixels feed the leak."""

    def __init__(self, inner: Any, leak: Leak) -> None:
        self._inner = inner
        self._leak = leak

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def analyze_files(self, *args: Any, **kwargs: Any) -> Any:
        analysis = await self._inner.analyze_files(*args, **kwargs)
        self._leak.keep(analysis.volume.hu)
        return analysis


def install_from_environment() -> None:
    """Wrap `ctjoint.gateway.server.create_analyzer` (looked up there by the serving process
    and by each worker) so that every analyser it makes leaks."""
    raw = os.environ.get(ENV_LEAK_BYTES_PER_SCAN, "")
    try:
        leak = Leak(int(raw))
    except ValueError as err:
        raise SystemExit(
            f"{ENV_LEAK_BYTES_PER_SCAN}={raw!r}: a positive byte count ({err})"
        ) from None
    from ctjoint.gateway import server

    create = server.create_analyzer

    def create_leaking(*args: Any, **kwargs: Any) -> Any:
        print(
            f"TEST-ONLY: this analyser leaks {leak.bytes_per_scan} bytes per scan "
            "(tests/leaking_analyzer.py)",
            file=sys.stderr,
            flush=True,
        )
        return LeakingAnalyzer(create(*args, **kwargs), leak)

    server.create_analyzer = create_leaking  # type: ignore[assignment]
