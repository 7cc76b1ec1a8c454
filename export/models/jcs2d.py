"""jcs2d: the JCS-style 2.5D joint network (shared encoder, attention-fused segmentation
decoder with deep supervision, lesion-attention classification head).

Input `image` [B, 3, H, W]: a slice and its two neighbours. Outputs `seg_logits` [B, 3, H, W]
(background, ground-glass, consolidation) and `cls_logits` [B, 3] (covid19, cap, normal) for
the slice. The scan label comes from the gateway's slice vote (gateway.aggregate).

Explainable classification (the JCS idea): the head pools the encoder bottleneck and the last
decoder feature map twice, once uniformly and once weighted by the predicted lesion
probability, so the class evidence is read where the lesions are and the lesion mask is the
explanation. The attention is detached: the classification loss trains the encoder through
the pooled features but cannot push the segmentation towards whatever helps classification.
"""

from __future__ import annotations

import torch
from torch import nn

from ctjoint.contracts import CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.export.configs import NetConfig
from ctjoint.export.models.blocks import (
    ClassifierHead,
    ResBlock,
    UpBlock,
    conv1x1,
)
from ctjoint.export.models.joint import JointNet


class Jcs2d(JointNet):
    """The 2.5D joint network; see the module docstring."""

    dims = 2

    def __init__(
        self,
        net: NetConfig,
        in_channels: int = 3,
        num_seg_classes: int = len(SEG_CLASS_NAMES),
        num_classes: int = len(CLASS_NAMES),
    ) -> None:
        super().__init__()
        widths = net.widths
        self.deep_supervision = net.deep_supervision
        self.pool_factor = net.total_stride
        self.attention_prior = net.attention_prior
        self.stem = ResBlock(2, in_channels, widths[0], norm=net.norm)
        self.encoder = nn.ModuleList(
            ResBlock(2, widths[i - 1], widths[i], stride=2, norm=net.norm)
            for i in range(1, len(widths))
        )
        # decoder[i] brings level i+1 up to level i; applied deepest first.
        self.decoder = nn.ModuleList(
            UpBlock(2, widths[i + 1], widths[i], widths[i], norm=net.norm)
            for i in range(len(widths) - 1)
        )
        self.seg_head = conv1x1(2, widths[0], num_seg_classes)
        self.aux_heads = nn.ModuleDict(
            {
                str(level): conv1x1(2, widths[level], num_seg_classes)
                for level in net.deep_supervision
            }
        )
        pooled = 2 * widths[-1] + 2 * widths[0] + 2 * (num_seg_classes - 1)
        self.classifier = ClassifierHead(pooled, net.cls_hidden, num_classes, net.dropout)

    def _segment(
        self, image: torch.Tensor, decoded: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seg_logits = self.seg_head(decoded)
        return seg_logits, seg_logits

    def _focus(self, bottleneck: torch.Tensor, coarse_attention: torch.Tensor) -> torch.Tensor:
        # The head reads the bottleneck as it is; the attention weights its pooling only.
        return bottleneck
