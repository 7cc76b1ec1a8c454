"""Layers shared by the 2D and 3D joint networks, written once for both dimensionalities.

Every block takes `dims` (2 or 3) and builds the matching Conv/Norm layers, so jcs2d and
deepsc3d differ in topology only. Everything here exports to ONNX with a dynamic batch axis:
no data-dependent pooling sizes, upsampling by fixed scale factors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ctjoint.export.configs import NormKind

Stride = int | tuple[int, ...]


def conv_nd(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: Stride = 1,
    bias: bool = True,
) -> nn.Module:
    """A 2D or 3D convolution with "same" padding for odd kernels."""
    padding = kernel_size // 2
    if dims == 2:
        s2 = (stride, stride) if isinstance(stride, int) else (stride[0], stride[1])
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=s2, padding=padding, bias=bias
        )
    if dims == 3:
        s3 = (stride,) * 3 if isinstance(stride, int) else (stride[0], stride[1], stride[2])
        return nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=s3, padding=padding, bias=bias
        )
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def make_norm(kind: NormKind, channels: int, dims: int) -> nn.Module:
    """A normalisation layer. Batch norm for big 2D batches; instance or group norm for the
    3D model, whose batches of two or four volumes make batch statistics too noisy."""
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)
    if kind == "instance":
        if dims == 2:
            return nn.InstanceNorm2d(channels, affine=True)
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}")


def conv1x1(dims: int, in_channels: int, out_channels: int, bias: bool = True) -> nn.Module:
    """A pointwise convolution (projection or prediction head)."""
    return conv_nd(dims, in_channels, out_channels, kernel_size=1, bias=bias)


class ConvNormAct(nn.Sequential):
    """Convolution (no bias: the norm has one) -> norm -> leaky ReLU."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: Stride = 1,
        norm: NormKind = "batch",
        act: bool = True,
    ) -> None:
        conv = conv_nd(dims, in_channels, out_channels, kernel_size, stride, bias=False)
        layers: list[nn.Module] = [conv, make_norm(norm, out_channels, dims)]
        if act:
            layers.append(nn.LeakyReLU(0.01, inplace=True))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut; the first may stride."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        stride: Stride = 1,
        norm: NormKind = "batch",
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(dims, in_channels, out_channels, stride=stride, norm=norm)
        self.conv2 = ConvNormAct(dims, out_channels, out_channels, norm=norm, act=False)
        strided = stride != 1 and stride != (1,) * dims
        self.shortcut: nn.Module
        if in_channels != out_channels or strided:
            self.shortcut = nn.Sequential(
                conv_nd(dims, in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                make_norm(norm, out_channels, dims),
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al., Attention U-Net).

    The coarser decoder feature `gate` decides, per skip position, how much of the encoder's
    skip feature passes: lesion-relevant regions are kept, the rest of the thorax is damped.
    This is the "attention fusion" of skip features in the JCS decoder.
    """

    def __init__(self, dims: int, skip_channels: int, gate_channels: int, inter: int) -> None:
        super().__init__()
        self.dims = dims
        self.theta = conv1x1(dims, skip_channels, inter, bias=False)
        self.phi = conv1x1(dims, gate_channels, inter, bias=True)
        self.psi = conv1x1(dims, inter, 1, bias=True)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # The gate is already upsampled to the skip's grid by the caller.
        energy = F.relu(self.theta(skip) + self.phi(gate))
        alpha = torch.sigmoid(self.psi(energy))
        return skip * alpha


def upsample(x: torch.Tensor, scale: Stride, dims: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by a fixed factor per axis (static, export-friendly)."""
    factor = (float(scale),) * dims if isinstance(scale, int) else tuple(float(s) for s in scale)
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def upsample_logits(x: torch.Tensor, scale: Stride, dims: int) -> torch.Tensor:
    """Smooth (bi/trilinear) upsampling of logits by a fixed factor per axis."""
    factor = (float(scale),) * dims if isinstance(scale, int) else tuple(float(s) for s in scale)
    if all(f == 1.0 for f in factor):
        return x
    mode = "bilinear" if dims == 2 else "trilinear"
    return F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)


class UpBlock(nn.Module):
    """Decoder step: upsample the deeper feature, gate the skip with it, fuse both."""

    def __init__(
        self,
        dims: int,
        deep_channels: int,
        skip_channels: int,
        out_channels: int,
        scale: Stride = 2,
        norm: NormKind = "batch",
    ) -> None:
        super().__init__()
        self.dims = dims
        self.scale = scale
        self.reduce = ConvNormAct(dims, deep_channels, skip_channels, kernel_size=1, norm=norm)
        self.gate = AttentionGate(dims, skip_channels, skip_channels, max(skip_channels // 2, 4))
        self.fuse = ResBlock(dims, 2 * skip_channels, out_channels, norm=norm)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = upsample(self.reduce(deep), self.scale, self.dims)
        gated = self.gate(skip, up)
        return self.fuse(torch.cat([up, gated], dim=1))


def spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of an [N, C, ...] tensor."""
    return tuple(range(2, x.dim()))


# Keeps attention pooling finite on slices without lesion attention (grad_cam repeats it).
ATTENTION_EPS = 1e-3


def spatial_size(x: torch.Tensor) -> int:
    """Number of positions on the spatial grid of an [N, C, ...] tensor (static in export)."""
    count = 1
    for axis in spatial_dims(x):
        count *= int(x.shape[axis])
    return count


def attention_denominator(mass: torch.Tensor, count: int, prior: float) -> torch.Tensor:
    """Normaliser of attention pooling: the attention mass plus a prior mass of `prior` times
    the grid size. Without the prior, a few stray false-positive pixels would yield pooled
    features as strong as a real lesion's; with it, evidence fades in with lesion size."""
    return mass + (ATTENTION_EPS + prior * count)


def attention_pool(
    features: torch.Tensor, attention: torch.Tensor, prior: float = 0.0
) -> torch.Tensor:
    """Average of `features` [N,C,...] weighted by `attention` [N,1,...] on the same grid,
    shrunk towards zero when the attention mass is small next to `prior` x grid size.

    A scan with no lesion attention at all falls back to (nearly) zero, which the head learns
    to read as "nothing to look at" together with the lesion-mass features.
    """
    axes = spatial_dims(features)
    weighted = (features * attention).sum(dim=axes)
    mass = attention.sum(dim=axes)
    return weighted / attention_denominator(mass, spatial_size(features), prior)


def global_pool(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling as a mean over the spatial axes (no adaptive pooling op)."""
    return features.mean(dim=spatial_dims(features))


class ClassifierHead(nn.Module):
    """MLP from pooled features to the three class logits."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def grad_cam(
    head: ClassifierHead,
    features: torch.Tensor,
    maps: torch.Tensor,
    attention: torch.Tensor,
    prior: float = 0.0,
) -> torch.Tensor:
    """Grad-CAM of every class on `maps` [N, C, ...], computed in the graph: [N, K, ...].

    Every class, not just each sample's argmax: a 2.5D scan's label comes from many slices, and
    the map to show is that label's, whatever one slice alone would have predicted.

    `maps` must enter the head as the first 2C features: `global_pool(maps)` then
    `attention_pool(maps, attention, prior)` (both networks build their features that way). The
    head is Linear -> LeakyReLU -> Dropout -> Linear, so the gradient of the class logit with
    respect to the features is analytic: W1^T (slope(h) * W2[c]). Grad-CAM's channel weights
    are the spatial mean of the logit's gradient with respect to the maps, which for those two
    poolings is g_mean / n + g_attention * (sum(a) / denominator) / n. The map is then
    ReLU(sum_k weight_k * maps_k) per class (Selvaraju et al., ICCV 2017), without autograd, so
    it exports to ONNX with the rest of the network.
    """
    first, activation, _, last = head.net
    if not (
        isinstance(first, nn.Linear)
        and isinstance(activation, nn.LeakyReLU)
        and isinstance(last, nn.Linear)
    ):
        raise TypeError(
            "grad_cam expects the ClassifierHead layout Linear-LeakyReLU-Dropout-Linear"
        )
    hidden = first(features)
    slope = torch.where(
        hidden > 0, torch.ones_like(hidden), torch.full_like(hidden, activation.negative_slope)
    )
    # d logit_k / d features for every class k: [N, K, F].
    grad_features = (last.weight.unsqueeze(0) * slope.unsqueeze(1)) @ first.weight
    channels = maps.shape[1]
    axes = spatial_dims(maps)
    count = spatial_size(maps)
    mass = attention.sum(dim=axes)  # [N, 1]
    share = (mass / attention_denominator(mass, count, prior)).unsqueeze(1)  # [N, 1, 1]
    weights = (
        grad_features[:, :, :channels] / count
        + grad_features[:, :, channels : 2 * channels] * share / count
    )  # [N, K, C]
    shaped = weights.reshape(*weights.shape, *([1] * len(axes)))
    return torch.relu((shaped * maps.unsqueeze(1)).sum(dim=2))


class JointOutput(NamedTuple):
    """What a joint network computes in training: the exported pair plus auxiliary logits."""

    seg_logits: torch.Tensor
    cls_logits: torch.Tensor
    aux_seg_logits: tuple[torch.Tensor, ...]


def lesion_statistics(seg_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lesion attention and lesion fractions from segmentation logits [N, K, ..., X].

    Returns the attention [N, 1, ..., X] (1 - P(background)) and, for each half of the image
    along its last axis (the patient's right-left axis on the gateway's grid), the mean
    probability of each lesion class: [N, 2 * (K - 1)]. The halves let the head tell
    bilateral disease (COVID-19) from unilateral disease (typical CAP) and ground-glass from
    consolidation, the discriminating findings DeepSC-COVID reports.
    """
    probs = torch.softmax(seg_logits, dim=1)
    attention = 1.0 - probs[:, :1]
    axes = tuple(range(2, seg_logits.dim()))
    halves = torch.chunk(probs[:, 1:], 2, dim=-1)
    return attention, torch.cat([half.mean(dim=axes) for half in halves], dim=1)


# Lesion fractions are a few percent of an image; scaled so the MLP sees values near 1.
LESION_FRACTION_SCALE = 10.0
