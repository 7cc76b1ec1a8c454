"""Tiny ONNX models that follow the tensor contract, exported from trivial torch modules.

They stand in for the trained networks in pipeline tests: no weights, fully predictable.
Segmentation is a HU band rule on the centre slice: ground-glass where -750 < HU < -450,
consolidation where -350 < HU < -150 (test series put their lesions there), background
elsewhere. Classification follows the lesion fraction: COVID-19 when ground-glass dominates,
CAP when consolidation does, normal when the slice (volume) is nearly lesion-free.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch

from ctjoint.contracts import (
    CLASS_NAMES,
    INPUT_IMAGE,
    MODEL_DEEPSC3D,
    ONNX_META_CLASSES,
    ONNX_META_MODEL,
    ONNX_META_PLAN,
    ONNX_META_SEG_CLASSES,
    ONNX_META_TRAINED_ON,
    ONNX_META_VERSION,
    OUTPUT_CLS_LOGITS,
    OUTPUT_SEG_LOGITS,
    SEG_CLASS_NAMES,
)
from ctjoint.gateway.preprocess import PreprocessPlan

GROUND_GLASS_BAND = (-750.0, -450.0)
CONSOLIDATION_BAND = (-350.0, -150.0)
VERSION = "test-contract-1"


class BandRule(torch.nn.Module):
    """HU band rule on the normalised centre channel; `gain` scales lesion fractions."""

    def __init__(self, plan: PreprocessPlan, gain: float) -> None:
        super().__init__()
        self.plan = plan
        self.gain = gain
        self.channel = plan.channels // 2

    def _normalised(self, hu: float) -> float:
        low = self.plan.window_center - self.plan.window_width / 2
        scaled = min(max((hu - low) / self.plan.window_width, 0.0), 1.0)
        return (scaled - self.plan.norm_mean) / self.plan.norm_std

    def _band_logit(self, x: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
        lo, hi = (self._normalised(v) for v in band)
        # Positive inside the band, negative outside, steep enough to be a crisp mask.
        return 200.0 * torch.minimum(x - lo, hi - x)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centre = image[:, self.channel : self.channel + 1]
        ground_glass = self._band_logit(centre, GROUND_GLASS_BAND)
        consolidation = self._band_logit(centre, CONSOLIDATION_BAND)
        seg = torch.cat([torch.zeros_like(centre), ground_glass, consolidation], dim=1)
        dims = tuple(range(2, seg.dim()))
        gg_frac = torch.sigmoid(ground_glass).mean(dim=dims)
        cons_frac = torch.sigmoid(consolidation).mean(dim=dims)
        cls = torch.cat(
            [self.gain * gg_frac, self.gain * cons_frac, torch.ones_like(gg_frac)], dim=1
        )
        return seg, cls


def plan_for(model: str, size: int = 32, depth: int = 8) -> PreprocessPlan:
    return PreprocessPlan.default(model, height=size, width=size, depth=depth)


def export_contract_model(model: str, out_dir: Path, *, size: int = 32, depth: int = 8) -> Path:
    """Export the band-rule stand-in for `model` to out_dir/<model>.onnx with its metadata."""
    plan = plan_for(model, size, depth)
    # Confident on lesion slices, like a trained network (the scan vote needs it).
    module = BandRule(plan, gain=200.0).eval()
    if model == MODEL_DEEPSC3D:
        example = torch.zeros(1, 1, depth, size, size)
    else:
        example = torch.zeros(2, plan.channels, size, size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model}.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export but is much faster
        # for a module this small, and the file it writes is what we need.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_IMAGE],
            output_names=[OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS],
            dynamic_axes={
                INPUT_IMAGE: {0: "batch"},
                OUTPUT_SEG_LOGITS: {0: "batch"},
                OUTPUT_CLS_LOGITS: {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    metadata = {
        ONNX_META_MODEL: model,
        ONNX_META_VERSION: VERSION,
        ONNX_META_PLAN: plan.to_json(),
        ONNX_META_CLASSES: json.dumps(list(CLASS_NAMES)),
        ONNX_META_SEG_CLASSES: json.dumps(list(SEG_CLASS_NAMES)),
        ONNX_META_TRAINED_ON: "nothing (test stand-in)",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path
