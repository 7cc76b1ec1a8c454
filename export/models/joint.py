"""The skeleton both joint networks share: encoder, decoder with deep supervision, a
lesion-attention classification head, Grad-CAM, and the exported forward contract.

A network supplies its modules (`stem`, `encoder`, `decoder`, `aux_heads`, `classifier`) and
two steps: `_segment` (the seg logits from the decoder, and the logits lesion attention is
read from) and `_focus` (the features the head looks at, from the bottleneck). Everything
else is one implementation here, so the 2.5D and 3D networks cannot drift apart.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ctjoint.export.models.blocks import (
    LESION_FRACTION_SCALE,
    ClassifierHead,
    JointOutput,
    attention_pool,
    global_pool,
    grad_cam,
    lesion_statistics,
)


class JointNet(nn.Module, abc.ABC):
    """A joint segmentation + classification network (see the module docstring)."""

    # Spatial dimensions of the input: 2 (slices) or 3 (volumes).
    dims: ClassVar[int]
    stem: nn.Module
    encoder: nn.ModuleList
    decoder: nn.ModuleList
    aux_heads: nn.ModuleDict
    classifier: ClassifierHead
    deep_supervision: tuple[int, ...]
    pool_factor: int
    attention_prior: float

    @abc.abstractmethod
    def _segment(
        self, image: torch.Tensor, decoded: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(seg logits on the input grid, logits the lesion attention is computed from)."""

    @abc.abstractmethod
    def _focus(self, bottleneck: torch.Tensor, coarse_attention: torch.Tensor) -> torch.Tensor:
        """The coarse features the classification head pools (and Grad-CAM explains)."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported contract: (`seg_logits`, `cls_logits`)."""
        out = self.forward_all(image)
        return out.seg_logits, out.cls_logits

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
        seg_logits, attention_logits = self._segment(image, x)

        # Detached: the lesion mask explains the class; the class loss does not bend the mask.
        attention, fractions = lesion_statistics(attention_logits.detach())
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        coarse_attention = pool(attention, kernel_size=self.pool_factor)
        focused = self._focus(bottleneck, coarse_attention)
        features = torch.cat(
            [
                global_pool(focused),
                attention_pool(focused, coarse_attention, self.attention_prior),
                global_pool(x),
                attention_pool(x, attention, self.attention_prior),
                fractions * LESION_FRACTION_SCALE,
            ],
            dim=1,
        )
        aux_logits = tuple(aux[level] for level in self.deep_supervision)
        cls_logits = self.classifier(features)
        activation = (
            grad_cam(self.classifier, features, focused, coarse_attention, self.attention_prior)
            if cam
            else None
        )
        return JointOutput(seg_logits, cls_logits, aux_logits), activation


__all__ = ["JointNet"]
