"""One axis resampled by a matrix: area-averaged down (preprocessing), linear up (outputs).

Shared by preprocessing (gateway/preprocess.py) and the way back to the source grid
(gateway/source_grid.py), so the two use the same pixel-centre convention.
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def resample_matrix(n_in: int, n_out: int, mode: Literal["area", "linear"]) -> np.ndarray:
    """A [n_out, n_in] matrix that resamples one axis (pixel centres aligned, edges clamped).

    "area" averages every input cell an output cell covers (anti-aliased downsampling, so
    noise is averaged rather than aliased); "linear" interpolates between the two nearest
    input centres (smooth upsampling of logits back onto the source grid).
    """
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"cannot resample an axis of {n_in} to {n_out}")
    if mode == "area" and n_out <= n_in:
        edges = np.linspace(0.0, n_in, n_out + 1)
        lo, hi = edges[:-1, None], edges[1:, None]
        cells = np.arange(n_in, dtype=np.float64)[None, :]
        overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
        weights = overlap / overlap.sum(axis=1, keepdims=True)
        return weights.astype(np.float32)
    # Linear interpolation (also used for "area" when upsampling).
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    centres = np.clip(centres, 0.0, n_in - 1)
    left = np.floor(centres).astype(np.int64)
    right = np.minimum(left + 1, n_in - 1)
    frac = centres - left
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, left), 1.0 - frac)
    np.add.at(weights, (rows, right), frac)
    return weights.astype(np.float32)


__all__ = ["resample_matrix"]
