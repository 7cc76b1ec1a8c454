"""The density rule: lesion voxels whose neighbourhood is aerated lung become background."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ctjoint.contracts import MODEL_DEEPSC3D
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.analysis import ScanAnalysis, ScanAnalyzer
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.density import AERATED_MAX_HU, drop_aerated, neighbourhood_mean_hu
from ctjoint.gateway.quantify import LesionVoxels
from ctjoint.gateway.series import load_series_dir


def test_neighbourhood_mean_is_the_3x3_uniform_filter_with_nearest_edges() -> None:
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 200, size=(3, 9, 8)).astype(np.int16)
    label_map = np.zeros(hu.shape, dtype=np.uint8)
    label_map[:, ::2, ::3] = 1
    label_map[1, 0, 7] = label_map[2, 8, 0] = 2  # corners: edge pixels repeated
    voxels = LesionVoxels.of(label_map)
    expected = ndimage.uniform_filter(hu.astype(np.float64), size=(1, 3, 3), mode="nearest")
    np.testing.assert_allclose(
        neighbourhood_mean_hu(hu, voxels), expected[voxels.z, voxels.y, voxels.x], atol=1e-9
    )


def test_lesion_voxels_in_aerated_lung_are_dropped_and_dense_ones_kept() -> None:
    hu = np.full((2, 12, 12), -850, dtype=np.int16)  # aerated lung
    hu[0, 2:7, 2:7] = -600  # ground glass
    hu[1, 4:9, 4:9] = 20  # consolidation
    label_map = np.zeros(hu.shape, dtype=np.uint8)
    label_map[0, 1:8, 1:8] = 1  # the ground glass and a one-pixel rim of aerated lung
    label_map[1, 4:9, 4:9] = 2
    label_map[1, 0:2, 10:12] = 1  # a spill into aerated lung, far from any lesion
    before = label_map.copy()

    kept = drop_aerated(label_map, LesionVoxels.of(label_map), hu)

    # The rim's 3x3 mean holds at most 3 of 9 ground-glass pixels: (6 x -850 + 3 x -600) / 9
    # = -766.7 HU, aerated; the ground glass's own border keeps at least 4 of 9: -738.9 HU.
    expected = np.zeros_like(before)
    expected[0, 2:7, 2:7] = 1
    expected[1, 4:9, 4:9] = 2
    np.testing.assert_array_equal(label_map, expected)
    np.testing.assert_array_equal(
        np.stack([kept.z, kept.y, kept.x]), np.stack(np.nonzero(expected))
    )
    np.testing.assert_array_equal(kept.values, expected[np.nonzero(expected)])
    assert AERATED_MAX_HU == -750.0


def test_a_map_without_lesions_or_without_aerated_voxels_is_left_as_it_is() -> None:
    hu = np.full((1, 4, 4), 30, dtype=np.int16)
    label_map = np.zeros(hu.shape, dtype=np.uint8)
    empty = LesionVoxels.of(label_map)
    assert drop_aerated(label_map, empty, hu) is empty
    label_map[0, 1, 1] = 2
    voxels = LesionVoxels.of(label_map)
    assert drop_aerated(label_map, voxels, hu) is voxels
    assert label_map[0, 1, 1] == 2


def test_a_label_map_on_another_grid_is_refused() -> None:
    label_map = np.ones((1, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"HU volume \(1, 4, 5\) and label map \(1, 4, 4\)"):
        drop_aerated(label_map, LesionVoxels.of(label_map), np.zeros((1, 4, 5), np.int16))


def test_the_analysis_applies_the_rule_to_the_networks_map_and_keeps_the_label(
    tmp_path: Path,
) -> None:
    case = tmp_path / "case"
    write_phantom_case(case, kind="covid19", seed=7, slices=24, size=96)
    volume = load_series_dir(case / "series")

    async def run(limit: float | None) -> ScanAnalysis:
        async with EmbeddedBackend([MODEL_DEEPSC3D], intra_op_threads=1) as backend:
            analyzer = ScanAnalyzer(backend, aerated_max_hu=limit)
            return await analyzer.analyze_volume(volume, MODEL_DEEPSC3D)

    raw, ruled = asyncio.run(run(None)), asyncio.run(run(AERATED_MAX_HU))
    expected = raw.label_map.copy()
    kept = drop_aerated(expected, LesionVoxels.of(expected), volume.hu)
    # Not vacuous: the bundled network's map spills into aerated lung on this phantom.
    assert kept.z.size < LesionVoxels.of(raw.label_map).z.size
    np.testing.assert_array_equal(ruled.label_map, expected)
    assert ruled.result.lesions.total_voxels == kept.z.size
    assert ruled.result.label == raw.result.label
    assert ruled.result.probabilities == raw.result.probabilities
