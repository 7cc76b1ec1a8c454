"""Joint loss and training: finite losses, learning on a tiny data set, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from synthetic_ct import write_nifti_set

from ctjoint.contracts import CLASS_NORMAL
from ctjoint.export.configs import NetConfig, RunConfig, get_config
from ctjoint.export.dataset import CaseCache, PreparedCase, discover_cases, lesion_fractions
from ctjoint.export.losses import JointLoss, segmentation_loss, soft_dice_loss
from ctjoint.export.models import build_model
from ctjoint.export.models.blocks import JointOutput
from ctjoint.export.train import (
    TrainingError,
    geometric_augment,
    make_batch,
    model_from_checkpoint,
    slice_items,
    tissue_fat_augment,
    train_run,
)
from ctjoint.gateway.preprocess import PreprocessPlan


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def small_config(model: str, epochs: int = 1) -> RunConfig:
    """The tiny configuration shrunk to 32x32 inputs and three levels (seconds per epoch)."""
    base = get_config(model, "tiny")
    if model == "jcs2d":
        plan = PreprocessPlan.default(model, 32, 32)
        net = NetConfig(widths=(8, 16, 32), deep_supervision=(1,))
    else:
        plan = PreprocessPlan.default(model, 32, 32, 8)
        net = NetConfig(
            widths=(4, 8, 16), norm="instance", stem_stride=(2, 2, 2), deep_supervision=(1,)
        )
    train = dataclasses.replace(
        base.train,
        epochs=epochs,
        batch_size=8 if model == "jcs2d" else 2,
        aux_weights=(0.5,),
        max_slices_per_epoch=None,
        warmup_steps=2,
        max_shift_px=2,
    )
    return dataclasses.replace(base, plan=plan, net=net, train=train)


@pytest.fixture(scope="module")
def nifti_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nifti_set(tmp_path_factory.mktemp("data") / "set", per_class=4, size=32, slices=8)


def prepared(config: RunConfig, root: Path, cache: Path) -> list[PreparedCase]:
    return CaseCache(cache, config.plan).get_many(discover_cases(root, "train"))


def random_output(shape: tuple[int, ...], aux: tuple[tuple[int, ...], ...]) -> JointOutput:
    return JointOutput(
        torch.randn(shape, requires_grad=True),
        torch.randn(shape[0], 3, requires_grad=True),
        tuple(torch.randn(a, requires_grad=True) for a in aux),
    )


@pytest.mark.parametrize("balance", ["fixed", "uncertainty"])
def test_joint_loss_is_finite_and_differentiable(balance: str) -> None:
    loss = JointLoss(
        dataclasses.replace(
            get_config("jcs2d", "tiny").train, task_balance=balance, aux_weights=(0.5,)
        )
    )
    out = random_output((2, 3, 16, 16), ((2, 3, 8, 8),))
    terms = loss(out, torch.randint(0, 3, (2, 16, 16)), torch.tensor([0, 2]))
    terms.total.backward()
    assert torch.isfinite(terms.total)
    assert out.aux_seg_logits[0].grad is not None


def test_uncertainty_weighting_learns_both_log_variances() -> None:
    loss = JointLoss(get_config("deepsc3d", "tiny").train)
    out = random_output((2, 3, 4, 8, 8), ((2, 3, 2, 4, 4),))
    loss(out, torch.randint(0, 3, (2, 4, 8, 8)), torch.tensor([1, 2])).total.backward()
    assert loss.log_variances.grad is not None
    assert torch.all(loss.log_variances.grad != 0)


def test_soft_dice_loss_vanishes_for_a_perfect_prediction() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 1
    target[0, 6:, 6:] = 2
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50.0
    assert float(soft_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-4)


def test_lesion_fractions_are_each_model_cells_share_of_every_lesion_class() -> None:
    lesions = np.zeros((4, 8, 8), dtype=np.uint8)
    lesions[:, 0:2, 0:1] = 1  # half of model cell (0, 0) on a grid twice as coarse
    lesions[:2, 4:8, 4:8] = 2  # four whole cells, in the first two source slices only
    planes = lesion_fractions(lesions, (4, 4, 4))
    assert planes.shape == (2, 4, 4, 4) and planes.dtype == np.uint8
    assert np.all(planes[0, :, 0, 0] == 128) and np.count_nonzero(planes[0]) == 4
    assert np.all(planes[1, :2, 2:, 2:] == 255) and np.count_nonzero(planes[1]) == 8
    # A 3D plan halves the slices too: the consolidation fills the first depth slice.
    volume = lesion_fractions(lesions, (2, 4, 4))
    assert np.all(volume[1, 0, 2:, 2:] == 255) and not volume[1, 1].any()
    assert np.all(volume[0, :, 0, 0] == 128)


def test_a_one_hot_soft_target_gives_the_loss_of_its_labels() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 1
    target[1, 4:, 3:] = 2
    logits = torch.randn(2, 3, 8, 8)
    onehot = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    assert float(segmentation_loss(logits, onehot)) == pytest.approx(
        float(segmentation_loss(logits, target)), rel=1e-5
    )
    assert float(soft_dice_loss(logits, onehot)) == pytest.approx(
        float(soft_dice_loss(logits, target)), rel=1e-5
    )


@pytest.mark.parametrize("model", ["jcs2d", "deepsc3d"])
def test_soft_targets_are_class_probabilities_from_the_fractions(
    model: str, nifti_set: Path, tmp_path: Path
) -> None:
    config = small_config(model)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, soft_targets=True))
    cases = prepared(config, nifti_set, tmp_path)
    rng = np.random.default_rng(0)
    if model == "jcs2d":
        members: list = slice_items(cases, config.train, rng)[:16]
        fractions = np.stack([cases[c].fractions[:, z] for c, z in members])  # type: ignore[index]
    else:
        members = [0, 1]
        fractions = np.stack([cases[i].fractions for i in members])  # type: ignore[misc]
    seg = make_batch(config, cases, members, False, rng).seg.numpy()
    assert seg.dtype == np.float32 and seg.shape[1] == 3
    assert np.allclose(seg.sum(axis=1), 1.0, atol=1e-6)
    assert np.allclose(seg[:, 1:], fractions / 255.0, atol=1e-6)
    assert seg[:, 1:].max() == 1.0  # the sample holds lesions


def test_geometric_augmentation_moves_fractions_with_the_image_linearly() -> None:
    config = dataclasses.replace(get_config("deepsc3d", "tiny").train, zoom=0.3, rotate_deg=20.0)
    image = np.full((2, 1, 16, 48, 48), -1.0, dtype=np.float32)
    fractions = np.zeros((2, 2, 16, 48, 48), dtype=np.float32)
    image[:, :, 5:11, 16:32, 16:32] = 1.0
    fractions[:, 1, 5:11, 16:32, 16:32] = 1.0
    warped, moved = geometric_augment(image, fractions, config, np.random.default_rng(3))
    assert moved.shape == fractions.shape and not moved[:, 0].any()
    assert np.any((moved > 0.05) & (moved < 0.95))  # linear: the rim keeps partial shares
    assert moved.min() >= 0.0 and moved.max() <= 1.0 + 1e-6
    assert warped[:, 0][moved[:, 1] > 0.95].mean() > 0.8  # the lesion's voxels stay bright


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "fractions"])
def test_lesion_free_slices_are_trained_as_normal(
    soft: bool, nifti_set: Path, tmp_path: Path
) -> None:
    config = small_config("jcs2d")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, soft_targets=soft))
    cases = prepared(config, nifti_set, tmp_path)
    rng = np.random.default_rng(0)
    items = slice_items(cases, config.train, rng)
    batch = make_batch(config, cases, items, False, rng)
    lesions = batch.seg[:, 1:] if soft else batch.seg
    has_lesion = lesions.flatten(1).any(dim=1)
    assert torch.all(batch.cls[~has_lesion] == CLASS_NORMAL)
    assert torch.all(batch.cls[has_lesion] != CLASS_NORMAL)


def test_every_lesion_slice_is_sampled_each_epoch(nifti_set: Path, tmp_path: Path) -> None:
    config = small_config("jcs2d")
    cases = prepared(config, nifti_set, tmp_path)
    items = set(slice_items(cases, config.train, np.random.default_rng(3)))
    lesion_slices = {(c, int(z)) for c, case in enumerate(cases) for z in case.lesion_planes()}
    assert lesion_slices and lesion_slices <= items


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "fractions"])
@pytest.mark.parametrize("model", ["jcs2d", "deepsc3d"])
def test_a_few_training_steps_lower_the_joint_loss(
    model: str, soft: bool, nifti_set: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    config = small_config(model)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, soft_targets=soft))
    cases = prepared(config, nifti_set, tmp_path)
    rng = np.random.default_rng(0)
    members = slice_items(cases, config.train, rng)[:16] if model == "jcs2d" else list(range(4))
    batch = make_batch(config, cases, members, False, rng)
    net = build_model(config)
    loss_fn = JointLoss(dataclasses.replace(config.train, task_balance="fixed"))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        terms = loss_fn(net.forward_all(batch.image), batch.seg, batch.cls)
        return terms.total

    net.train()
    before = float(loss().detach())
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss().detach()) < 0.8 * before


def test_training_writes_checkpoints_and_a_json_log(nifti_set: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train_run(small_config("deepsc3d"), nifti_set, run, console=Console(quiet=True))
    log = json.loads((run / "train_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1]
    assert {"dice", "accuracy"} <= set(log["epochs"][0]["val"])
    net, config, data = model_from_checkpoint(run / "best.pt")
    assert config == small_config("deepsc3d")
    assert "optimizer" not in data and data["metrics"]["epoch"] == 1
    assert result.parameters == sum(p.numel() for p in net.parameters())


def test_resume_continues_from_the_last_checkpoint(nifti_set: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    quiet = Console(quiet=True)
    train_run(small_config("jcs2d"), nifti_set, run, seed=4, console=quiet)
    result = train_run(small_config("jcs2d"), nifti_set, run, resume=True, epochs=2, console=quiet)
    assert [e["epoch"] for e in result.history] == [1, 2]


def test_a_fresh_run_refuses_a_folder_that_holds_one(nifti_set: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    quiet = Console(quiet=True)
    train_run(small_config("deepsc3d"), nifti_set, run, console=quiet)
    with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
        train_run(small_config("deepsc3d"), nifti_set, run, console=quiet)


def test_resume_without_a_checkpoint_is_refused(nifti_set: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"last\.pt: checkpoint not found"):
        train_run(small_config("jcs2d"), nifti_set, tmp_path / "none", resume=True)


def test_geometric_augmentation_moves_image_and_labels_together() -> None:
    """A zoomed, rotated scan keeps its lesion under the same image voxels: the bright cube
    the labels mark is still where the labels say, and the lesion grows with the zoom."""
    config = dataclasses.replace(get_config("deepsc3d", "tiny").train, zoom=0.3, rotate_deg=20.0)
    image = np.full((2, 1, 16, 48, 48), -1.0, dtype=np.float32)
    labels = np.zeros((2, 16, 48, 48), dtype=np.int64)
    image[:, :, 5:11, 16:32, 16:32] = 1.0
    labels[:, 5:11, 16:32, 16:32] = 2
    warped, warped_labels = geometric_augment(image, labels, config, np.random.default_rng(3))
    assert warped.shape == image.shape and warped_labels.shape == labels.shape
    assert set(np.unique(warped_labels)) == {0, 2}  # nearest neighbour: no invented classes
    assert not np.array_equal(warped_labels, labels)
    inside = warped[:, 0][warped_labels == 2]
    assert inside.mean() > 0.8  # the lesion's voxels stay bright
    assert warped[:, 0][warped_labels == 0].mean() < -0.8  # air stays air, also at the rim


def test_tissue_fat_augmentation_turns_only_soft_tissue_outside_lesions_into_fat() -> None:
    plan = get_config("deepsc3d", "tiny").plan
    low = plan.window_center - plan.window_width / 2.0

    def normalised(hu: np.ndarray) -> np.ndarray:
        return ((hu - low) / plan.window_width - plan.norm_mean) / plan.norm_std

    hu = np.full((1, 1, 8, 24, 24), 45.0, dtype=np.float32)  # soft tissue
    hu[..., :8] = -850.0  # lung
    hu[..., 20:] = 700.0  # bone
    labels = np.zeros((1, 8, 24, 24), dtype=np.uint8)
    labels[0, 2:6, 10:16, 10:16] = 2  # a consolidation at soft-tissue HU
    image = normalised(hu)
    out = tissue_fat_augment(image, labels, plan, 1.0, np.random.default_rng(5))
    back = (out * plan.norm_std + plan.norm_mean) * plan.window_width + low
    changed = np.abs(back - hu) > 0.5
    assert changed.any()
    assert not changed[..., :8].any() and not changed[..., 20:].any()
    assert not changed[0, 0][labels[0] > 0].any()
    assert np.all((back[changed] >= -120.5) & (back[changed] <= -59.5))
    assert np.array_equal(image, normalised(hu))  # the input batch is not written
    same = tissue_fat_augment(image, labels, plan, 0.0, np.random.default_rng(5))
    assert same is image


def test_tissue_fat_augmentation_of_slice_stacks_spares_the_centre_lesion_in_every_plane() -> None:
    config = get_config("jcs2d", "tiny")
    plan = config.plan
    low = plan.window_center - plan.window_width / 2.0
    hu = np.full((12, 24, 24), 45.0, dtype=np.float32)  # soft tissue
    hu[:, :, :6] = -850.0  # lung
    labels = np.zeros((12, 24, 24), dtype=np.uint8)
    labels[:, 10:14, 10:14] = 2  # a consolidation at soft-tissue HU on every slice
    case = PreparedCase(
        "c", 1, ((hu - low) / plan.window_width - plan.norm_mean) / plan.norm_std, labels
    )
    train = dataclasses.replace(
        config.train,
        tissue_fat=1.0,
        zoom=0.0,
        rotate_deg=0.0,
        max_shift_px=0,
        intensity_scale=0.0,
        intensity_shift=0.0,
        noise_std=0.0,
        soft_targets=False,
    )
    augmented = dataclasses.replace(config, train=train)
    items = [(0, z) for z in range(2, 10)]
    batch = make_batch(augmented, [case], items, True, np.random.default_rng(4))
    image = batch.image.numpy()
    assert image.shape == (8, 2 * plan.context + 1, 24, 24)
    back = (image * plan.norm_std + plan.norm_mean) * plan.window_width + low
    soft = hu[0] > -100.0
    changed = (np.abs(back - 45.0) > 0.5) & soft
    assert changed.any()
    # The lesion and its 2-pixel margin keep their density in the centre and the neighbours.
    assert not changed[:, :, 8:16, 8:16].any()
    assert np.allclose(back[:, :, :, :6], -850.0, atol=0.5)  # lung stays lung
    assert np.all((back[changed] >= -120.5) & (back[changed] <= -59.5))
    assert np.array_equal(batch.seg.numpy(), labels[2:10])


def test_no_geometric_augmentation_leaves_the_batch_untouched() -> None:
    config = dataclasses.replace(get_config("jcs2d", "tiny").train, zoom=0.0, rotate_deg=0.0)
    image = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    labels = np.ones((2, 8, 8), dtype=np.int64)
    out, out_labels = geometric_augment(image, labels, config, np.random.default_rng(0))
    assert out is image and out_labels is labels


def test_label_smoothing_keeps_the_loss_of_a_certain_right_answer_above_zero() -> None:
    config = dataclasses.replace(get_config("deepsc3d", "tiny").train, task_balance="fixed")
    assert config.label_smoothing == 0.05
    loss = JointLoss(config)
    logits = torch.tensor([[30.0, -30.0, -30.0]])
    smooth = loss.forward(
        JointOutput(torch.zeros(1, 3, 4, 4, 4), logits, (torch.zeros(1, 3, 2, 2, 2),)),
        torch.zeros(1, 4, 4, 4, dtype=torch.long),
        torch.tensor([0]),
    )
    assert float(smooth.cls) > 0.5  # 0.05 spread over three classes of logits 60 apart
