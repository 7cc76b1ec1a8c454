"""The two joint networks: jcs2d (2.5D) and deepsc3d (3D), built from a `RunConfig`; their
shared forward/CAM skeleton is `JointNet` (export/models/joint.py)."""

from __future__ import annotations

from torch import nn

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.export.configs import RunConfig
from ctjoint.export.models.blocks import JointOutput
from ctjoint.export.models.deepsc3d import DeepSc3d
from ctjoint.export.models.jcs2d import Jcs2d
from ctjoint.export.models.joint import JointNet

JointNetwork = Jcs2d | DeepSc3d

__all__ = [
    "DeepSc3d",
    "Jcs2d",
    "JointNet",
    "JointNetwork",
    "JointOutput",
    "build_model",
    "count_parameters",
]


def build_model(config: RunConfig) -> JointNetwork:
    """The network a configuration describes (freshly initialised)."""
    if config.model == MODEL_JCS2D:
        return Jcs2d(config.net, in_channels=config.plan.channels)
    if config.model == MODEL_DEEPSC3D:
        return DeepSc3d(config.net, in_channels=config.plan.channels)
    raise ValueError(f"unknown model {config.model!r}")


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
