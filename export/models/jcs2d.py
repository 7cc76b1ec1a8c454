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
import torch.nn.functional as F
from torch import nn

from ctjoint.contracts import CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.export.configs import NetConfig
from ctjoint.export.models.blocks import (
    LESION_FRACTION_SCALE,
    ClassifierHead,
    JointOutput,
    ResBlock,
    UpBlock,
    attention_pool,
    conv1x1,
    global_pool,
    grad_cam,
    lesion_statistics,
)


class Jcs2d(nn.Module):
    """The 2.5D joint network; see the module docstring."""

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

    def forward_all(self, image: torch.Tensor) -> JointOutput:
        """Both outputs plus the deep-supervision logits (training)."""
        return self._run(image, cam=False)[0]

    def forward_with_cam(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exported contract with the optional `cam` output: (`seg_logits`, `cls_logits`,
        Grad-CAM of the predicted class on the head's coarse feature grid)."""
        out, cam = self._run(image, cam=True)
        if cam is None:
            raise RuntimeError("no class activation map was computed")
        return out.seg_logits, out.cls_logits, cam

    def _run(self, image: torch.Tensor, *, cam: bool) -> tuple[JointOutput, torch.Tensor | None]:
        skips = [self.stem(image)]
        for block in self.encoder:
            skips.append(block(skips[-1]))
        bottleneck = skips[-1]
        x = bottleneck
        aux: dict[int, torch.Tensor] = {}
        for level in range(len(self.decoder) - 1, -1, -1):
            x = self.decoder[level](x, skips[level])
            if str(level) in self.aux_heads:
                aux[level] = self.aux_heads[str(level)](x)
        seg_logits = self.seg_head(x)

        attention, fractions = lesion_statistics(seg_logits.detach())
        coarse_attention = F.avg_pool2d(attention, kernel_size=self.pool_factor)
        features = torch.cat(
            [
                global_pool(bottleneck),
                attention_pool(bottleneck, coarse_attention, self.attention_prior),
                global_pool(x),
                attention_pool(x, attention, self.attention_prior),
                fractions * LESION_FRACTION_SCALE,
            ],
            dim=1,
        )
        aux_logits = tuple(aux[level] for level in self.deep_supervision)
        cls_logits = self.classifier(features)
        activation = (
            grad_cam(
                self.classifier,
                features,
                bottleneck,
                coarse_attention,
                self.attention_prior,
            )
            if cam
            else None
        )
        return JointOutput(seg_logits, cls_logits, aux_logits), activation

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported contract: (`seg_logits`, `cls_logits`)."""
        out = self.forward_all(image)
        return out.seg_logits, out.cls_logits
