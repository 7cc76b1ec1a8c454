"""The lung and lesion quantifier: lungs, lesion statistics and quantification of one scan.

One implementation for the gateway, `ctjoint analyze` and the tests (`quantify`). The lungs'
air segmentation needs only HU, so an analysis starts it (`air_lungs`) while the model runs,
from the per-slice work its intake did as files arrived (gateway/lesions.py `LungSlices`);
`quantify_lungs` then adds the model's lesions. The method and its rules: gateway/lesions.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import numpy as np

from ctjoint.contracts import LESION_CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.gateway.lesions import (
    LungSlices,
    after_leaving_lung,
    bounding_box,
    lung_statistics,
    peripheral_mask,
    peripheral_voxels,
    quantification_of,
    split_sides,
)
from ctjoint.gateway.limits import cpu_bound
from ctjoint.gateway.result import LesionStatistics, LungStatistics, Quantification
from ctjoint.gateway.series import CtVolume
from ctjoint.gateway.tasks import task_group


@dataclass(frozen=True, eq=False)
class AirLungs:
    """The lungs by air alone (`segment_lungs(volume)`), each slice's body midline, and the
    milliseconds they took."""

    lungs: np.ndarray
    midlines: np.ndarray
    ms: float


@dataclass(frozen=True, eq=False)
class LungQuantities:
    """The lung map with lesions (0 outside, 1 right, 2 left), the scan's quantification,
    and the milliseconds of work after the air step."""

    lung_map: np.ndarray
    quantification: Quantification
    ms: float


def air_lungs(
    volume: CtVolume, lung_slices: LungSlices | None = None, order: Sequence[int] | None = None
) -> AirLungs:
    """`segment_lungs(volume)` and the midlines; from what an intake did per slice
    (`lung_slices`, by slot in `order`) when there is that."""
    started = time.perf_counter()
    if lung_slices is None or order is None:
        lung_slices, order = LungSlices.of(volume.hu), range(volume.shape[0])
    # Nothing else needs the per-slice air codes (a slice's worth of bytes per slice): freed
    # once read, before the 3D labelling.
    air = lung_slices.lungs(order, volume.orientation, release=True)
    return AirLungs(air, lung_slices.midlines(order), (time.perf_counter() - started) * 1000.0)


async def quantify_lungs(
    air: Awaitable[AirLungs],
    label_map: np.ndarray,
    volume: CtVolume,
    *,
    lung_slices: LungSlices | None = None,
    order: Sequence[int] | None = None,
) -> tuple[AirLungs, LungQuantities]:
    """The lungs with the model's lesions and their statistics, once `air` is done.

    With the intake's `lung_slices`, the peripheral rule's distance transform starts on every
    enclosed air pocket while the air step decides which are lungs; the pockets that step
    drops are taken out after (`peripheral_checked`).
    """
    async with task_group() as tasks:
        guess = None
        if lung_slices is not None and order is not None:
            guess = tasks.create_task(
                cpu_bound(peripheral_guess, lung_slices, order, label_map, volume)
            )
        done = await air
        started = time.perf_counter()
        sides = tasks.create_task(
            cpu_bound(lungs_and_sides, done.lungs, done.midlines, label_map, volume)
        )
        if guess is not None:
            peripheral = await cpu_bound(
                peripheral_checked, done.lungs, await guess, label_map, volume
            )
            del guess  # its volume-sized masks are done with
        else:
            peripheral = await cpu_bound(
                peripheral_voxels, done.lungs, label_map, volume.spacing_mm
            )
        lung_map, statistics = await sides
    quantification = quantification_of(
        statistics, lesion_voxels=int(np.count_nonzero(label_map)), peripheral=peripheral
    )
    ms = (time.perf_counter() - started) * 1000.0
    return done, LungQuantities(lung_map, quantification, ms)


def quantify(label_map: np.ndarray, volume: CtVolume) -> Quantification:
    """All lung and lesion statistics of one scan (label map on the source grid of `volume`),
    blocking: the analysis's own steps on a whole volume."""
    if label_map.shape != volume.shape:
        raise ValueError(f"label map {label_map.shape} does not match the volume {volume.shape}")

    async def run() -> LungQuantities:
        slices = LungSlices.of(volume.hu)
        order = range(volume.shape[0])
        air = cpu_bound(air_lungs, volume, slices, order)
        _, quantities = await quantify_lungs(
            air, label_map, volume, lung_slices=slices, order=order
        )
        return quantities

    return asyncio.run(run()).quantification


def lungs_with_lesions(
    air: np.ndarray, label_map: np.ndarray, midlines: np.ndarray, volume: CtVolume
) -> np.ndarray:
    """`segment_lungs(volume, label_map)` from `air = segment_lungs(volume)`, exactly.

    Sides are decided voxel by voxel from each slice's body midline, which depends on HU only,
    so the lungs with lesions are the air lungs plus the lesion voxels outside them, split by
    the same rule (lesions.py's own `split_sides`, so the two cannot drift apart).
    """
    with_lesions = np.flatnonzero(label_map.any(axis=(1, 2)))
    if with_lesions.size == 0:
        return air
    # Only the slices that hold lesions can change.
    z = slice(int(with_lesions[0]), int(with_lesions[-1]) + 1)
    extra = (label_map[z] > 0) & (air[z] == 0)
    if not extra.any():
        return air
    # Calloc'd, the lungs' box copied: the pages outside it are never touched (a copy of
    # `air` wrote all of them: 105 MB of fresh pages at 512x512x400).
    lungs = np.zeros(air.shape, dtype=air.dtype)
    box = bounding_box(air)
    if box is not None:
        lungs[box] = air[box]
    np.copyto(lungs[z], split_sides(extra, midlines[z], volume.orientation), where=extra)
    return lungs


Guess = tuple[np.ndarray, tuple[slice, slice, slice], np.ndarray]


def peripheral_guess(
    lung_slices: LungSlices, order: Sequence[int], label_map: np.ndarray, volume: CtVolume
) -> Guess:
    """The peripheral-rule mask if every enclosed air pocket were lung (`all_enclosed_air`,
    which holds the air lungs), with that lung mask and its box, for `peripheral_checked`."""
    guessed_lungs, box = lung_slices.all_enclosed_air(order)
    return guessed_lungs, box, peripheral_mask(guessed_lungs, label_map, volume.spacing_mm)


def peripheral_checked(
    air: np.ndarray, guess: Guess, label_map: np.ndarray, volume: CtVolume
) -> int:
    """Peripheral lesion voxels of the real air lungs, from the guess: the pockets the 3D step
    dropped leave the lung (`after_leaving_lung`); if there are many, the rule runs again."""
    guessed_lungs, box, mask = guess
    left = np.argwhere(guessed_lungs[box] & (air[box] == 0))
    left += [part.start for part in box]
    if not after_leaving_lung(mask, label_map, left, volume.spacing_mm):
        mask = peripheral_mask(air, label_map, volume.spacing_mm)
    return int(np.count_nonzero(mask))


def lungs_and_sides(
    air_lungs: np.ndarray, midlines: np.ndarray, label_map: np.ndarray, volume: CtVolume
) -> tuple[np.ndarray, tuple[LungStatistics, ...]]:
    """The lung map (`segment_lungs(volume, label_map)`, from the air lungs computed before)
    and each lung's statistics (gateway/lesions.py)."""
    lung_map = lungs_with_lesions(air_lungs, label_map, midlines, volume)
    return lung_map, lung_statistics(label_map, lung_map, volume)


def lesion_statistics(label_map: np.ndarray, volume: CtVolume) -> LesionStatistics:
    """Voxel counts per lesion class, per slice and in total, and the voxel volume in mL."""
    slice_pixels: dict[str, tuple[int, ...]] = {}
    voxels: dict[str, int] = {}
    # Counted only in the slices that hold lesions (a chest CT: a third of them or fewer).
    z = label_map.shape[0]
    with_lesions = np.flatnonzero(label_map.reshape(z, -1).any(axis=1))
    counts = {v: np.zeros(z, dtype=np.int64) for v, n in enumerate(SEG_CLASS_NAMES)}
    # 16 lesion slices at a time: their copy and masks stay a few MB (at 512x512x400 they
    # were about 60 MB at once).
    for start in range(0, with_lesions.size, 16):
        rows = with_lesions[start : start + 16]
        part = label_map[rows]
        for value, name in enumerate(SEG_CLASS_NAMES):
            if name in LESION_CLASS_NAMES:
                counts[value][rows] = np.count_nonzero(part == value, axis=(1, 2))
    for value, name in enumerate(SEG_CLASS_NAMES):
        if name not in LESION_CLASS_NAMES:
            continue
        per_slice = counts[value]
        slice_pixels[name] = tuple(int(v) for v in per_slice)
        voxels[name] = int(per_slice.sum())
    return LesionStatistics(
        voxel_volume_ml=volume.voxel_volume_ml, voxels=voxels, slice_pixels=slice_pixels
    )


__all__ = [
    "AirLungs",
    "LungQuantities",
    "air_lungs",
    "lesion_statistics",
    "lungs_and_sides",
    "lungs_with_lesions",
    "peripheral_checked",
    "peripheral_guess",
    "quantify",
    "quantify_lungs",
]
