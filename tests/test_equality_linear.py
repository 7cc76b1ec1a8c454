"""The issue-22 speed and memory changes give what the plain definitions give (linear cost
with the slice count must not change a label, a mask or a statistic)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctjoint.contracts import LUNG_LEFT, LUNG_RIGHT, SEG_CLASS_NAMES
from ctjoint.gateway.analysis import source_label_map
from ctjoint.gateway.lesions import _box, _label_compact, lung_statistics
from ctjoint.gateway.preprocess import (
    ResampleGeometry,
    context_stack,
    context_view,
    logits_to_source_labels,
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
