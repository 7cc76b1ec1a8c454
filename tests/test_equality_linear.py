"""The issue-22 speed and memory changes give what the plain definitions give (linear cost
with the slice count must not change a label, a mask or a statistic)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from dicom_factory import chest_volume
from scipy import ndimage
from test_review import _plain_location_fractions

from ctjoint.contracts import LESION_CLASS_NAMES, LUNG_LEFT, LUNG_RIGHT, SEG_CLASS_NAMES
from ctjoint.export.phantom import generate_phantom
from ctjoint.gateway.analysis import source_label_map
from ctjoint.gateway.lesions import (
    _box,
    _label_compact,
    lung_statistics,
    peripheral_voxels,
    quantification_of,
    segment_lungs,
)
from ctjoint.gateway.preprocess import (
    ResampleGeometry,
    context_stack,
    context_view,
    logits_to_source_labels,
)
from ctjoint.gateway.quantify import (
    AirLungs,
    LesionVoxels,
    LungQuantities,
    air_lungs,
    lesion_statistics,
    lesions_in_lungs,
    quantify_lungs,
)
from ctjoint.gateway.series import CtVolume


@pytest.mark.parametrize(("slices", "context"), [(1, 1), (2, 1), (7, 1), (7, 2), (5, 0)])
def test_the_context_view_equals_the_copied_context_stack(slices: int, context: int) -> None:
    planes = np.random.default_rng(slices).standard_normal((slices, 4, 5)).astype(np.float32)
    padded = np.concatenate([planes[:1]] * context + [planes] + [planes[-1:]] * context)
    view = context_view(padded, context)
    expected = context_stack(planes, context)
    assert view.shape == expected.shape == (slices, 2 * context + 1, 4, 5)
    np.testing.assert_array_equal(view, expected)
    # What streaming takes from it: the stacks it still needs, each a copy.
    rows = [slices - 1, 0]
    np.testing.assert_array_equal(np.ascontiguousarray(view[rows]), expected[rows])
    assert not np.shares_memory(np.ascontiguousarray(view[rows]), padded)


def _plain_box(mask: np.ndarray, grow: int) -> tuple[slice, slice, slice] | None:
    where = np.nonzero(mask)
    if where[0].size == 0:
        return None
    z, y, x = (slice(int(w.min()), int(w.max()) + 1) for w in where)
    rows = slice(max(y.start - grow, 0), min(y.stop + grow, mask.shape[1]))
    columns = slice(max(x.start - grow, 0), min(x.stop + grow, mask.shape[2]))
    return z, rows, columns


@pytest.mark.parametrize("seed", range(6))
def test_the_bounding_box_equals_that_of_the_nonzero_voxels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.zeros((9, 12, 11), dtype=np.uint8)
    for _ in range(seed):  # seed 0: empty
        z, y, x = (int(rng.integers(0, n)) for n in labels.shape)
        labels[z, y, x] = rng.integers(1, 3)
    for grow in (0, 2):
        assert _box(labels, grow) == _plain_box(labels, grow)
        assert _box(labels > 0, grow) == _plain_box(labels, grow)


def test_lung_statistics_count_as_the_plain_masks_do() -> None:
    rng = np.random.default_rng(4)
    shape = (40, 24, 20)  # more slices than one counting chunk
    lungs = rng.integers(0, 3, shape).astype(np.uint8)
    labels = (rng.integers(0, 3, shape) * (rng.random(shape) < 0.3)).astype(np.uint8)
    volume = CtVolume.from_array(np.zeros(shape, dtype=np.float32), (1.0, 0.5, 0.5))
    for side, stats in zip(
        (LUNG_RIGHT, LUNG_LEFT), lung_statistics(labels, lungs, volume), strict=True
    ):
        in_side = lungs == side
        assert stats.volume_ml == pytest.approx(np.count_nonzero(in_side) * volume.voxel_volume_ml)
        for name, ml in stats.lesion_volume_ml.items():
            value = SEG_CLASS_NAMES.index(name)
            expected = np.count_nonzero(in_side & (labels == value)) * volume.voxel_volume_ml
            assert ml == pytest.approx(expected)
        lesion = np.count_nonzero(in_side & (labels > 0))
        assert stats.percent_involved == pytest.approx(100.0 * lesion / np.count_nonzero(in_side))


def test_compact_component_labels_equal_scipys_and_widen_when_uint16_is_too_few() -> None:
    few = np.random.default_rng(0).random((20, 60, 60)) < 0.3
    many = np.zeros((3, 400, 400), dtype=bool)
    many[::2, ::2, ::2] = True  # 80,000 single-voxel components
    for mask, dtype in ((few, np.uint16), (many, np.int32)):
        components, count = _label_compact(mask)
        expected, expected_count = ndimage.label(mask)
        assert components.dtype == dtype
        assert count == expected_count
        np.testing.assert_array_equal(components, expected)


@pytest.mark.parametrize("kind", ["2.5d", "3d"])
def test_the_label_map_made_a_chunk_at_a_time_equals_the_dense_definition(kind: str) -> None:
    rng = np.random.default_rng(7)
    source = (45, 24, 20)  # lesion slices span several chunks
    if kind == "2.5d":
        logits = rng.normal(size=(45, 3, 8, 8)).astype(np.float32)
        logits[::3, 0] += 4.0  # every third slice lesion-free
        model_shape = (45, 8, 8)
    else:
        logits = rng.normal(size=(1, 3, 12, 8, 8)).astype(np.float32)
        logits[0, 0, :3] += 10.0
        model_shape = (12, 8, 8)
    geometry = ResampleGeometry(source, model_shape, kind)  # type: ignore[arg-type]
    np.testing.assert_array_equal(
        source_label_map(logits, geometry), logits_to_source_labels(logits, geometry)
    )


# --- the lesions added to the air lungs, from the lesion voxels alone (issue 22, point 1) ---


def _phantom_case(kind: str, seed: int) -> tuple[CtVolume, np.ndarray]:
    phantom = generate_phantom(kind=kind, seed=seed, slices=24, size=96)
    g = phantom.geometry
    volume = CtVolume.from_array(phantom.hu, (g.slice_mm, g.pixel_mm, g.pixel_mm))
    # Grown in-plane, the truth lesions reach out of the lungs into the chest wall.
    return volume, ndimage.grey_dilation(phantom.lesions, size=(1, 5, 5))


def _lesion_case(case: str) -> tuple[CtVolume, np.ndarray]:
    """A volume and a label map that is awkward for the lesion-voxel path in one way."""
    if case.startswith("phantom-"):
        kind, seed = case.split("-")[1:]
        return _phantom_case(kind, int(seed))
    rng = np.random.default_rng(len(case))
    hu = chest_volume(20, 48)
    labels = ((rng.random(hu.shape) < 0.05) * rng.integers(1, 3, hu.shape)).astype(np.uint8)
    orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if case == "edges":
        labels[:] = 0
        labels[:, 0, :] = 1
        labels[:, :, -1] = 2
        labels[[0, -1], :, 0] = 2
    elif case == "outside-only":
        air = segment_lungs(CtVolume.from_array(hu, (2.5, 0.7, 0.7)))
        labels[air > 0] = 0
    elif case == "none":
        labels[:] = 0
    elif case == "one-lung":
        hu[:, :, 24:] = np.maximum(hu[:, :, 24:], 40.0)  # the left lung filled with tissue
    elif case == "no-lungs":
        hu = np.full(hu.shape, 40.0, dtype=np.float32)
    elif case == "flipped":
        orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # columns towards the patient's right
    elif case == "feet-first":
        orientation = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # slices ascend towards the feet
    return CtVolume.from_array(hu, (2.5, 0.7, 0.7), orientation=orientation), labels


LESION_CASES = [
    "phantom-covid19-3",
    "phantom-cap-11",
    "random",
    "edges",
    "outside-only",
    "none",
    "one-lung",
    "no-lungs",
    "flipped",
    "feet-first",
]


@pytest.mark.parametrize("case", LESION_CASES)
def test_lesions_in_lungs_equal_segment_lungs_and_lung_statistics(case: str) -> None:
    volume, labels = _lesion_case(case)
    air = air_lungs(volume)
    plain_air = segment_lungs(volume)
    np.testing.assert_array_equal(air.lungs, plain_air)
    np.testing.assert_array_equal(
        air.side_voxels,
        [np.count_nonzero(plain_air == side, axis=(1, 2)) for side in (LUNG_RIGHT, LUNG_LEFT)],
    )
    plain_map = segment_lungs(volume, labels)
    lesions = lesions_in_lungs(air, labels, volume)
    assert lesions.statistics == lung_statistics(labels, plain_map, volume)
    np.testing.assert_array_equal(
        lesions.slice_lung_voxels, np.count_nonzero(plain_map, axis=(1, 2))
    )
    assert lesions.location == _plain_location_fractions(labels, plain_air)
    # Into a copy: the air lungs stay as they were; in place: they become the lung map.
    copied = lesions.added_to(air.lungs, copy=True)
    np.testing.assert_array_equal(copied, plain_map)
    np.testing.assert_array_equal(air.lungs, plain_air)
    written = lesions.added_to(air.lungs)
    assert written is air.lungs
    np.testing.assert_array_equal(written, plain_map)


@pytest.mark.parametrize("keep_air", [False, True])
def test_quantify_lungs_gives_the_plain_quantification_and_keeps_the_air_lungs_if_asked(
    keep_air: bool,
) -> None:
    volume, labels = _lesion_case("phantom-covid19-3")
    plain_air = segment_lungs(volume)
    plain_map = segment_lungs(volume, labels)

    async def run() -> tuple[AirLungs, LungQuantities]:
        done = air_lungs(volume)

        async def ready() -> AirLungs:
            return done

        return await quantify_lungs(ready(), labels, volume, keep_air=keep_air)

    air, quantities = asyncio.run(run())
    np.testing.assert_array_equal(quantities.lung_map, plain_map)
    np.testing.assert_array_equal(air.lungs, plain_air if keep_air else plain_map)
    lesion_voxels = int(np.count_nonzero(labels))
    assert quantities.quantification == quantification_of(
        lung_statistics(labels, plain_map, volume),
        lesion_voxels=lesion_voxels,
        peripheral=peripheral_voxels(plain_air, labels, volume.spacing_mm),
    )
    assert quantities.location == _plain_location_fractions(labels, plain_air)
    assert quantities.location[2] == lesion_voxels


@pytest.mark.parametrize("layout", ["contiguous", "strided", "many-rows", "empty"])
def test_lesion_voxels_are_those_np_nonzero_finds_in_its_order(layout: str) -> None:
    rng = np.random.default_rng(3)
    shape = (6, 900, 40) if layout == "many-rows" else (9, 30, 24)  # many: > 4096 rows
    labels = ((rng.random(shape) < 0.1) * rng.integers(1, 3, shape)).astype(np.uint8)
    if layout == "strided":
        labels = np.asfortranarray(labels)[:, ::2, 1:]
    elif layout == "empty":
        labels[:] = 0
    voxels = LesionVoxels.of(labels)
    expected = np.nonzero(labels)
    for found, plain in zip((voxels.z, voxels.y, voxels.x), expected, strict=True):
        np.testing.assert_array_equal(found, plain)
    np.testing.assert_array_equal(voxels.values, labels[expected])


@pytest.mark.parametrize("case", ["phantom-covid19-3", "random", "none"])
def test_lesion_statistics_count_each_class_per_slice_as_the_plain_masks_do(case: str) -> None:
    volume, labels = _lesion_case(case)
    statistics = lesion_statistics(LesionVoxels.of(labels), volume)
    for name in LESION_CLASS_NAMES:
        per_slice = np.count_nonzero(labels == SEG_CLASS_NAMES.index(name), axis=(1, 2))
        assert statistics.slice_pixels[name] == tuple(int(v) for v in per_slice)
        assert statistics.voxels[name] == int(per_slice.sum())
    assert statistics.voxel_volume_ml == volume.voxel_volume_ml
