"""The joint loss of both networks: segmentation (cross-entropy + soft Dice, with deep
supervision) plus classification (cross-entropy), balanced per task.

Task balance, two modes (TrainConfig.task_balance):

- "fixed": L = w_seg * L_seg + w_cls * L_cls (jcs2d: every slice carries both targets, and
  the two terms are of the same order from the first step).
- "uncertainty" (deepsc3d's task-aware loss): homoscedastic-uncertainty weighting after
  Kendall, Gal & Cipolla (CVPR 2018). Each task t has a learned log-variance s_t and

      L = sum_t exp(-s_t) * L_t + s_t,

  whose minimum over s_t is at s_t = log L_t: each task ends up weighted by the inverse of its
  own current loss. We chose it for the 3D model because its two tasks are badly matched in
  scale and in signal: the segmentation loss averages over a million voxels per scan and
  falls steadily, while the classification loss rests on one label per scan, is noisy with
  batches of two, and collapses towards zero once the lesion evidence is clear. A fixed ratio
  tuned for the first epochs is wrong for the last; the learned weights rebalance as the
  losses move, add two parameters and no hyper-parameter search (training on CPU leaves no
  budget for one). The log-variances are clamped so neither task can be switched off, and
  from below at -1 (a weight of at most e): a task whose loss approaches zero (here the
  classification, once lesions are found) would otherwise get an unbounded weight. We saw it
  happen: at a weight of 5.6 one hard batch was amplified enough to make the classifier
  collapse for several epochs (deepsc3d tiny, epoch 21 of 30).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ctjoint.contracts import SEG_BACKGROUND
from ctjoint.export.configs import TrainConfig
from ctjoint.export.models.blocks import JointOutput

# Bounds of the log-variances s: a task weight exp(-s) stays within [e^-4, e^1].
LOG_VARIANCE_MIN = -1.0
LOG_VARIANCE_MAX = 4.0
DICE_SMOOTH = 1.0


class LossTerms(NamedTuple):
    """The optimised total and its parts (detached parts for logging)."""

    total: torch.Tensor
    seg: torch.Tensor
    cls: torch.Tensor
    seg_weight: float
    cls_weight: float


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice, averaged over the lesion classes and the union "any lesion".

    `logits` [N, K, ...], `target` [N, ...] integer labels or [N, K, ...] class probabilities
    (soft targets). Dice is computed over the whole batch (not per image) so that lesion-free
    images, common in 2.5D batches, add false-positive mass without dividing zero by zero. The
    union term is the binary lesion Dice we report.
    """
    probs = torch.softmax(logits.float(), dim=1)
    num_classes = logits.shape[1]
    if target.is_floating_point():
        onehot = target.to(probs.dtype)
    else:
        onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    axes = (0, *range(2, logits.dim()))
    lesion_probs = probs[:, 1:]
    lesion_onehot = onehot[:, 1:]
    intersection = (lesion_probs * lesion_onehot).sum(dim=axes)
    denominator = lesion_probs.sum(dim=axes) + lesion_onehot.sum(dim=axes)
    any_probs = 1.0 - probs[:, SEG_BACKGROUND]
    any_target = 1.0 - onehot[:, SEG_BACKGROUND]
    any_intersection = (any_probs * any_target).sum()
    any_denominator = any_probs.sum() + any_target.sum()
    dice = torch.cat(
        [
            (2.0 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH),
            ((2.0 * any_intersection + DICE_SMOOTH) / (any_denominator + DICE_SMOOTH)).reshape(1),
        ]
    )
    return 1.0 - dice.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (every voxel) + soft Dice (lesion overlap, robust to class imbalance).

    Computed in float32 whatever precision the network ran in. `target`: integer labels, or
    class probabilities [N, K, ...] (soft cross-entropy against them).
    """
    logits = logits.float()
    hard = target if target.is_floating_point() else target.long()
    return F.cross_entropy(logits, hard) + soft_dice_loss(logits, target)


def downsample_target(target: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Resize a target to a coarser grid: an integer label map [N, ...] by nearest neighbour,
    class probabilities [N, K, ...] by area average."""
    if target.is_floating_point():
        if target.shape[2:] == shape:
            return target
        return F.interpolate(target, size=tuple(shape), mode="area")
    if target.shape[1:] == shape:
        return target
    resized = F.interpolate(target[:, None].float(), size=tuple(shape), mode="nearest")
    return resized[:, 0].long()


class JointLoss(nn.Module):
    """Segmentation + classification loss with deep supervision and task balancing."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.mode = config.task_balance
        self.seg_weight = config.seg_weight
        self.cls_weight = config.cls_weight
        self.aux_weights = config.aux_weights
        self.label_smoothing = config.label_smoothing
        # s_seg, s_cls; zero means both tasks start at weight 1.
        self.log_variances = nn.Parameter(torch.zeros(2), requires_grad=self.mode == "uncertainty")

    def segmentation(self, out: JointOutput, seg_target: torch.Tensor) -> torch.Tensor:
        """Main head plus deep-supervision heads, normalised so the weights sum to one."""
        loss = segmentation_loss(out.seg_logits, seg_target)
        total_weight = 1.0
        for weight, aux in zip(self.aux_weights, out.aux_seg_logits, strict=True):
            aux_target = downsample_target(seg_target, aux.shape[2:])
            loss = loss + weight * segmentation_loss(aux, aux_target)
            total_weight += weight
        return loss / total_weight

    def forward(
        self, out: JointOutput, seg_target: torch.Tensor, cls_target: torch.Tensor
    ) -> LossTerms:
        seg = self.segmentation(out, seg_target)
        cls = F.cross_entropy(
            out.cls_logits.float(), cls_target.long(), label_smoothing=self.label_smoothing
        )
        if self.mode == "uncertainty":
            s = self.log_variances.clamp(LOG_VARIANCE_MIN, LOG_VARIANCE_MAX)
            weights = torch.exp(-s)
            total = weights[0] * seg + s[0] + weights[1] * cls + s[1]
            seg_w, cls_w = (float(w) for w in weights.detach())
        else:
            seg_w, cls_w = self.seg_weight, self.cls_weight
            total = seg_w * seg + cls_w * cls
        return LossTerms(total, seg.detach(), cls.detach(), seg_w, cls_w)
