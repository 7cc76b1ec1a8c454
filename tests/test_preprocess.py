"""The shared preprocessing: windowing, resampling, 2.5D stacks, geometry round trip."""

from __future__ import annotations

import numpy as np
import pytest

from ctjoint.gateway.preprocess import (
    PreprocessPlan,
    ResampleGeometry,
    context_stack,
    logits_to_source_labels,
    preprocess_volume,
    resample_labels,
    resample_matrix,
    resize_inplane,
    source_label_map,
    window_normalise,
)


def test_block_mean_downsampling_equals_the_area_matrix() -> None:
    stack = np.random.default_rng(0).normal(size=(3, 64, 96)).astype(np.float32)
    fast = resize_inplane(stack, 16, 32, "area")
    ry, rx = resample_matrix(64, 16, "area"), resample_matrix(96, 32, "area")
    dense = np.matmul(ry, np.matmul(stack, rx.T))
    np.testing.assert_allclose(fast, dense, atol=1e-5)


def test_area_rows_sum_to_one_for_fractional_factors() -> None:
    matrix = resample_matrix(100, 37, "area")
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)


def test_lung_window_maps_its_edges_to_minus_one_and_one() -> None:
    plan = PreprocessPlan.default("jcs2d")
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0], dtype=np.float32)
    np.testing.assert_allclose(window_normalise(hu, plan), [-1, -1, 0, 1, 1], atol=1e-6)


def test_context_stack_repeats_edge_slices() -> None:
    slices = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    stacked = context_stack(slices, 1)
    assert stacked.shape == (4, 3, 2, 2)
    assert stacked[0, :, 0, 0].tolist() == [0, 0, 1]
    assert stacked[3, :, 0, 0].tolist() == [2, 3, 3]


def test_2d_plan_gives_one_sample_per_slice() -> None:
    plan = PreprocessPlan.default("jcs2d", height=32, width=32)
    image, geometry = preprocess_volume(np.full((5, 64, 64), -850.0, np.float32), plan)
    assert image.shape == (5, 3, 32, 32) and image.dtype == np.float32
    assert geometry.source_shape == (5, 64, 64)


def test_3d_plan_resamples_the_whole_scan() -> None:
    plan = PreprocessPlan.default("deepsc3d", height=32, width=32, depth=8)
    image, geometry = preprocess_volume(np.full((20, 64, 64), -850.0, np.float32), plan)
    assert image.shape == (1, 1, 8, 32, 32)
    assert geometry.model_shape == (8, 32, 32)


def test_plan_json_round_trip() -> None:
    plan = PreprocessPlan.default("deepsc3d")
    assert PreprocessPlan.from_json(plan.to_json()) == plan


def test_plan_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        PreprocessPlan.default("resnet")


def test_labels_survive_a_model_grid_round_trip() -> None:
    labels = np.zeros((10, 64, 64), np.uint8)
    labels[3:7, 16:48, 8:40] = 2
    plan = PreprocessPlan.default("jcs2d", height=32, width=32)
    _, geometry = preprocess_volume(labels.astype(np.float32), plan)
    small = resample_labels(labels, geometry.model_shape)
    logits = np.eye(3, dtype=np.float32)[small].transpose(0, 3, 1, 2) * 10.0  # [Z, K, H, W]
    back = logits_to_source_labels(logits, geometry)
    assert back.shape == labels.shape
    assert np.mean(back == labels) > 0.99


def test_a_few_false_positive_slices_leave_a_scan_normal() -> None:
    from ctjoint.gateway.aggregate import aggregate_slice_probabilities

    probs = np.tile(np.array([[0.05, 0.05, 0.9]], np.float32), (80, 1))
    probs[10:13] = [0.7, 0.1, 0.2]  # three noisy slices
    scan = aggregate_slice_probabilities(probs)
    assert int(np.argmax(scan)) == 2


def test_confident_lesion_slices_make_the_scan_abnormal_with_their_class() -> None:
    from ctjoint.gateway.aggregate import aggregate_slice_probabilities

    probs = np.tile(np.array([[0.01, 0.01, 0.98]], np.float32), (80, 1))
    probs[30:40] = [0.0001, 0.99985, 0.00005]
    scan = aggregate_slice_probabilities(probs)
    assert int(np.argmax(scan)) == 1
    assert abs(float(scan.sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("slices", [24, 64, 100, 400])
def test_the_3d_depth_resampling_equals_the_dense_matrix_product(slices: int) -> None:
    # Sparse sums of the source slices each depth slice covers, against the definition: the
    # [depth, Z] matrix times the stacked planes (issue 22, point 4).
    plan = PreprocessPlan.default("deepsc3d", height=16, width=12, depth=64)
    planes = np.random.default_rng(slices).normal(size=(slices, 16, 12)).astype(np.float32)
    image = plan.preprocessor().from_planes(planes)
    dense = np.tensordot(resample_matrix(slices, 64, "area"), planes, axes=(1, 0))
    assert image.shape == (1, 1, 64, 16, 12) and image.dtype == np.float32
    np.testing.assert_allclose(image[0, 0], dense, rtol=0, atol=2e-6)


@pytest.mark.parametrize("slices", [24, 64, 400])
def test_3d_labels_on_the_source_grid_equal_the_dense_definition_at_real_depths(
    slices: int,
) -> None:
    logits = np.random.default_rng(slices).normal(size=(1, 3, 64, 6, 6)).astype(np.float32)
    logits[0, 0, ::5] += 6.0  # lesion-free stretches of the model's depth
    geometry = ResampleGeometry((slices, 12, 10), (64, 6, 6), "3d")
    np.testing.assert_array_equal(
        source_label_map(logits, geometry), logits_to_source_labels(logits, geometry)
    )
