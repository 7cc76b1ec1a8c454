"""Temperature scaling of both heads of a trained network, fitted on the validation split.

A network trained to near-zero loss on phantoms is over-confident on scans unlike them; one
scalar per head (Guo et al., 2017) that divides the logits restores honest probabilities
without changing a single argmax. The classification temperature is fitted on the scan-level
probabilities the product reports (for jcs2d: after the gateway's slice vote), the
segmentation temperature on a uniform sample of voxels. A validation split the network
separates without a doubt gives no finite fit (the likelihood grows as the temperature falls):
then the classification temperature is fitted against Platt's prior-corrected targets
(Platt, 1999), which a finite temperature can reach. Both are stored in the checkpoint
(`temperature`), exported as ONNX metadata and applied by every backend
(`gateway.backends.base.Temperature`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ctjoint.contracts import CLASS_NAMES
from ctjoint.export.configs import RunConfig
from ctjoint.export.dataset import CaseCache, PreparedCase, context_window, discover_cases
from ctjoint.export.models import JointNetwork
from ctjoint.export.train import (
    ENV_CACHE_DIR,
    PREDICT_BATCH,
    TrainingError,
    load_checkpoint,
    model_from_checkpoint,
    save_atomic,
)
from ctjoint.gateway.aggregate import softmax
from ctjoint.gateway.backends.base import Temperature
from ctjoint.gateway.preprocess import PREPROCESSORS

# log-space search range of a temperature: wide enough for any sane network.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# The classification NLL at the lower bound no higher than at the fit (within this much):
# it falls all the way down, so the fit has no finite optimum.
SEPARABLE_NLL = 1e-6
SEG_VOXELS_PER_CASE = 4000
EPS = 1e-7


@dataclass(frozen=True)
class CaseLogits:
    """What calibration needs of one case: scan-level logits and a voxel sample."""

    label: int
    cls_logits: np.ndarray  # [Z, 3] slice logits (2.5D) or [1, 3] (3D)
    seg_logits: np.ndarray  # [N, K] sampled voxels
    seg_truth: np.ndarray  # [N]


@dataclass(frozen=True)
class CalibrationFit:
    """Fitted temperatures and the validation NLL before (T = 1) and after."""

    temperature: Temperature
    cls_nll: tuple[float, float]
    seg_nll: tuple[float, float]
    cases: int
    # The classification NLL fell all the way to the lower bound (validation separated), so
    # the temperature was fitted against Platt's targets instead (`platt_targets`).
    cls_separable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "cls": self.temperature.cls,
            "seg": self.temperature.seg,
            "fitted_on": f"validation split ({self.cases} cases)",
            "cls_target": "platt" if self.cls_separable else "labels",
            "cls_nll_before_after": list(self.cls_nll),
            "seg_nll_before_after": list(self.seg_nll),
        }


def scan_probabilities(cls_logits: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Scan probabilities [3] exactly as the gateway computes them, at a temperature."""
    probs = softmax(np.asarray(cls_logits, np.float64) / temperature, axis=1)
    return PREPROCESSORS[kind].scan_probabilities(probs)[0]


@torch.no_grad()
def case_logits(
    net: JointNetwork, case: PreparedCase, config: RunConfig, rng: np.random.Generator
) -> CaseLogits:
    """Run the network over one prepared case on the model grid (on the device its weights
    are on)."""
    net.eval()
    device = next(net.parameters()).device
    plan = config.plan
    if plan.preprocessor().per_slice:
        cls_parts, seg_parts = [], []
        for start in range(0, len(case.image), PREDICT_BATCH):
            stop = min(start + PREDICT_BATCH, len(case.image))
            stack = np.stack(
                [context_window(case.image, z, plan.context) for z in range(start, stop)]
            )
            seg, cls = net(torch.from_numpy(stack.astype(np.float32)).to(device))
            cls_parts.append(cls.float().cpu().numpy())
            seg_parts.append(seg.float().cpu().numpy())
        cls_logits = np.concatenate(cls_parts)
        seg_all = np.concatenate(seg_parts)  # [Z, K, H, W]
    else:
        image = torch.from_numpy(case.image.astype(np.float32))[None, None].to(device)
        seg, cls = net(image)
        cls_logits = cls.float().cpu().numpy()
        seg_all = seg.float().cpu().numpy()[0][None]  # [1, K, D, H, W] -> K first after moveaxis
    flat = np.moveaxis(seg_all, 1, -1).reshape(-1, seg_all.shape[1])
    truth = case.labels.reshape(-1)
    pick = rng.choice(len(flat), size=min(SEG_VOXELS_PER_CASE, len(flat)), replace=False)
    return CaseLogits(case.label, cls_logits, flat[pick], truth[pick].astype(np.int64))


def _cls_nll(
    cases: Sequence[CaseLogits], kind: str, temperature: float, targets: np.ndarray | None = None
) -> float:
    """Mean cross-entropy of the scan probabilities against `targets` [cases, classes]
    (default: each case's label)."""
    probs = np.stack([scan_probabilities(c.cls_logits, kind, temperature) for c in cases])
    if targets is None:
        targets = np.eye(probs.shape[1])[[c.label for c in cases]]
    return float(-np.mean(np.sum(targets * np.log(np.clip(probs, EPS, 1.0)), axis=1)))


def platt_targets(labels: Sequence[int], classes: int) -> np.ndarray:
    """[cases, classes] soft targets: a case of a class with n validation cases gets
    (n + 1) / (n + 2) on its class and the rest shared by the others (Platt's prior
    correction, which keeps a fit on a handful of cleanly separated cases from concluding
    that the network is never wrong)."""
    index = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(index, minlength=classes).astype(np.float64)
    own = (counts[index] + 1.0) / (counts[index] + 2.0)
    targets = np.repeat(((1.0 - own) / (classes - 1))[:, None], classes, axis=1)
    targets[np.arange(len(index)), index] = own
    return targets


def _seg_nll(logits: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    probs = softmax(logits / temperature, axis=1)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(truth)), truth], EPS, 1.0))))


def _fit(objective: Any) -> float:
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda t: objective(math.exp(t)), bounds=(lo, hi), method="bounded")
    return float(math.exp(result.x))


def fit_temperature(cases: Sequence[CaseLogits], kind: str) -> CalibrationFit:
    """Temperatures minimising the validation negative log-likelihood of each head."""
    if not cases:
        raise TrainingError("calibration needs at least one validation case")
    seg_logits = np.concatenate([c.seg_logits for c in cases]).astype(np.float64)
    seg_truth = np.concatenate([c.seg_truth for c in cases])
    t_cls = _fit(lambda t: _cls_nll(cases, kind, t))
    lowest = _cls_nll(cases, kind, TEMPERATURE_BOUNDS[0])
    separable = lowest <= _cls_nll(cases, kind, t_cls) + SEPARABLE_NLL
    if separable:
        targets = platt_targets([c.label for c in cases], len(CLASS_NAMES))
        t_cls = _fit(lambda t: _cls_nll(cases, kind, t, targets))
    t_seg = _fit(lambda t: _seg_nll(seg_logits, seg_truth, t))
    return CalibrationFit(
        temperature=Temperature(cls=round(t_cls, 4), seg=round(t_seg, 4)),
        cls_nll=(_cls_nll(cases, kind, 1.0), _cls_nll(cases, kind, t_cls)),
        seg_nll=(_seg_nll(seg_logits, seg_truth, 1.0), _seg_nll(seg_logits, seg_truth, t_seg)),
        cases=len(cases),
        cls_separable=separable,
    )


def calibrate_network(
    net: JointNetwork, config: RunConfig, val_cases: Sequence[PreparedCase], seed: int = 0
) -> CalibrationFit:
    """Fit both temperatures of a network on prepared validation cases."""
    rng = np.random.default_rng(seed)
    logits = [case_logits(net, case, config, rng) for case in val_cases]
    return fit_temperature(logits, config.plan.kind)


def calibrate_checkpoint(
    weights: Path, data_dir: Path, out: Path | None = None, threads: int = 2
) -> str:
    """Fit the temperatures of a checkpoint on a data set's validation split and store them
    in the checkpoint (`out`, default: in place); returns a summary."""
    torch.set_num_threads(threads)
    source = Path(weights)
    net, config, _ = model_from_checkpoint(source)
    refs = discover_cases(data_dir, "val")
    if not refs:
        raise TrainingError(f"{data_dir}: no validation cases (split 'val') to calibrate on")
    cache_root = Path(os.environ.get(ENV_CACHE_DIR) or source.parent / "cache")
    cases = CaseCache(cache_root, config.plan).get_many(refs)
    fit = calibrate_network(net, config, cases)
    data = load_checkpoint(source)
    data["temperature"] = {"cls": fit.temperature.cls, "seg": fit.temperature.seg}
    data["calibration"] = fit.to_dict()
    target = Path(out) if out is not None else source
    save_atomic(data, target)
    separable = " (validation separated: fitted to Platt's targets)" if fit.cls_separable else ""
    return (
        f"{config.model}: temperature cls {fit.temperature.cls:.3f}{separable}, "
        f"seg {fit.temperature.seg:.3f} "
        f"(validation NLL cls {fit.cls_nll[0]:.3f} -> {fit.cls_nll[1]:.3f}, seg "
        f"{fit.seg_nll[0]:.4f} -> {fit.seg_nll[1]:.4f}, {fit.cases} cases); wrote {target}"
    )


__all__ = [
    "CalibrationFit",
    "CaseLogits",
    "calibrate_checkpoint",
    "calibrate_network",
    "fit_temperature",
    "platt_targets",
    "scan_probabilities",
]
