"""The peripheral rule (gateway/lesions.py: a lesion voxel within `PERIPHERAL_MM` of the pleura,
3D, true spacing) without a distance transform: the same voxels, in a fraction of the time.

A lesion voxel is peripheral when some voxel outside the lung (lesion voxels count as lung;
outside the image is not surface) lies at an offset (dz, dy, dx) that the rule puts within
reach: `sqrt(((dz*sz)**2 + (dy*sy)**2) + (dx*sx)**2) <= PERIPHERAL_MM`, in float64, the rule's
own arithmetic. Which offsets are within reach is a small table (`_ball`), and an offset only
gets further as any of its |components| grows, so the test splits into one pass per axis:

1. along the first axis, each voxel's nearest outside voxel (0 to the reach, or none);
2. along the second, the smallest sum of the first two squared terms over the line;
3. along the third, whether any voxel of the line adds a third term that stays within reach.

Rounding is monotone, so the smallest of a set of sums is the sum of the smallest partial sum:
passes 2 and 3 decide every voxel as the rule's float64 sum does, in float32 where a check of
the whole table shows float32 puts every offset on the same side, in float64 otherwise. The
lesions are cut into pieces of nearby lesion columns, each done in its own box grown by the
reach, its axes in the order that costs least there. On the 400-slice covid19 phantom (191,879
lesion voxels) `lesions.peripheral_mask` (scipy's feature transform of the grown boxes) took
0.7-2.2 s and raised a fresh process's peak RSS by 130 MiB; `count_peripheral` 0.04-0.05 s and
11 MiB (tests/test_pleura.py compares every voxel with `lesions.peripheral_mask`).

One difference: where a lesion's grown box holds no voxel outside the lung at all, scipy's
transform reports one at index -1 of the box, so the rule calls lesion voxels within 15 mm
of the image's first corner peripheral; here, as the module doc of lesions.py says, they are
central.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import numpy as np
from scipy import ndimage

from ctjoint.gateway.lesions import PERIPHERAL_MM

Box = tuple[slice, slice, slice]
Spacing = tuple[float, float, float]

# Measured nanoseconds per element (512x512x400 covid19 phantom, one core): building a box's
# outside mask, one step of pass 1 (three boolean ops), the table look-up after it, one step
# of pass 2 (add and min, float32) and of pass 3 (compare and or); and per piece, the calls.
_NS_BUILD: Final = 1.5
_NS_FIRST_STEP: Final = 0.12
_NS_LOOKUP: Final = 1.0
_NS_SECOND_STEP: Final = 0.28
_NS_THIRD_STEP: Final = 0.2
_NS_PIECE: Final = 330_000.0
# A float64 step costs about twice a float32 one.
_WIDE: Final = 2.0
# Most elements of pass 1's output in one piece (a piece larger than that is cut into runs of
# slices): with every lung voxel of the 400-slice phantom a lesion, the passes' arrays peak at
# 57 MB (81 MB with 4 M) and take 1.7 s either way.
_MOST_FIRST: Final = 2_000_000


@dataclass(frozen=True, eq=False)
class _Ball:
    """The offsets within reach for one spacing, as the rule computes distances."""

    # Largest |offset| within reach along each axis alone (z, y, x).
    reach: tuple[int, int, int]
    # within[i, j, k]: the offset (+-i, +-j, +-k) is within reach; shape reach + 1.
    within: np.ndarray
    # Squared terms (offset * spacing) ** 2 of each axis, float64, offsets 0..reach.
    terms: tuple[np.ndarray, np.ndarray, np.ndarray]


@lru_cache(maxsize=16)
def _ball(spacing_mm: Spacing) -> _Ball:
    """The table, from the rule's own arithmetic (lesions._near_pleura) on each offset."""
    sampling = np.asarray(spacing_mm, dtype=np.float64)
    if sampling.shape != (3,) or not np.all(np.isfinite(sampling)) or np.any(sampling <= 0):
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing_mm}")
    # One past the last offset that can be within reach alone.
    sizes = [int(PERIPHERAL_MM // s) + 2 for s in sampling]
    full = []
    for size, s in zip(sizes, sampling, strict=True):
        mm = np.arange(size, dtype=np.float64) * s
        full.append(mm * mm)
    total = (full[0][:, None, None] + full[1][None, :, None]) + full[2][None, None, :]
    within = np.sqrt(total) <= PERIPHERAL_MM
    reach = (
        int(np.flatnonzero(within[:, 0, 0])[-1]),
        int(np.flatnonzero(within[0, :, 0])[-1]),
        int(np.flatnonzero(within[0, 0, :])[-1]),
    )
    z, y, x = (t[: r + 1] for t, r in zip(full, reach, strict=True))
    return _Ball(reach, within[: reach[0] + 1, : reach[1] + 1, : reach[2] + 1], (z, y, x))


@dataclass(frozen=True, eq=False)
class _Plan:
    """The passes' arithmetic for one order of the axes (first, second, third)."""

    order: tuple[int, int, int]
    reach: tuple[int, int, int]
    # Squared terms of the first and second axes, in the dtype that decides like the rule.
    first: np.ndarray
    second: np.ndarray
    # below[k]: the largest partial sum (first + second) that stays within reach once the
    # third axis's term at offset k is added (pass 3 compares instead of adding).
    below: np.ndarray
    wide: bool


def _largest_below(terms: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """For each term c (0 <= c <= limit), the largest x >= 0 of its dtype with x + c <= limit
    as that dtype rounds the sum. Rounding is monotone, and so is the bit pattern of a float
    >= 0: a binary search over the bit patterns from 0 to `limit`."""
    bits = np.dtype(np.int32) if terms.dtype == np.float32 else np.dtype(np.int64)
    low = np.zeros(terms.shape, dtype=bits)
    high = np.full(terms.shape, limit.astype(terms.dtype).view(bits), dtype=bits)
    while np.any(low < high):
        middle = low + (high - low + 1) // 2
        fits = middle.view(terms.dtype) + terms <= limit
        low = np.where(fits, middle, low)
        high = np.where(fits, high, middle - 1)
    return low.view(terms.dtype)


@lru_cache(maxsize=96)
def _plan(spacing_mm: Spacing, order: tuple[int, int, int]) -> _Plan | None:
    """Float32 when, summed in this order ((first + second) + third), it puts every offset
    of the table on the rule's side; float64 when that does; None when neither does (an
    order other than the rule's may round differently, and then it is not used)."""
    ball = _ball(spacing_mm)
    within = ball.within.transpose(order)
    for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        a, b, c = (np.asarray(ball.terms[axis], dtype=dtype) for axis in order)
        total = np.add(np.add(a[:, None, None], b[None, :, None]), c[None, None, :])
        inside, outside = total[within], total[~within]
        limit = inside.max(keepdims=True)
        if outside.size and not limit[0] < outside.min():
            continue
        below = _largest_below(c, limit)
        reach = (ball.reach[order[0]], ball.reach[order[1]], ball.reach[order[2]])
        return _Plan(order, reach, a, b, below, dtype == np.float64)
    return None


def _plans(spacing_mm: Spacing) -> list[_Plan]:
    """Every order of the axes whose passes decide like the rule (the rule's own is one)."""
    plans = [_plan(spacing_mm, order) for order in itertools.permutations(range(3))]
    return [plan for plan in plans if plan is not None]


def _sizes(lengths: tuple[int, ...], plan: _Plan) -> tuple[int, int, int, int]:
    """Elements of a piece's grown box and of the outputs of passes 1, 2 and 3."""
    la, lb, lc = (lengths[axis] for axis in plan.order)
    ra, rb, rc = plan.reach
    grown = (la + 2 * ra) * (lb + 2 * rb) * (lc + 2 * rc)
    return grown, la * (lb + 2 * rb) * (lc + 2 * rc), la * lb * (lc + 2 * rc), la * lb * lc


def _cost(lengths: tuple[int, ...], plan: _Plan) -> float:
    """Estimated nanoseconds of one piece with this plan (the constants above)."""
    grown, first, second, third = _sizes(lengths, plan)
    ra, rb, rc = plan.reach
    wide = _WIDE if plan.wide else 1.0
    return (
        _NS_PIECE
        + grown * _NS_BUILD
        + first * (ra * _NS_FIRST_STEP + _NS_LOOKUP)
        + second * 2 * rb * _NS_SECOND_STEP * wide
        + third * 2 * rc * _NS_THIRD_STEP * wide
    )


def _best(lengths: tuple[int, ...], plans: list[_Plan]) -> tuple[_Plan, float]:
    """The cheapest plan for a piece and its cost."""
    costs = [(_cost(lengths, plan), index) for index, plan in enumerate(plans)]
    cost, index = min(costs)
    return plans[index], cost


@dataclass(frozen=True, eq=False)
class _Piece:
    """Lesion voxels done together: those of `box` in the columns `mine` ([Y, X] of the box)."""

    box: Box
    mine: np.ndarray

    @property
    def lengths(self) -> tuple[int, int, int]:
        return (
            self.box[0].stop - self.box[0].start,
            self.box[1].stop - self.box[1].start,
            self.box[2].stop - self.box[2].start,
        )


def _split(label_map: np.ndarray, piece: _Piece | None) -> list[_Piece]:
    """A piece's lesion voxels (all of them for None) cut at the slices that hold none of
    them, then each run of slices into groups of columns 8-connected in its projection along
    z, each group in its tight box. The whole volume is only reduced, never copied."""
    if piece is None:
        box: Box = (slice(0, label_map.shape[0]), slice(0, None), slice(0, None))
        present = np.flatnonzero(label_map.max(axis=(1, 2)))
        lesion: np.ndarray = label_map
    else:
        box = piece.box
        lesion = label_map[box] != 0
        lesion &= piece.mine
        present = np.flatnonzero(lesion.any(axis=(1, 2)))
    out: list[_Piece] = []
    if present.size == 0:
        return out
    cuts = np.flatnonzero(np.diff(present) > 1) + 1
    for run in np.split(present, cuts):
        first, last = int(run[0]), int(run[-1]) + 1
        projection = lesion[first:last].max(axis=0) != 0
        # Labelled in the projection's own box (a 512x512 image costs about 2 ms a run).
        r0, c0 = (int(np.argmax(projection.any(axis=axis))) for axis in (1, 0))
        r1 = projection.shape[0] - int(np.argmax(projection.any(axis=1)[::-1]))
        c1 = projection.shape[1] - int(np.argmax(projection.any(axis=0)[::-1]))
        groups, _ = ndimage.label(projection[r0:r1, c0:c1], structure=np.ones((3, 3), bool))
        for label, found in enumerate(ndimage.find_objects(groups), start=1):
            if found is None:
                continue
            mine = groups[found] == label
            rows = slice(r0 + found[0].start, r0 + found[0].stop)
            columns = slice(c0 + found[1].start, c0 + found[1].stop)
            inside = np.logical_and(lesion[first:last, rows, columns], mine)
            held = np.flatnonzero(inside.any(axis=(1, 2)))
            start = box[0].start + first
            out.append(
                _Piece(
                    (
                        slice(start + int(held[0]), start + int(held[-1]) + 1),
                        slice(box[1].start + rows.start, box[1].start + rows.stop),
                        slice(box[2].start + columns.start, box[2].start + columns.stop),
                    ),
                    mine,
                )
            )
    return out


def _pieces(label_map: np.ndarray, plans: list[_Plan]) -> list[_Piece]:
    """The lesion voxels as pieces, each split further while that costs less in all."""
    done: list[_Piece] = []
    todo = _split(label_map, None)
    while todo:
        piece = todo.pop()
        alone = _best(piece.lengths, plans)[1]
        if alone < 2 * _NS_PIECE:  # two pieces would cost more
            done.append(piece)
            continue
        parts = _split(label_map, piece)
        if len(parts) == 1 and parts[0].box == piece.box:
            done.append(piece)
            continue
        if sum(_best(part.lengths, plans)[1] for part in parts) < alone:
            todo.extend(parts)
        else:
            done.append(piece)
    return done


def _runs(piece: _Piece, plan: _Plan) -> Iterator[_Piece]:
    """The piece as runs of slices small enough for pass 1's output (`_MOST_FIRST`)."""
    first = _sizes(piece.lengths, plan)[1]
    depth = piece.lengths[0]
    per_slice = max(first // depth, 1)
    step = max(_MOST_FIRST // per_slice, 1)
    if step >= depth:
        yield piece
        return
    start = piece.box[0].start
    for z in range(start, piece.box[0].stop, step):
        stop = min(z + step, piece.box[0].stop)
        yield _Piece((slice(z, stop), piece.box[1], piece.box[2]), piece.mine)


def _near_outside(
    lungs: np.ndarray, label_map: np.ndarray, box: Box, plan: _Plan, reach: tuple[int, ...]
) -> np.ndarray:
    """Boolean over `box` (z, y, x): within reach of a voxel outside the lung (module doc)."""
    grown = tuple(
        slice(max(s.start - r, 0), min(s.stop + r, n))
        for s, r, n in zip(box, reach, label_map.shape, strict=True)
    )
    lengths = tuple(s.stop - s.start for s in box)
    # The grown box padded to the full reach: beyond the image is not surface (False).
    inner = tuple(
        slice(g.start - s.start + r, g.stop - s.start + r)
        for g, s, r in zip(grown, box, reach, strict=True)
    )
    order = plan.order
    la, lb, lc = (lengths[axis] for axis in order)
    ra, rb, rc = plan.reach
    outside = np.zeros((la + 2 * ra, lb + 2 * rb, lc + 2 * rc), dtype=bool)
    lung = np.logical_or(lungs[grown], label_map[grown])
    np.logical_not(lung.transpose(order), out=outside[tuple(inner[axis] for axis in order)])
    del lung
    # Pass 1: for how many of the distances 0..ra along the first axis an outside voxel lies
    # within that distance; the nearest one's squared term is looked up from the count.
    near = outside[ra : ra + la].copy()
    count = near.astype(np.int8)
    for d in range(1, ra + 1):
        near |= outside[ra + d : ra + d + la]
        near |= outside[ra - d : ra - d + la]
        np.add(count, near, out=count)
    del near, outside
    nearest = np.concatenate([np.array([np.inf], dtype=plan.first.dtype), plan.first[::-1]])
    first = np.take(nearest, count)
    del count
    # Pass 2: the smallest first + second term along the second axis.
    partial = first[:, rb : rb + lb].copy()
    term = np.empty_like(partial)
    for d in range(1, rb + 1):
        for start in (rb + d, rb - d):
            np.add(first[:, start : start + lb], plan.second[d], out=term)
            np.minimum(partial, term, out=partial)
    del first, term
    # Pass 3: a third term along the third axis that keeps the sum within reach.
    hit = partial[:, :, rc : rc + lc] <= plan.below[0]
    within = np.empty(hit.shape, dtype=bool)
    for d in range(1, rc + 1):
        for start in (rc + d, rc - d):
            np.less_equal(partial[:, :, start : start + lc], plan.below[d], out=within)
            hit |= within
    return hit.transpose(np.argsort(order))


def _peripheral_pieces(
    lungs: np.ndarray, label_map: np.ndarray, spacing_mm: Spacing
) -> Iterator[tuple[Box, np.ndarray]]:
    """Each piece's box and its peripheral lesion voxels there (boolean over the box)."""
    if lungs.shape != label_map.shape or label_map.ndim != 3:
        raise ValueError(
            f"lungs {lungs.shape} and label map {label_map.shape} must be one 3D shape"
        )
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    ball = _ball(spacing)
    plans = _plans(spacing)
    for piece in _pieces(label_map, plans):
        plan = _best(piece.lengths, plans)[0]
        for run in _runs(piece, plan):
            near = _near_outside(lungs, label_map, run.box, plan, ball.reach)
            near &= label_map[run.box] != 0
            near &= run.mine
            yield run.box, near


def count_peripheral(lungs: np.ndarray, label_map: np.ndarray, spacing_mm: Spacing) -> int:
    """How many lesion voxels (`label_map` > 0) are peripheral: equal to
    `np.count_nonzero(lesions.peripheral_mask(lungs, label_map, spacing_mm))`. `lungs` is a
    lung map or mask ([Z, Y, X], nonzero is lung); lesion voxels count as lung."""
    return sum(
        int(np.count_nonzero(near)) for _, near in _peripheral_pieces(lungs, label_map, spacing_mm)
    )


__all__ = ["count_peripheral"]
