"""The fast peripheral rule (gateway/pleura.py) against the rule itself (lesions.peripheral_mask,
scipy's distance transform): the same voxels on phantoms, awkward volumes and spacings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from ctjoint.export.phantom import generate_phantom
from ctjoint.gateway import pleura
from ctjoint.gateway.lesions import PERIPHERAL_MM, peripheral_mask, segment_lungs
from ctjoint.gateway.series import CtVolume

# In-plane 0.5-0.98 mm with rows and columns apart, slices 0.6-5 mm; 0.7421875 is a 380 mm
# field of view on 512 pixels (exact in binary, so distances of exactly 15 mm occur).
SPACINGS = [
    (0.6, 0.5, 0.98),
    (0.8000000000000114, 0.789755, 0.789755),
    (1.25, 0.7421875, 0.7421875),
    (2.5, 0.98, 0.5),
    (5.0, 0.7, 0.66),
    (1.0, 1.0, 1.0),
]


def _mask(lungs: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The voxels count_peripheral counts, as a mask, to compare voxel by voxel."""
    out = np.zeros(labels.shape, dtype=bool)
    for box, near in pleura._peripheral_pieces(lungs, labels, spacing):
        out[box] |= near
    return out


def _assert_same(lungs: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float]) -> int:
    """Mask and count equal the rule's; returns the count."""
    expected = peripheral_mask(lungs, labels, spacing)
    mask = _mask(lungs, labels, spacing)
    np.testing.assert_array_equal(mask, expected)
    count = pleura.count_peripheral(lungs, labels, spacing)
    assert count == int(np.count_nonzero(expected))
    return count


def _blobs(seed: int, shape: tuple[int, int, int], sigma: float, keep: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return noise > np.quantile(noise, 1.0 - keep)


@pytest.mark.parametrize(
    ("kind", "seed"), [("covid19", 3), ("covid19", 23), ("cap", 3), ("cap", 11)]
)
def test_phantoms_give_the_rules_voxels(kind: str, seed: int) -> None:
    phantom = generate_phantom(kind=kind, seed=seed, slices=32, size=96)
    g = phantom.geometry
    spacing = (g.slice_mm, g.pixel_mm, g.pixel_mm)
    volume = CtVolume.from_array(phantom.hu, spacing)
    air = segment_lungs(volume)  # the air lungs the analysis passes (0, 1, 2)
    assert _assert_same(air, phantom.lesions, spacing) > 0
    assert _assert_same(phantom.lungs > 0, phantom.lesions, spacing) > 0


@pytest.mark.parametrize("spacing", SPACINGS)
def test_phantom_with_each_spacing(spacing: tuple[float, float, float]) -> None:
    phantom = generate_phantom(kind="cap", seed=5, slices=32, size=96)
    # At 96 pixels the phantom's lungs are a few centimetres wide at these spacings.
    assert _assert_same(phantom.lungs, phantom.lesions, spacing) > 0


@pytest.mark.parametrize(("seed", "spacing"), list(zip(range(6), SPACINGS, strict=True)))
def test_random_blobs_in_random_lungs(seed: int, spacing: tuple[float, float, float]) -> None:
    # A 60 mm cube at this spacing: a ball of lung 52 mm across with pockets of air in it,
    # islands of lung around it, lesion blobs everywhere (outside the lung and over the
    # image's edges too).
    rng = np.random.default_rng(seed)
    shape = (int(60 / spacing[0]), int(60 / spacing[1]), int(60 / spacing[2]))
    mm = np.ogrid[: shape[0], : shape[1], : shape[2]]
    lungs = sum(((axis * s - 30.0) / 26.0) ** 2 for axis, s in zip(mm, spacing, strict=True)) <= 1
    lungs |= _blobs(seed, shape, 2.0, 0.1)
    for z, y, x in zip(*(rng.integers(n // 4, 3 * n // 4, 3) for n in shape), strict=True):
        lungs[z : z + 2, y : y + 3, x : x + 3] = False
    labels = np.zeros(shape, dtype=np.uint8)
    lesion = _blobs(100 + seed, shape, 2.0, 0.12)
    labels[lesion] = rng.integers(1, 3, size=int(lesion.sum()))
    count = _assert_same(lungs, labels, spacing)
    assert 0 < count < np.count_nonzero(labels)  # central and peripheral both occur


def test_lesions_on_the_first_and_last_slice_and_the_image_edges() -> None:
    yy, xx = np.ogrid[:60, :60]
    lungs = ((yy - 30) / 26.0) ** 2 + ((xx - 30) / 26.0) ** 2 <= 1.0  # a cylinder: no cap
    lungs = np.broadcast_to(lungs, (24, 60, 60)).copy()
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    labels[0:3, 20:40, 20:40] = 1  # first slice, the middle: only the side walls are surface
    labels[-2:, 25:35, 25:35] = 2  # last slice
    labels[10:14, 0:4, 28:32] = 1  # rows 0.. and columns 56..: at the image's edge,
    labels[5:9, 28:32, 56:60] = 2  # partly outside the lung
    labels[0, 0, 0] = labels[-1, -1, -1] = 1  # the corners, outside the lung
    for spacing in SPACINGS:
        _assert_same(lungs, labels, spacing)


def test_lesions_wholly_outside_the_lungs() -> None:
    lungs = np.zeros((20, 50, 50), dtype=np.uint8)
    lungs[:, 10:40, 10:25] = 1
    lungs[:, 10:40, 27:40] = 2
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    labels[3:8, 42:48, 5:45] = 1  # below both lungs
    labels[10:12, 20:30, 25:27] = 2  # the gap between them: lung now, a bridge of lesion
    count = _assert_same(lungs, labels, (2.5, 0.7, 0.7))
    assert count == np.count_nonzero(labels)  # every one of them is near the outside


def test_no_lesions_gives_nothing() -> None:
    lungs = _blobs(1, (12, 30, 30), 2.0, 0.6)
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    assert pleura.count_peripheral(lungs, labels, (1.0, 0.7, 0.7)) == 0
    assert not _mask(lungs, labels, (1.0, 0.7, 0.7)).any()


@pytest.mark.parametrize("spacing", SPACINGS)
def test_distances_straddling_the_threshold(spacing: tuple[float, float, float]) -> None:
    # Lung everywhere but one voxel, every other voxel a lesion: the peripheral voxels are
    # exactly the offsets from that voxel whose distance, summed as the rule sums it, is at
    # most 15 mm (with 1 mm or 0.7421875 mm pixels some are exactly 15 mm away).
    sz, sy, sx = spacing
    reach = [int(PERIPHERAL_MM // s) + 2 for s in spacing]
    shape = (2 * reach[0] + 1, 2 * reach[1] + 1, 2 * reach[2] + 1)
    lungs = np.ones(shape, dtype=bool)
    centre = (reach[0], reach[1], reach[2])
    lungs[centre] = False
    labels = lungs.astype(np.uint8)
    dz, dy, dx = np.meshgrid(
        *(np.arange(n, dtype=np.float64) - c for n, c in zip(shape, centre, strict=True)),
        indexing="ij",
    )
    distance = np.sqrt(((dz * sz) ** 2 + (dy * sy) ** 2) + (dx * sx) ** 2)
    expected = (distance <= PERIPHERAL_MM) & (labels > 0)
    assert np.any(np.abs(distance - PERIPHERAL_MM) < 0.05)  # voxels on both sides, close by
    np.testing.assert_array_equal(_mask(lungs, labels, spacing), expected)
    assert _assert_same(lungs, labels, spacing) == int(np.count_nonzero(expected))


def test_exactly_fifteen_millimetres_is_peripheral() -> None:
    lungs = np.ones((40, 40, 40), dtype=bool)
    lungs[20, 20, 20] = False
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    labels[20, 20 + 12, 20 + 9] = 1  # 15 mm at 1 mm spacing: sqrt(144 + 81)
    labels[20 + 15, 20, 20 + 1] = 1  # sqrt(226)
    mask = _mask(lungs, labels, (1.0, 1.0, 1.0))
    assert mask[20, 32, 29] and not mask[35, 20, 21]
    _assert_same(lungs, labels, (1.0, 1.0, 1.0))


def test_every_order_of_the_passes_gives_the_rules_voxels() -> None:
    # The cheapest order depends on each piece's shape: every order that is used must agree.
    lungs = _blobs(7, (30, 44, 40), 2.5, 0.75)
    labels = _blobs(8, lungs.shape, 2.0, 0.15).astype(np.uint8)
    for spacing in SPACINGS:
        expected = peripheral_mask(lungs, labels, spacing)
        box = (slice(0, 30), slice(0, 44), slice(0, 40))
        ball = pleura._ball(spacing)
        plans = pleura._plans(spacing)
        assert any(plan.order == (0, 1, 2) for plan in plans)
        for plan in plans:
            near = pleura._near_outside(lungs, labels, box, plan, ball.reach)
            np.testing.assert_array_equal(near & (labels > 0), expected, err_msg=str(plan.order))


def test_large_pieces_done_in_runs_of_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pleura, "_MOST_FIRST", 5_000)
    phantom = generate_phantom(kind="covid19", seed=23, slices=32, size=96)
    _assert_same(phantom.lungs, phantom.lesions, (1.25, 0.7421875, 0.7421875))


def test_many_scattered_lesion_specks() -> None:
    lungs = _blobs(3, (30, 64, 64), 3.0, 0.8)
    rng = np.random.default_rng(3)
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    for z, y, x in zip(*(rng.integers(0, n, 300) for n in lungs.shape), strict=True):
        labels[z, y, x] = 1
    _assert_same(lungs, labels, (2.5, 0.7, 0.7))


def test_a_lung_without_any_surface_has_no_peripheral_lesion() -> None:
    # Lung in every voxel of the image: nothing is pleura (the image's edge is not), so
    # nothing is peripheral. Not compared with lesions.peripheral_mask: scipy's transform of
    # an array without a zero reports a feature at index -1, and the rule's crop at the
    # image's first corner then calls the lesion voxels near that corner peripheral.
    lungs = np.ones((30, 30, 30), dtype=bool)
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[14:16, 14:16, 14:16] = 2
    assert pleura.count_peripheral(lungs, labels, (1.0, 1.0, 1.0)) == 0


def test_plans_decide_every_offset_like_the_rule() -> None:
    for spacing in SPACINGS:
        ball = pleura._ball(spacing)
        for order in itertools.permutations(range(3)):
            plan = pleura._plan(spacing, order)
            if plan is None:
                continue
            within = ball.within.transpose(order)
            c = ball.terms[order[2]].astype(plan.first.dtype)
            partial = plan.first[:, None, None] + plan.second[None, :, None]
            decided = partial <= plan.below[None, None, :]
            np.testing.assert_array_equal(decided, within)
            # below[k] is the largest partial sum that stays within once c[k] is added.
            limit = plan.below[0]
            for k, term in enumerate(c):
                assert plan.below[k] + term <= limit
                assert np.nextafter(plan.below[k], np.inf) + term > limit


def test_mismatched_shapes_and_bad_spacing_are_refused() -> None:
    lungs = np.zeros((4, 5, 6), dtype=bool)
    with pytest.raises(ValueError, match="must be one 3D shape"):
        pleura.count_peripheral(lungs, np.zeros((4, 5, 7), dtype=np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="three positive millimetre"):
        pleura.count_peripheral(lungs, np.zeros((4, 5, 6), dtype=np.uint8), (1.0, 0.0, 1.0))
