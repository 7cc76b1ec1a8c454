"""Training of both joint networks: data sampling, augmentation, joint loss, per-epoch
validation, resumable checkpoints and a JSON log.

Run folder (default runs/<model>-<config>): last.pt (everything needed to resume: weights,
optimizer, scheduler, loss balance, history), best.pt (weights + config + plan + metrics of
the best validation epoch: the format bundled in export/weights/ and read by the ONNX export),
train_log.json, and cache/ (preprocessed cases; CTJOINT_CACHE_DIR overrides).

Sampling. jcs2d trains on slices: every epoch takes every lesion slice plus a random share of
lesion-free slices (from all training scans, normal ones included). A slice's class target is
the scan label if the slice holds lesion pixels and `normal` otherwise: a lesion-free slice of
a COVID-19 scan looks normal, and the scan label comes from the slice vote in
gateway.aggregate, which reads abnormality from the most abnormal slices. deepsc3d trains on
whole scans.

Devices: the network, the loss and the optimizer run where `device` says
(export/torch_device.py: a CUDA GPU when torch sees one); batches are drawn and augmented on
the CPU, by torch DataLoader worker processes when asked (EpochBatches: each batch from its
own seeded generator), and checkpoints always hold CPU tensors.

Augmentation: intensity scale/shift and noise (scanner and reconstruction variation) and small
in-plane translations. No left-right flip: the chest is not mirror-symmetric (heart, aorta,
the three-lobed right lung), and side is diagnostic evidence (CAP is typically unilateral and
more often right-sided in real data); a flip would teach the network mirror-image anatomy it
never meets in service and erase that evidence.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ctjoint.contracts import CLASS_NAMES, CLASS_NORMAL
from ctjoint.export.configs import RunConfig, TrainConfig, get_config
from ctjoint.export.dataset import (
    CaseCache,
    PreparedCase,
    context_window,
    discover_cases,
)
from ctjoint.export.errors import TrainingError
from ctjoint.export.losses import JointLoss
from ctjoint.export.metrics import OverlapCounts, overlap
from ctjoint.export.models import JointNetwork, build_model, count_parameters
from ctjoint.export.torch_device import (
    autocast,
    describe,
    peak_memory_gib,
    reset_peak_memory,
    resolve_device,
)
from ctjoint.gateway.aggregate import aggregate_slice_probabilities, softmax
from ctjoint.gateway.preprocess import PREPROCESSORS, PreprocessPlan

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ctjoint-checkpoint/1"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
TRAIN_LOG = "train_log.json"
ENV_CACHE_DIR = "CTJOINT_CACHE_DIR"
DEFAULT_THREADS = 2
# Normalised intensity of air (the bottom of the lung window): what shifted-in borders hold.
AIR = -1.0
PREDICT_BATCH = 32
LOSS_CURVE_PARTS = 10
LOADER_PREFETCH = 4  # batches each loader worker keeps ready


# --- Reproducibility --------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The sampling / augmentation generator of one epoch: a resumed run replays the same
    epochs as an uninterrupted one without storing generator states."""
    return np.random.default_rng([seed, epoch])


def batch_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The augmentation generator of one batch: batches built by loader worker processes, in
    any order, are the same as batches built one after another."""
    return np.random.default_rng([seed, epoch, step])


# --- Batches -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Network input, segmentation target and class target as tensors."""

    image: torch.Tensor
    seg: torch.Tensor
    cls: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(
            self.image.to(device, non_blocking=True),
            self.seg.to(device, non_blocking=True),
            self.cls.to(device, non_blocking=True),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies (DataLoader's pin_memory calls this), for asynchronous copies to
        a GPU."""
        return Batch(self.image.pin_memory(), self.seg.pin_memory(), self.cls.pin_memory())


class EpochBatches(TorchDataset[Batch]):
    """One epoch's augmented batches for torch's DataLoader: item `step` is batch `step`,
    drawn from its own generator (batch_rng), so worker processes build exactly what the
    main process would. Workers (forked: the prepared cases are shared, not copied) keep the
    GPU from waiting on scipy's warps, which hold the GIL for much of their time."""

    def __init__(
        self,
        config: RunConfig,
        cases: Sequence[PreparedCase],
        batches: Sequence[list[Any]],
        seed: int,
        epoch: int,
    ) -> None:
        self.config = config
        self.cases = cases
        self.batches = batches
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int) -> Batch:
        rng = batch_rng(self.seed, self.epoch, step)
        return make_batch(self.config, self.cases, self.batches[step], True, rng)


def epoch_loader(dataset: EpochBatches, workers: int, pin_memory: bool) -> DataLoader[Batch]:
    """The batches in order; `workers` processes build them ahead (0: in this process, when
    asked)."""
    return DataLoader(
        dataset,
        batch_size=None,  # items are whole batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=LOADER_PREFETCH if workers > 0 else None,
    )


def slice_items(
    cases: Sequence[PreparedCase], config: TrainConfig, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """(case index, slice index) pairs of one 2.5D epoch, shuffled: every lesion slice plus
    `negatives_per_lesion_slice` lesion-free slices each, capped at `max_slices_per_epoch`."""
    positives: list[tuple[int, int]] = []
    negatives: list[tuple[int, int]] = []
    for c, case in enumerate(cases):
        lesion = np.zeros(len(case.labels), dtype=bool)
        lesion[case.lesion_planes()] = True
        positives.extend((c, int(z)) for z in np.flatnonzero(lesion))
        negatives.extend((c, int(z)) for z in np.flatnonzero(~lesion))
    n_neg = min(len(negatives), round(config.negatives_per_lesion_slice * len(positives)))
    if not positives:
        n_neg = len(negatives)  # a set without lesions still trains the normal class
    chosen = [negatives[i] for i in rng.choice(len(negatives), size=n_neg, replace=False)]
    items = positives + chosen
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    cap = config.max_slices_per_epoch
    if cap is not None and len(items) > cap:
        items = items[:cap]  # already shuffled: the cap keeps the lesion/normal proportion
    return items


def _shift_planes(array: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    """Translate the last two axes by (dy, dx) pixels, filling the uncovered border."""
    out = np.full_like(array, fill)
    h, w = array.shape[-2:]
    src_y = slice(max(0, -dy), h - max(0, dy))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = array[..., src_y, src_x]
    return out


def augment(
    image: np.ndarray, labels: np.ndarray, config: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Intensity jitter, noise and in-plane translation of a batch ([B, C, ...] image,
    [B, ...] labels or [B, lesion classes, ...] fractions); geometry changes are applied
    identically to image and labels."""
    b = int(image.shape[0])
    extra = (1,) * (image.ndim - 1)
    jitter = config.intensity_scale
    scale = rng.uniform(1.0 - jitter, 1.0 + jitter, size=b)
    shift = rng.uniform(-config.intensity_shift, config.intensity_shift, size=b)
    image = image * scale.reshape(b, *extra) + shift.reshape(b, *extra)
    if config.noise_std > 0:
        image = image + rng.normal(0.0, config.noise_std, image.shape)
    if config.max_shift_px > 0:
        m = config.max_shift_px
        image = image.copy()
        labels = labels.copy()
        for i in range(b):
            dy, dx = (int(v) for v in rng.integers(-m, m + 1, 2))
            if dy or dx:
                image[i] = _shift_planes(image[i], dy, dx, AIR * scale[i] + shift[i])
                labels[i] = _shift_planes(labels[i], dy, dx, 0)
    return image.astype(np.float32), labels


# Soft tissue (muscle, blood, liver: 40-55 HU in the phantoms) as the augmentation finds it,
# and the fat it becomes.
SOFT_TISSUE_HU = (-20.0, 90.0)
FAT_HU = (-120.0, -60.0)
_SOFT_TISSUE_MEAN_HU = 45.0


def tissue_fat_augment(
    image: np.ndarray,
    labels: np.ndarray,
    plan: PreprocessPlan,
    probability: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Body-habitus variety: with `probability` per sample of a whole-volume batch ([B, 1, Z,
    H, W] normalised image, [B, Z, H, W] labels), soft tissue (smoothed over 3 voxels, no
    lesion) in a random smooth part of the volume (30-100 % of it) becomes fat, noise kept.

    Fat around the lung apices and in the mediastinum varies from patient to patient, and
    the training family draws that space as soft tissue; a network that learned "non-air
    tissue beside the lung is a lesion" is caught by fattier chests. Labels are unchanged."""
    if probability <= 0:
        return image
    scale = np.float32(1.0 / (plan.window_width * plan.norm_std))
    low_hu = plan.window_center - plan.window_width / 2.0

    def normalised(hu: float) -> float:
        return ((hu - low_hu) / plan.window_width - plan.norm_mean) / plan.norm_std

    low, high = normalised(SOFT_TISSUE_HU[0]), normalised(SOFT_TISSUE_HU[1])
    out = image
    for i in range(image.shape[0]):
        if rng.random() >= probability:
            continue
        if out is image:
            out = image.copy()
        volume = out[i, 0]
        coarse = rng.random((4, 6, 6))
        field = ndimage.zoom(
            coarse, [n / c for n, c in zip(volume.shape, coarse.shape, strict=True)], order=1
        )[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
        part = field <= np.quantile(field, rng.uniform(0.3, 1.0))
        smooth = ndimage.uniform_filter(volume, size=3)
        soft = (smooth >= low) & (smooth <= high) & (labels[i] == 0) & part
        shift = float(rng.uniform(*FAT_HU)) - _SOFT_TISSUE_MEAN_HU
        volume[soft] += np.float32(shift) * scale
    return out


def _stack_tissue_fat(
    image: np.ndarray,
    labels: np.ndarray,
    plan: PreprocessPlan,
    probability: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """`tissue_fat_augment` of 2.5D stacks ([B, C, H, W], the centre plane's [B, H, W]
    labels): each stack is a thin volume, and the centre's lesions, widened by two pixels,
    stand for its neighbours' (a consolidation is soft-tissue dense and must stay one)."""
    if probability <= 0:
        return image
    near = ndimage.binary_dilation(labels > 0, structure=np.ones((1, 5, 5), dtype=bool))
    planes = np.broadcast_to(near[:, None], image.shape).astype(np.uint8)
    return tissue_fat_augment(image[:, None], planes, plan, probability, rng)[:, 0]


def _warp(array: np.ndarray, matrix: np.ndarray, order: int, fill: float) -> np.ndarray:
    """Resample `array` ([..., H, W] or [..., D, H, W] spatial tail of len(matrix)) about
    its centre with `matrix` (output -> input coordinates)."""
    ndim = matrix.shape[0]
    centre = (np.array(array.shape[-ndim:], dtype=np.float64) - 1.0) / 2.0
    offset = centre - matrix @ centre
    lead = array.shape[:-ndim]
    flat = array.reshape(-1, *array.shape[-ndim:])
    out = np.empty_like(flat)
    for i, plane in enumerate(flat):
        out[i] = ndimage.affine_transform(
            plane, matrix, offset=offset, order=order, mode="constant", cval=fill
        )
    return out.reshape(*lead, *array.shape[-ndim:])


def geometric_augment(
    image: np.ndarray, labels: np.ndarray, config: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample zoom (each axis) and in-plane rotation of a [B, C, *spatial] image and its
    [B, *spatial] labels (nearest) or [B, lesion classes, *spatial] float fractions (linear):
    linear for the image, air and no lesion outside."""
    if config.zoom <= 0 and config.rotate_deg <= 0:
        return image, labels
    ndim = image.ndim - 2
    label_order = 1 if labels.dtype.kind == "f" else 0
    image = image.copy()
    labels = labels.copy()
    for i in range(image.shape[0]):
        scale = rng.uniform(1.0 - config.zoom, 1.0 + config.zoom, size=ndim)
        angle = np.deg2rad(rng.uniform(-config.rotate_deg, config.rotate_deg))
        rotation = np.eye(ndim)
        c, s = np.cos(angle), np.sin(angle)
        rotation[-2:, -2:] = [[c, -s], [s, c]]
        matrix = rotation @ np.diag(1.0 / scale)  # output -> input: shrink = zoom in
        image[i] = _warp(image[i], matrix, 1, AIR)
        labels[i] = _warp(labels[i], matrix, label_order, 0)
    return image, labels


def slice_batch(
    cases: Sequence[PreparedCase],
    items: Sequence[tuple[int, int]],
    config: TrainConfig | None,
    rng: np.random.Generator,
    plan: PreprocessPlan,
    *,
    soft: bool = False,
) -> Batch:
    """A 2.5D batch; `config` None means no augmentation; `soft`: the segmentation target is
    the cases' lesion fractions (`_seg_target`), else their labels."""
    image = np.stack([context_window(cases[c].image, z, plan.context) for c, z in items])
    labels = np.stack([cases[c].labels[z] for c, z in items])
    targets = np.array(
        [cases[c].label if cases[c].labels[z].any() else CLASS_NORMAL for c, z in items]
    )
    image = image.astype(np.float32)
    seg = _fractions([cases[c] for c, _ in items], [z for _, z in items]) if soft else labels
    if config is not None:
        image = _stack_tissue_fat(image, labels, plan, config.tissue_fat, rng)
        image, seg = geometric_augment(image, seg, config, rng)
        image, seg = augment(image, seg, config, rng)
    return Batch(
        torch.from_numpy(image),
        _seg_target(seg, soft),
        torch.from_numpy(targets.astype(np.int64)),
    )


def _fractions(cases: Sequence[PreparedCase], planes: Sequence[int] | None = None) -> np.ndarray:
    """[B, lesion classes, *spatial] float32 fractions of `cases` (plane `planes[i]` of case
    i, or the whole case)."""
    out = []
    for i, case in enumerate(cases):
        if case.fractions is None:
            raise ValueError(f"case {case.case_id} has no lesion fractions (prepare it again)")
        out.append(case.fractions if planes is None else case.fractions[:, planes[i]])
    return np.stack(out).astype(np.float32) / 255.0


def _seg_target(seg: np.ndarray, soft: bool) -> torch.Tensor:
    """The loss's segmentation target: int64 labels, or with `soft` class probabilities
    [B, K, *spatial] (background: what the lesion fractions leave)."""
    if not soft:
        return torch.from_numpy(seg.astype(np.int64))
    lesions = np.clip(seg, 0.0, 1.0)
    total = lesions.sum(axis=1, keepdims=True)
    lesions = lesions / np.maximum(total, 1.0)  # warped fractions may add up past one
    background = 1.0 - lesions.sum(axis=1, keepdims=True)
    return torch.from_numpy(np.concatenate([background, lesions], axis=1).astype(np.float32))


def volume_batch(
    cases: Sequence[PreparedCase],
    config: TrainConfig | None,
    rng: np.random.Generator,
    plan: PreprocessPlan | None = None,
    *,
    soft: bool = False,
) -> Batch:
    """A 3D batch of whole scans; `config` None means no augmentation (`plan`: the input's,
    for the tissue augmentation); `soft` as in `slice_batch`."""
    image = np.stack([case.image for case in cases])[:, None].astype(np.float32)
    labels = np.stack([case.labels for case in cases])
    seg = _fractions(cases) if soft else labels
    if config is not None:
        if plan is not None and config.tissue_fat > 0:
            image = tissue_fat_augment(image, labels, plan, config.tissue_fat, rng)
        image, seg = geometric_augment(image, seg, config, rng)
        image, seg = augment(image, seg, config, rng)
    targets = np.array([case.label for case in cases], dtype=np.int64)
    return Batch(torch.from_numpy(image), _seg_target(seg, soft), torch.from_numpy(targets))


def epoch_batches(
    config: RunConfig, cases: Sequence[PreparedCase], rng: np.random.Generator
) -> list[list[Any]]:
    """The batches of one epoch as lists of slice items (2.5D) or case indices (3D)."""
    size = config.train.batch_size
    members: list[Any]
    if config.plan.preprocessor().per_slice:
        members = slice_items(cases, config.train, rng)
    else:
        members = [int(i) for i in rng.permutation(len(cases))]
    batches = [members[i : i + size] for i in range(0, len(members), size)]
    # A trailing batch of one breaks batch norm statistics and adds little; drop it.
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def make_batch(
    config: RunConfig,
    cases: Sequence[PreparedCase],
    members: Sequence[Any],
    augment_data: bool,
    rng: np.random.Generator,
) -> Batch:
    train_config = config.train if augment_data else None
    soft = config.train.soft_targets
    if config.plan.preprocessor().per_slice:
        return slice_batch(cases, members, train_config, rng, config.plan, soft=soft)
    return volume_batch([cases[i] for i in members], train_config, rng, config.plan, soft=soft)


# --- Prediction on the model grid (validation) -------------------------------------------------


@torch.no_grad()
def predict_case(
    net: JointNetwork, case: PreparedCase, context: int, kind: str, amp: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Label map on the model grid and scan probabilities [3] for one prepared case (on the
    device the network's weights are on)."""
    net.eval()
    device = next(net.parameters()).device
    if PREPROCESSORS[kind].per_slice:
        labels = []
        slice_logits = []
        for start in range(0, len(case.image), PREDICT_BATCH):
            stop = min(start + PREDICT_BATCH, len(case.image))
            stack = np.stack([context_window(case.image, z, context) for z in range(start, stop)])
            with autocast(amp, device):
                seg, cls = net(torch.from_numpy(stack.astype(np.float32)).to(device))
            labels.append(seg.argmax(dim=1).to(torch.uint8).cpu().numpy())
            slice_logits.append(cls.float().cpu().numpy())
        probs = aggregate_slice_probabilities(softmax(np.concatenate(slice_logits), axis=1))
        return np.concatenate(labels), probs
    image = torch.from_numpy(case.image.astype(np.float32))[None, None].to(device)
    with autocast(amp, device):
        seg, cls = net(image)
    label_map = seg[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
    return label_map, softmax(cls.float().cpu().numpy(), axis=1)[0]


def validate(net: JointNetwork, cases: Sequence[PreparedCase], config: RunConfig) -> dict[str, Any]:
    """Lesion Dice (binary, on the model grid; mean over cases with lesions and pooled) and
    scan accuracy on prepared validation cases."""
    dices: list[float] = []
    pooled = OverlapCounts(0, 0, 0)
    correct = 0
    for case in cases:
        labels, probs = predict_case(
            net, case, config.plan.context, config.plan.kind, config.train.amp
        )
        counts = overlap(labels > 0, case.labels > 0)
        pooled = pooled + counts
        if counts.truth > 0:
            dices.append(counts.dice)
        correct += int(int(np.argmax(probs)) == case.label)
    mean_dice = float(np.mean(dices)) if dices else math.nan
    accuracy = correct / len(cases) if cases else math.nan
    return {
        "dice": mean_dice,
        "global_dice": pooled.dice,
        "accuracy": accuracy,
        "cases": len(cases),
    }


def validation_score(metrics: dict[str, Any]) -> float:
    """One number to pick the best epoch by: the mean of lesion Dice and accuracy."""
    parts = [v for v in (metrics.get("dice"), metrics.get("accuracy")) if v is not None]
    parts = [v for v in parts if not math.isnan(v)]
    return float(np.mean(parts)) if parts else -math.inf


# --- Checkpoints -------------------------------------------------------------------------------


def _fp32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
        for k, v in module.state_dict().items()
    }


def model_checkpoint(
    net: nn.Module, config: RunConfig, metrics: dict[str, Any], epoch: int
) -> dict[str, Any]:
    """The portable checkpoint: enough to rebuild, export and describe the model, no more."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": config.model,
        "config_name": config.name,
        "config": config.to_dict(),
        "plan": config.plan.to_json(),
        "state_dict": _fp32_state(net),
        "metrics": metrics,
        "epoch": epoch,
    }


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file, so an interrupted save never corrupts a checkpoint."""
    partial = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """A checkpoint written by this module (tensors and plain data only: weights_only)."""
    file = Path(path)
    if not file.is_file():
        raise TrainingError(f"{file}: checkpoint not found")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise TrainingError(f"{file}: not a readable checkpoint: {err}") from err
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{file}: not a {CHECKPOINT_FORMAT} checkpoint")
    return data


def model_from_checkpoint(path: Path | str) -> tuple[JointNetwork, RunConfig, dict[str, Any]]:
    """Rebuild the network a checkpoint describes, weights loaded, in eval mode."""
    data = load_checkpoint(path)
    config = RunConfig.from_dict(data["config"])
    net = build_model(config)
    net.load_state_dict(data["state_dict"])
    net.eval()
    return net, config, data


def json_safe(value: Any) -> Any:
    """Plain JSON: NaN and infinities become null (strict parsers reject them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


# --- The loop ----------------------------------------------------------------------------------


def lr_schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 2 % of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_curve(step_losses: Sequence[float], parts: int = LOSS_CURVE_PARTS) -> list[float]:
    """Mean loss of each of up to `parts` consecutive, equal shares of an epoch's steps: how
    the loss moved inside an epoch, small enough for the log."""
    if not step_losses:
        return []
    chunks = np.array_split(np.asarray(step_losses, dtype=np.float64), min(parts, len(step_losses)))
    return [float(chunk.mean()) for chunk in chunks]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    config: RunConfig
    parameters: int
    history: list[dict[str, Any]]
    wall_seconds: float
    train_cases: int

    def summary(self) -> str:
        text = (
            f"{self.config.model} ({self.config.name}, {self.parameters:,} parameters): "
            f"{len(self.history)} epochs in {self.wall_seconds / 60:.1f} min on "
            f"{self.train_cases} training scans"
        )
        scored = [r for r in self.history if r["val"]]
        if scored:
            best = max(scored, key=lambda r: r["score"])
            text += (
                f"; best epoch {best['epoch']}: val lesion Dice {best['val']['dice']:.3f}, "
                f"accuracy {best['val']['accuracy']:.3f}"
            )
        return text + f"; checkpoints and {TRAIN_LOG} in {self.run_dir}"


def train_model(
    model: str,
    data_dir: Path,
    config_name: str = "tiny",
    out_dir: Path | None = None,
    epochs: int | None = None,
    seed: int = 0,
    resume: bool = False,
    threads: int | None = None,
    init: Path | None = None,
    device: str = "auto",
    loader_workers: int = 0,
    prepare_workers: int = 1,
    lr: float | None = None,
) -> str:
    """Train `model` on a data set folder; returns a one-paragraph summary.

    Checkpoints go to `out_dir` (default runs/<model>-<config>); `resume` continues from its
    last.pt with the stored configuration (`epochs` may extend it); `init` starts a new run
    from the weights of another checkpoint of the same network (fine-tuning), usually with
    a lower `lr` than the configuration's.
    """
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"{model}-{config_name}"
    config = get_config(model, config_name)
    if epochs is not None:
        config = config.with_epochs(epochs)
    if lr is not None:
        if resume:
            raise TrainingError("--lr sets a new run's rate; a resumed run keeps its own")
        if not lr > 0:
            raise TrainingError(f"--lr must be positive, not {lr}")
        config = config.with_lr(lr)
    result = train_run(
        config,
        data_dir,
        run_dir,
        seed=seed,
        resume=resume,
        threads=threads,
        epochs=epochs,
        init=init,
        device=device,
        loader_workers=loader_workers,
        prepare_workers=prepare_workers,
    )
    return result.summary()


def train_run(
    config: RunConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    seed: int = 0,
    resume: bool = False,
    threads: int | None = None,
    epochs: int | None = None,
    console: Console | None = None,
    init: Path | None = None,
    device: str = "auto",
    loader_workers: int = 0,
    prepare_workers: int = 1,
) -> TrainResult:
    """Train with an explicit configuration (tests use small ones). On `resume` the stored
    configuration and seed win; `epochs` may still extend the run. `device`: where the
    network computes (torch_device.resolve_device); `loader_workers`: processes that build
    augmented batches ahead of the step that needs them (0: the training process builds
    each when it needs it); `prepare_workers`: processes that fill the preprocessing cache."""
    if loader_workers < 0:
        raise TrainingError(f"loader_workers must be 0 or more, not {loader_workers}")
    torch.set_num_threads(threads or DEFAULT_THREADS)
    target = resolve_device(device)
    last_path = run_dir / LAST_CHECKPOINT
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(last_path)
        if state.get("model") != config.model:
            raise TrainingError(f"{last_path}: a {state.get('model')} run, not {config.model}")
        config = RunConfig.from_dict(state["config"])
        if epochs is not None:
            config = config.with_epochs(epochs)
        seed = int(state["seed"])
    elif last_path.exists():
        raise TrainingError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)

    console = console or Console(stderr=True)
    train_refs = discover_cases(data_dir, "train")
    val_refs = discover_cases(data_dir, "val")
    if not train_refs:
        raise TrainingError(f"{data_dir}: no training cases (split 'train')")
    cache = CaseCache(Path(os.environ.get(ENV_CACHE_DIR) or run_dir / "cache"), config.plan)
    with _progress(console) as progress:
        task = progress.add_task("preparing", total=len(train_refs) + len(val_refs), status="")
        train_cases = cache.get_many(
            train_refs, lambda: progress.advance(task), workers=prepare_workers
        )
        val_cases = cache.get_many(
            val_refs, lambda: progress.advance(task), workers=prepare_workers
        )

    net = build_model(config)
    if init is not None and state is None:
        _load_init(net, config, Path(init))
    net.to(target)
    loss_fn = JointLoss(config.train).to(target)
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
    parameters = count_parameters(net)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in net.named_parameters():
        # Norm scales and biases are not weights to shrink.
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": list(loss_fn.parameters()), "weight_decay": 0.0},
        ],
        lr=config.train.lr,
    )
    steps_per_epoch = len(epoch_batches(config, train_cases, epoch_rng(seed, 0)))
    total_steps = max(1, steps_per_epoch * config.train.epochs)
    warmup = min(config.train.warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_schedule(step, warmup, total_steps)
    )

    history: list[dict[str, Any]] = []
    best_score = -math.inf
    start_epoch = 0
    wall_before = 0.0
    if state is not None:
        net.load_state_dict(state["state_dict"])
        loss_fn.load_state_dict(state["loss_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        best_score = float(state["best_score"])
        start_epoch = int(state["epoch"])
        wall_before = float(state.get("wall_seconds", 0.0))
        console.print(f"resuming {run_dir} at epoch {start_epoch + 1}")

    started = time.perf_counter()
    for epoch in range(start_epoch, config.train.epochs):
        epoch_started = time.perf_counter()
        torch.manual_seed(seed * 100_003 + epoch)  # dropout masks, replayable on resume
        batches = epoch_batches(config, train_cases, epoch_rng(seed, epoch))
        net.train()
        reset_peak_memory(target)
        totals = {"loss": 0.0, "seg": 0.0, "cls": 0.0}
        weights = (1.0, 1.0)
        waited = 0.0
        samples = 0
        step_losses: list[float] = []

        loader = iter(
            epoch_loader(
                EpochBatches(config, train_cases, batches, seed, epoch),
                loader_workers,
                pin_memory=target.type == "cuda",
            )
        )
        with _progress(console) as progress:
            task = progress.add_task(
                f"epoch {epoch + 1}/{config.train.epochs}", total=len(batches), status=""
            )
            for step in range(len(batches)):
                asked = time.perf_counter()
                batch = next(loader).to(target)
                waited += time.perf_counter() - asked
                samples += int(batch.cls.shape[0])
                with autocast(config.train.amp, target):
                    out = net.forward_all(batch.image)
                terms = loss_fn(out, batch.seg, batch.cls)
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                nn.utils.clip_grad_norm_(net.parameters(), config.train.grad_clip)
                optimizer.step()
                scheduler.step()
                step_losses.append(float(terms.total.detach()))
                totals["loss"] += step_losses[-1]
                totals["seg"] += float(terms.seg)
                totals["cls"] += float(terms.cls)
                weights = (terms.seg_weight, terms.cls_weight)
                progress.update(
                    task,
                    advance=1,
                    status=f"seg {totals['seg'] / (step + 1):.3f} "
                    f"cls {totals['cls'] / (step + 1):.3f}",
                )
        n = max(1, len(batches))
        train_seconds = time.perf_counter() - epoch_started
        metrics = validate(net, val_cases, config) if val_cases else {}
        score = validation_score(metrics)
        record = {
            "epoch": epoch + 1,
            "loss": totals["loss"] / n,
            "seg_loss": totals["seg"] / n,
            "cls_loss": totals["cls"] / n,
            "seg_weight": weights[0],
            "cls_weight": weights[1],
            "lr": scheduler.get_last_lr()[0],
            "steps": len(batches),
            "loss_curve": loss_curve(step_losses),
            "samples": samples,
            "samples_per_second": samples / max(train_seconds, 1e-9),
            "batch_wait_seconds": waited,
            "train_seconds": train_seconds,
            "peak_memory_gib": peak_memory_gib(target),
            "seconds": time.perf_counter() - epoch_started,
            "val": metrics,
            "score": score,
        }
        history.append(record)
        improved = score > best_score or not val_cases
        if improved:
            best_score = score
            best = model_checkpoint(net, config, {**metrics, "epoch": epoch + 1}, epoch + 1)
            save_atomic(best, run_dir / BEST_CHECKPOINT)
        wall = wall_before + time.perf_counter() - started
        save_atomic(
            {
                **model_checkpoint(net, config, metrics, epoch + 1),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loss_state": loss_fn.state_dict(),
                "history": history,
                "best_score": best_score,
                "seed": seed,
                "wall_seconds": wall,
            },
            last_path,
        )
        _write_log(run_dir, config, seed, parameters, history, wall, target, len(train_cases))
        console.print(
            f"epoch {epoch + 1}: seg {record['seg_loss']:.3f} cls {record['cls_loss']:.3f} "
            f"val dice {metrics.get('dice', math.nan):.3f} "
            f"acc {metrics.get('accuracy', math.nan):.3f}"
            f"{' (best)' if improved else ''} [{record['seconds']:.0f} s, "
            f"{record['samples_per_second']:.1f} samples/s]"
        )

    wall = wall_before + time.perf_counter() - started
    _write_log(run_dir, config, seed, parameters, history, wall, target, len(train_cases))
    if val_cases and (run_dir / BEST_CHECKPOINT).is_file():
        _calibrate_best(run_dir / BEST_CHECKPOINT, val_cases, seed, target)
    return TrainResult(run_dir, config, parameters, history, wall, len(train_cases))


def _calibrate_best(
    path: Path, val_cases: Sequence[PreparedCase], seed: int, device: torch.device
) -> None:
    """Fit the best model's logit temperatures on the validation cases and store them."""
    from ctjoint.export.calibrate import calibrate_network

    net, config, data = model_from_checkpoint(path)
    net.to(device)
    fit = calibrate_network(net, config, val_cases, seed=seed)
    data["temperature"] = {"cls": fit.temperature.cls, "seg": fit.temperature.seg}
    data["calibration"] = fit.to_dict()
    save_atomic(data, path)


def _load_init(net: JointNetwork, config: RunConfig, path: Path) -> None:
    """Start from another checkpoint's weights; the network shapes must match exactly."""
    data = load_checkpoint(path)
    if data.get("model") != config.model:
        raise TrainingError(f"{path}: a {data.get('model')} checkpoint, not {config.model}")
    try:
        net.load_state_dict(data["state_dict"])
    except RuntimeError as err:
        raise TrainingError(f"{path}: weights do not fit the {config.name} network: {err}") from err


def _write_log(
    run_dir: Path,
    config: RunConfig,
    seed: int,
    parameters: int,
    history: list[dict[str, Any]],
    wall: float,
    device: torch.device,
    train_cases: int,
) -> None:
    log = {
        "model": config.model,
        "config": config.to_dict(),
        "seed": seed,
        "parameters": parameters,
        "device": describe(device),
        "train_cases": train_cases,
        "classes": list(CLASS_NAMES),
        "wall_seconds": wall,
        "epochs": history,
    }
    partial = run_dir / (TRAIN_LOG + ".tmp")
    partial.write_text(json.dumps(json_safe(log), indent=2), encoding="utf-8")
    os.replace(partial, run_dir / TRAIN_LOG)
