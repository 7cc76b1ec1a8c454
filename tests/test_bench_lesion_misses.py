"""bench/lesion_misses.py puts each truth lesion cross-section in the place it touches."""

from __future__ import annotations

import types

import bench_scripts
import numpy as np
import pytest


@pytest.fixture
def misses(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The script, finding bench/doc_section.py as the command line would."""
    monkeypatch.syspath_prepend(str(bench_scripts.BENCH))
    return bench_scripts.load("lesion_misses")


def _lungs(slices: int) -> np.ndarray:
    """Rows 1-5: chest wall (column 0), right lung (1-5), heart (6), left lung (7-11), wall."""
    lungs = np.zeros((slices, 7, 13), dtype=np.uint8)
    lungs[:, 1:6, 1:6] = 1
    lungs[:, 1:6, 7:12] = 2
    return lungs


def test_between_the_lungs_is_the_tissue_on_a_row_with_a_lung_on_each_side(
    misses: types.ModuleType,
) -> None:
    between = misses.between_mask(_lungs(1))
    expected = np.zeros((1, 7, 13), dtype=bool)
    expected[0, 1:6, 6] = True
    assert np.array_equal(between, expected)


def test_each_cross_section_is_placed_by_what_it_touches_on_its_own_slice(
    misses: types.ModuleType,
) -> None:
    lesions = np.zeros((2, 7, 13), dtype=np.uint8)
    lesions[0, 3, 4:6] = 2  # against the heart (column 6)
    lesions[0, 3, 8] = 1  # surrounded by lung
    lesions[0, 1, 11] = 1  # in the corner against the chest wall
    lesions[1, 3, 3:5] = 1  # under the first one, one column off the heart
    place = misses.places(lesions, _lungs(2), pixel_mm=2.0)
    expected = np.full(lesions.shape, 255, dtype=np.uint8)
    expected[0, 3, 4:6] = 1
    expected[0, 3, 8] = 0
    expected[0, 1, 11] = 2
    expected[1, 3, 3:5] = 0
    assert np.array_equal(place, expected)
    assert misses.PLACES[1] == "heart/mediastinum"


def test_the_edge_is_every_lesion_voxel_with_a_lesion_free_neighbour_in_plane(
    misses: types.ModuleType,
) -> None:
    lesions = np.zeros((1, 5, 5), dtype=np.uint8)
    lesions[0, 1:4, 1:4] = 1
    edge = misses.edges(lesions)
    assert int(edge.sum()) == 8
    assert not edge[0, 2, 2]
