"""deepsc3d: the DeepSC-COVID-style 3D joint network on whole scans.

Three subnets, as in the paper:
- cross-task feature subnet: a shared 3D residual encoder behind a strided stem (the stem
  halves every axis, which is what keeps the tiny configuration trainable on a CPU);
- 3D lesion segmentation subnet: an attention-gated decoder back to the stem's grid, whose
  logits are interpolated (trilinear) to the input grid and refined there by one small
  convolution that sees the image (lesion borders at input resolution, cheaply);
- classification subnet: re-weights the shared bottleneck by the segmentation-derived lesion
  attention (residual attention, x * (1 + a)), refines it with one convolution, and pools it
  uniformly and by attention; the decoder's last features pooled the same way and the lesion
  fractions per image half (bilateral vs unilateral, ground-glass vs consolidation) join it.

Input `image` [B, 1, D, H, W]; outputs `seg_logits` [B, 3, D, H, W] and `cls_logits` [B, 3].
The two tasks are balanced by the task-aware loss in `ctjoint.export.losses`.
"""

from __future__ import annotations

import torch
from torch import nn

from ctjoint.contracts import CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.export.configs import NetConfig
from ctjoint.export.models.blocks import (
    ClassifierHead,
    ConvNormAct,
    ResBlock,
    UpBlock,
    conv1x1,
    upsample_logits,
)
from ctjoint.export.models.joint import JointNet


class DeepSc3d(JointNet):
    """The 3D joint network; see the module docstring."""

    dims = 3

    def __init__(
        self,
        net: NetConfig,
        in_channels: int = 1,
        num_seg_classes: int = len(SEG_CLASS_NAMES),
        num_classes: int = len(CLASS_NAMES),
    ) -> None:
        super().__init__()
        widths = net.widths
        self.stem_stride = net.stem_stride
        self.deep_supervision = net.deep_supervision
        self.pool_factor = net.total_stride
        self.attention_prior = net.attention_prior
        # Cross-task feature subnet.
        self.stem = nn.Sequential(
            ConvNormAct(3, in_channels, widths[0], stride=net.stem_stride, norm=net.norm),
            ConvNormAct(3, widths[0], widths[0], norm=net.norm),
        )
        self.encoder = nn.ModuleList(
            ResBlock(3, widths[i - 1], widths[i], stride=2, norm=net.norm)
            for i in range(1, len(widths))
        )
        # Segmentation subnet: decoder[i] brings level i+1 up to level i.
        self.decoder = nn.ModuleList(
            UpBlock(3, widths[i + 1], widths[i], widths[i], norm=net.norm)
            for i in range(len(widths) - 1)
        )
        self.seg_head = conv1x1(3, widths[0], num_seg_classes)
        # Input-resolution refinement: a residual correction of the interpolated logits from
        # the logits and the image together, so borders follow the image, not the coarse grid.
        self.refine: nn.Module | None = None
        if net.refine_channels > 0:
            self.refine = nn.Sequential(
                ConvNormAct(3, in_channels + num_seg_classes, net.refine_channels, norm=net.norm),
                conv1x1(3, net.refine_channels, num_seg_classes),
            )
        self.aux_heads = nn.ModuleDict(
            {
                str(level): conv1x1(3, widths[level], num_seg_classes)
                for level in net.deep_supervision
            }
        )
        # Classification subnet.
        self.cls_refine = ConvNormAct(3, widths[-1], widths[-1], norm=net.norm)
        pooled = 2 * widths[-1] + 2 * widths[0] + 2 * (num_seg_classes - 1)
        self.classifier = ClassifierHead(pooled, net.cls_hidden, num_classes, net.dropout)

    def _segment(
        self, image: torch.Tensor, decoded: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Attention is read from the stem-grid logits, before upsampling and refinement.
        stem_logits = self.seg_head(decoded)
        seg_logits = upsample_logits(stem_logits, self.stem_stride, 3)
        if self.refine is not None:
            seg_logits = seg_logits + self.refine(torch.cat([image, seg_logits], dim=1))
        return seg_logits, stem_logits

    def _focus(self, bottleneck: torch.Tensor, coarse_attention: torch.Tensor) -> torch.Tensor:
        # Residual attention (x * (1 + a)) refined by one convolution.
        return self.cls_refine(bottleneck * (1.0 + coarse_attention))
