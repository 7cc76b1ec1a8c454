"""Lesion voxels must be denser than aerated lung.

The networks answer on a coarser grid than the scan's (deepsc3d: a resampled volume; jcs2d:
128 x 128 slices) and their maps, upsampled to the source grid, spill over lesion borders
into aerated lung. A voxel whose neighbourhood has the density of aerated lung is neither
ground glass nor consolidation, whatever the map says, so it is dropped from the lesion map
before anything reads it (statistics, masks, SEG, SR, review).

The rule: the mean HU over the voxel's 3 x 3 in-plane neighbourhood (image borders repeat
their edge pixel) at or below `AERATED_MAX_HU` makes it background. -750 HU is the lower
bound of ground-glass attenuation commonly used in quantitative chest CT; the 3 x 3 mean
keeps image noise (tens of HU) from punching holes into faint ground glass. Measured on
validation phantoms: docs/models.md (Postprocessing).

Work in proportion to the lesion voxels, not to the scan: nine gathers of the HU at the
lesion voxels' neighbours.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from ctjoint.gateway.quantify import LesionVoxels

AERATED_MAX_HU: Final = -750.0
_OFFSETS: Final = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def neighbourhood_mean_hu(hu: np.ndarray, voxels: LesionVoxels) -> np.ndarray:
    """Mean HU (float64) over the 3 x 3 in-plane neighbourhood of each voxel, edge pixels
    repeated at the image border (scipy.ndimage.uniform_filter's mode 'nearest')."""
    rows, columns = hu.shape[1:]
    # Flat offsets for voxels off the border (nearly all): no clipping, one index each; on
    # 1M voxels of a 400 x 512 x 512 scan 0.08 s against 0.22 s clipping every neighbour.
    inner = (voxels.y > 0) & (voxels.y < rows - 1) & (voxels.x > 0) & (voxels.x < columns - 1)
    flat = hu.reshape(-1)
    base = (voxels.z[inner] * rows + voxels.y[inner]) * columns + voxels.x[inner]
    total = np.zeros(voxels.z.size, dtype=np.float64)
    inner_total = np.zeros(base.size, dtype=np.float64)
    for dy, dx in _OFFSETS:
        inner_total += flat[base + (dy * columns + dx)]
    total[inner] = inner_total
    edge = ~inner
    if edge.any():
        z, y, x = voxels.z[edge], voxels.y[edge], voxels.x[edge]
        total[edge] = sum(
            hu[z, np.clip(y + dy, 0, rows - 1), np.clip(x + dx, 0, columns - 1)].astype(np.float64)
            for dy, dx in _OFFSETS
        )
    return total / len(_OFFSETS)


def drop_aerated(
    label_map: np.ndarray,
    voxels: LesionVoxels,
    hu: np.ndarray,
    limit_hu: float = AERATED_MAX_HU,
) -> LesionVoxels:
    """Set the lesion voxels of `label_map` [Z, Y, X] (in place) whose neighbourhood mean is
    at most `limit_hu` (aerated lung) to background; returns the voxels that remain (`voxels`
    are the map's lesion voxels, `hu` the scan on the same grid)."""
    if hu.shape != label_map.shape:
        raise ValueError(f"HU volume {hu.shape} and label map {label_map.shape} differ in shape")
    if voxels.z.size == 0:
        return voxels
    aerated = neighbourhood_mean_hu(hu, voxels) <= limit_hu
    if not aerated.any():
        return voxels
    label_map[voxels.z[aerated], voxels.y[aerated], voxels.x[aerated]] = 0
    keep = ~aerated
    return LesionVoxels(voxels.z[keep], voxels.y[keep], voxels.x[keep], voxels.values[keep])
