"""Test-only decode functions for the decode worker pool: they crash, segfault or hang the
worker when the pixel data carries a marker, and decode normally otherwise. They run inside
the worker processes (named to them as module:function), never in the gateway itself."""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np

from ctjoint.gateway.decode_pool import DecodeRequest, decode_pixels

ABORT_MARKER = b"CTJOINT-ABORT"
SEGFAULT_MARKER = b"CTJOINT-SEGV"
HANG_MARKER = b"CTJOINT-HANG"


def misbehaving_decode(request: DecodeRequest) -> np.ndarray:
    """A codec that aborts, dereferences NULL or never returns on marked input."""
    if ABORT_MARKER in request.pixel_data:
        os.abort()
    if SEGFAULT_MARKER in request.pixel_data:
        ctypes.string_at(0)
    if HANG_MARKER in request.pixel_data:
        time.sleep(3600)
    return decode_pixels(request)
