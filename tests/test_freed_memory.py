"""Freed memory a gateway process keeps is bounded and configurable (issue 22, point 3):
measured on the real allocator, in a fresh interpreter (malloc settings are per process)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from ctjoint.gateway.limits import GatewayLimits
from ctjoint.gateway.memory import DEFAULT_KEPT_FREED_BYTES, FreedMemory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the bound is glibc's malloc_trim; elsewhere FreedMemory does nothing by design",
)

MIB = 1024 * 1024

# Allocates 300 per-slice arrays of 1 MiB (heap-sized), keeps every tenth (so the heap
# cannot simply shrink from its top), frees the rest, then reports the heap's free bytes and
# the resident set before and after `bound`, and after `release`.
_CHILD = """
import json, sys
import numpy as np
from ctjoint.gateway.memory import FreedMemory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
freed = FreedMemory(int(sys.argv[1]))
out = {"tuned": freed.tune()}
arrays = [np.ones(1 << 20, dtype=np.uint8) for _ in range(300)]
kept = arrays[::10]
del arrays
out["free_before"], out["rss_before"] = freed.free_bytes(), rss()
out["bounded"] = freed.bound()
out["free_after"], out["rss_after"] = freed.free_bytes(), rss()
more = [np.ones(1 << 20, dtype=np.uint8) for _ in range(100)]
del more
out["rss_reused"] = rss()
out["released"] = freed.release()
out["rss_released"] = rss()
print(json.dumps(out))
"""


def _child(kept: int, env: dict[str, str] | None = None) -> dict[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(kept)],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_freed_memory_past_the_bound_goes_back_to_the_system() -> None:
    out = _child(64 * MIB)
    assert out["tuned"]
    # 270 MiB freed inside the heap: kept by glibc until bounded.
    assert out["free_before"] >= 260 * MIB
    assert out["bounded"]
    # malloc_trim hands back the free pages (the chunk headers stay): RSS drops by them.
    assert out["rss_before"] - out["rss_after"] >= 250 * MIB
    # 100 MiB reused from the handed-back pages and freed again: handed back again.
    assert out["released"]
    assert out["rss_reused"] - out["rss_released"] >= 90 * MIB


def test_below_the_bound_freed_memory_is_kept() -> None:
    out = _child(1024 * MIB)
    assert out["free_before"] >= 260 * MIB
    assert not out["bounded"]
    assert out["rss_before"] - out["rss_after"] < 16 * MIB


def test_the_operators_malloc_variables_win() -> None:
    out = _child(64 * MIB, {"MALLOC_ARENA_MAX": "2"})
    assert not out["tuned"] and not out["bounded"]


def test_the_bound_is_configured_with_the_limits() -> None:
    assert GatewayLimits().kept_freed_bytes == DEFAULT_KEPT_FREED_BYTES == 64 * MIB
    assert GatewayLimits(kept_freed_bytes=0).kept_freed_bytes == 0
    with pytest.raises(ValueError, match="kept_freed_bytes cannot be negative"):
        GatewayLimits(kept_freed_bytes=-1)
    with pytest.raises(ValueError, match="cannot be negative"):
        FreedMemory(-1)


# A zeroed 400 MiB array with one byte written every 256 KiB (a bool mask's slice of
# 512x512 each): with 4 KiB pages that is 1.6 MiB resident, with huge pages all of it.
_SPARSE = """
import json, sys
import numpy as np
from ctjoint.gateway.memory import small_pages
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
applied = small_pages() if sys.argv[1] == "small" else False
before = rss()
mask = np.zeros(400 << 20, dtype=np.bool_)
mask[:: 256 << 10] = True
print(json.dumps({"applied": applied, "grown": rss() - before}))
"""


def test_masks_written_in_their_box_stay_small_with_small_pages() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SPARSE, "small"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["applied"]
    assert out["grown"] < 16 * MIB
