"""Model-grid outputs back on the source grid, in-plane: label maps from logits, CAM.

The model sees a resampled volume (gateway/preprocess.py); users see the scan's own slices.
Each model kind's `to_source` puts its logits on the source's slices and `inplane_labels`
upsamples them sparsely (only where neighbouring model samples disagree); `cam_on_source`
interpolates a class activation map for overlays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ctjoint.gateway.resample import resample_matrix


def cam_on_source(
    cam: np.ndarray, source_shape: tuple[int, int, int], slices: Sequence[int] | None = None
) -> np.ndarray:
    """A model-grid class activation map as uint8 [n, Y, X] on the source grid (all slices, or
    `slices`), linearly interpolated per axis; the map's maximum on the model grid is 255.

    A 2.5D map has one slice per source slice; a 3D map is interpolated along z as well. Scaling
    by the scan maximum (not per slice) keeps slices comparable: where the head looked most.
    """
    z, y, x = source_shape
    wanted = list(range(z)) if slices is None else [int(s) for s in slices]
    peak = float(cam.max()) if cam.size else 0.0
    out = np.zeros((len(wanted), y, x), dtype=np.uint8)
    if peak <= 0.0 or not wanted:
        return out
    ry = resample_matrix(cam.shape[1], y, "linear").astype(np.float32)  # [Y, h]
    rx = resample_matrix(cam.shape[2], x, "linear").astype(np.float32)  # [X, w]
    if cam.shape[0] == z:
        planes = cam[wanted]
    else:
        rz = resample_matrix(cam.shape[0], z, "linear").astype(np.float32)  # [Z, d]
        planes = np.tensordot(rz[wanted], cam, axes=(1, 0))
    for i, plane in enumerate(planes):
        values = ry @ plane.astype(np.float32) @ rx.T
        out[i] = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
    return out


def inplane_labels(
    out: np.ndarray, rows: np.ndarray, logits_of: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Fill the source slices `rows` of the label map `out` [Z, Y, X] with the argmax of
    linearly upsampled logits, `logits_of(chunk)` giving the [n, K, h, w] logits of those
    source slices (the model kind has put them on the source's z already). Returns `out`.

    The shared definition (`preprocess.logits_to_source_labels`) interpolates logits and takes
    the argmax. Linear interpolation is a convex combination of at most two samples per axis,
    so where every model sample a source pixel draws from has the same argmax, the
    interpolated logits have it too. Only pixels whose samples disagree (class boundaries, a
    few percent) need their logits interpolated. Same labels (up to float rounding where two
    classes tie) at a small fraction of the cost: about 0.1 s instead of 4 s CPU for 100
    slices of 512x512 with typical lesions.
    """
    if rows.size == 0:
        return out
    y, x = out.shape[1:]
    taps: tuple[_Taps, _Taps] | None = None
    # A few slices at a time, written straight into the map: the logits of every lesion
    # slice at once were a volume-sized temporary (3D: 118 MB of fresh pages at 600 slices).
    for start in range(0, rows.size, _UPSAMPLE_CHUNK):
        chunk = rows[start : start + _UPSAMPLE_CHUNK]
        logits = logits_of(chunk).astype(np.float32, copy=False)  # [n, K, h, w]
        h, w = logits.shape[-2:]
        ry, rx = resample_matrix(h, y, "linear"), resample_matrix(w, x, "linear")
        if taps is None:
            taps_y, taps_x = _two_taps(ry), _two_taps(rx)
            taps = None if taps_y is None or taps_x is None else (taps_y, taps_x)
        if taps is None:
            # Dense, as the shared definition does it.
            out[chunk] = np.argmax(np.matmul(ry, np.matmul(logits, rx.T)), axis=1)
        else:
            _upsample_into(out, chunk, logits, *taps)
    return out


_Taps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# Slices upsampled at once: bounds the temporary arrays for boundary-rich label maps.
_UPSAMPLE_CHUNK = 16


def _two_taps(matrix: np.ndarray) -> _Taps | None:
    """(first, second, w_first, w_second) per output row of a resample matrix whose rows mix
    at most two adjacent inputs with non-negative weights; None otherwise (then stay dense)."""
    nonzero = matrix != 0
    if (matrix < 0).any() or (nonzero.sum(axis=1) > 2).any():
        return None
    rows = np.arange(matrix.shape[0])
    first = np.argmax(nonzero, axis=1)
    second = matrix.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    if (second - first > 1).any():
        return None
    w_first = matrix[rows, first]
    w_second = np.where(second != first, matrix[rows, second], 0.0).astype(np.float32)
    return first, second, w_first, w_second


def _upsample_into(
    out: np.ndarray, rows: np.ndarray, logits: np.ndarray, taps_y: _Taps, taps_x: _Taps
) -> None:
    """Write the labels of source slices `rows` into `out` (zeros there), from their
    [n, K, H, W] logits: only inside the box of the model cells that can give a lesion (a
    lesion corner, or corners that disagree); background elsewhere is left as it is. The
    lesions of a chest CT cover a small part of each slice: at 512x512x400 the upsampling
    after the last file took 0.3 s over whole slices."""
    y0, x0 = taps_y[0], taps_x[0]
    labels = np.argmax(logits, axis=1).astype(np.uint8)  # [n, H, W]
    mixed = _mixed_cells(labels)
    may_hold = (labels != 0) | mixed
    cells_y = np.flatnonzero(may_hold.any(axis=(0, 2)))
    if cells_y.size == 0:
        return
    cells_x = np.flatnonzero(may_hold.any(axis=(0, 1)))
    # A source pixel takes its cell's label, or is interpolated in a mixed cell: outside the
    # source rows and columns whose first tap falls among these cells it is background. The
    # first taps ascend, so those rows and columns are one range each.
    ys = slice(*np.searchsorted(y0, [cells_y[0], cells_y[-1] + 1]).tolist())
    xs = slice(*np.searchsorted(x0, [cells_x[0], cells_x[-1] + 1]).tolist())
    out[rows, ys, xs] = _upsample_labels(
        logits, labels, mixed, _crop(taps_y, ys), _crop(taps_x, xs)
    )


def _crop(taps: _Taps, part: slice) -> _Taps:
    """The taps of the output pixels in `part`."""
    first, second, w_first, w_second = taps
    return first[part], second[part], w_first[part], w_second[part]


def _mixed_cells(labels: np.ndarray) -> np.ndarray:
    """[n, H, W]: a model cell (h..h+1, w..w+1) is mixed if its four labels differ. Every
    source pixel draws from one cell (its taps are adjacent), so only pixels in mixed cells
    need logits."""
    edge = np.pad(labels, ((0, 0), (0, 1), (0, 1)), mode="edge")
    corner = edge[:, :-1, :-1]
    mixed = corner != edge[:, 1:, :-1]
    mixed |= corner != edge[:, :-1, 1:]
    mixed |= corner != edge[:, 1:, 1:]
    return mixed


def _upsample_labels(
    logits: np.ndarray, labels: np.ndarray, mixed: np.ndarray, taps_y: _Taps, taps_x: _Taps
) -> np.ndarray:
    """[n, K, H, W] logits (with their argmax `labels` and `_mixed_cells`) -> [n, Y, X]
    labels of the source pixels the taps give; interpolates only where neighbours disagree."""
    y0, y1, wy0, wy1 = taps_y
    x0, x1, wx0, wx1 = taps_x
    n, k, h, w = logits.shape
    out = np.empty((n, len(y0), len(x0)), dtype=np.uint8)
    for start in range(0, n, _UPSAMPLE_CHUNK):
        stop = min(start + _UPSAMPLE_CHUNK, n)
        # np.take along an axis is several times faster than the equivalent fancy indexing.
        out[start:stop] = np.take(np.take(labels[start:stop], y0, axis=1), x0, axis=2)
        unsure = np.take(np.take(mixed[start:stop], y0, axis=1), x0, axis=2)
        zz, yy, xx = np.nonzero(unsure)
        if zz.size == 0:
            continue
        # Bilinear logits at the unsure pixels only, gathering whole K-vectors from a
        # pixel-major copy of the chunk's logits: four weighted corners.
        pixels = np.ascontiguousarray(np.moveaxis(logits[start:stop], 1, 3)).reshape(-1, k)
        values = np.zeros((zz.size, k), dtype=np.float32)
        for rows, wy in ((y0[yy], wy0[yy]), (y1[yy], wy1[yy])):
            base = (zz * h + rows) * w
            for cols, wx in ((x0[xx], wx0[xx]), (x1[xx], wx1[xx])):
                values += (wy * wx)[:, None] * np.take(pixels, base + cols, axis=0)
        out[start + zz, yy, xx] = np.argmax(values, axis=1)
    return out


__all__ = ["cam_on_source", "inplane_labels"]
