"""ONNX export of a trained checkpoint: dynamic batch axis, opset 18, `onnx.checker`, a parity
check against PyTorch with ONNX Runtime, and the metadata the serving side needs (model,
version, preprocessing plan, class names, provenance), so the file is self-describing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ctjoint import contracts
from ctjoint.export.bundled import WEIGHTS_DIR, bundled_weights
from ctjoint.export.configs import RunConfig
from ctjoint.export.errors import OnnxExportError
from ctjoint.export.models import DeepSc3d, Jcs2d, JointNetwork
from ctjoint.export.train import model_from_checkpoint

logger = logging.getLogger(__name__)

OPSET = 18
PARITY_TOLERANCE = 1e-3
PARITY_BATCH = 2
PARITY_BATCHES = (1, 3)
TRAINED_ON_PHANTOMS = contracts.TRAINED_ON_PHANTOMS
__all__ = ["WEIGHTS_DIR", "bundled_weights", "export_network", "export_onnx"]


@dataclass(frozen=True)
class ExportReport:
    """Where the file went and how closely ONNX Runtime reproduces PyTorch."""

    path: Path
    opset: int
    seg_max_abs_diff: float
    cls_max_abs_diff: float
    size_bytes: int

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, opset {self.opset}); "
            f"parity vs PyTorch, max abs diff: seg_logits {self.seg_max_abs_diff:.2e}, "
            f"cls_logits {self.cls_max_abs_diff:.2e}"
        )


def input_shape(config: RunConfig, batch: int) -> tuple[int, ...]:
    """The contract shape of `image` for a configuration."""
    return config.plan.preprocessor().input_shape(batch)


def metadata(config: RunConfig, trained_on: str, temperature: str = "") -> dict[str, str]:
    """The contracts.ONNX_META_* properties of an exported model (the temperature JSON only
    for a calibrated checkpoint)."""
    calibration = {contracts.ONNX_META_TEMPERATURE: temperature} if temperature else {}
    return {
        **calibration,
        contracts.ONNX_META_MODEL: config.model,
        contracts.ONNX_META_VERSION: config.version,
        contracts.ONNX_META_PLAN: config.plan.to_json(),
        contracts.ONNX_META_CLASSES: json.dumps(list(contracts.CLASS_NAMES)),
        contracts.ONNX_META_SEG_CLASSES: json.dumps(list(contracts.SEG_CLASS_NAMES)),
        contracts.ONNX_META_TRAINED_ON: trained_on,
    }


class _WithCam(nn.Module):
    """The network's exported contract plus its optional `cam` output (same weights)."""

    def __init__(self, net: JointNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.net.forward_with_cam(image)


def _exported(net: nn.Module) -> tuple[nn.Module, list[str]]:
    """What is traced and its output names: with `cam` when the network can compute it."""
    names = [contracts.OUTPUT_SEG_LOGITS, contracts.OUTPUT_CLS_LOGITS]
    if isinstance(net, Jcs2d | DeepSc3d):
        return _WithCam(net).eval(), [*names, contracts.OUTPUT_CAM]
    return net, names


def _to_onnx(net: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter reports optional torchvision ops it skips and internal deprecations; they
    # are about torch itself, not this model, so they are kept out of the user's terminal.
    exporter_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced, output_names = _exported(net)
            program = torch.onnx.export(
                traced,
                (example,),
                dynamo=True,
                input_names=[contracts.INPUT_IMAGE],
                output_names=output_names,
                dynamic_shapes={"image": {0: batch}},
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many unrelated types
        raise OnnxExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    finally:
        exporter_log.setLevel(previous)
    if program is None:
        raise OnnxExportError("torch.onnx.export returned no program")
    return program.model_proto


def parity(
    net: nn.Module, session: ort.InferenceSession, config: RunConfig, batch: int, seed: int = 0
) -> tuple[float, float]:
    """Max abs differences (seg_logits, cls_logits) between PyTorch and ONNX Runtime on a
    random input of `batch` samples."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(input_shape(config, batch), generator=generator)
    with torch.no_grad():
        seg_ref, cls_ref = net(image)
    seg, cls = session.run(
        [contracts.OUTPUT_SEG_LOGITS, contracts.OUTPUT_CLS_LOGITS],
        {contracts.INPUT_IMAGE: image.numpy()},
    )
    if seg.shape != tuple(seg_ref.shape) or cls.shape != tuple(cls_ref.shape):
        raise OnnxExportError(
            f"ONNX outputs {seg.shape} / {cls.shape} differ in shape from PyTorch "
            f"{tuple(seg_ref.shape)} / {tuple(cls_ref.shape)}"
        )
    return (
        float(np.max(np.abs(seg - seg_ref.numpy()))),
        float(np.max(np.abs(cls - cls_ref.numpy()))),
    )


def _cam_parity(net: nn.Module, session: ort.InferenceSession, config: RunConfig) -> float:
    """Max abs difference of the `cam` output (0 for a network without one)."""
    if not isinstance(net, Jcs2d | DeepSc3d):
        return 0.0
    generator = torch.Generator().manual_seed(7)
    image = torch.randn(input_shape(config, PARITY_BATCHES[0]), generator=generator)
    with torch.no_grad():
        _, _, reference = _WithCam(net)(image)
    (cam,) = session.run([contracts.OUTPUT_CAM], {contracts.INPUT_IMAGE: image.numpy()})
    if cam.shape != tuple(reference.shape):
        raise OnnxExportError(f"ONNX cam {cam.shape} differs in shape from PyTorch's")
    return float(np.max(np.abs(cam - reference.numpy())))


def export_network(
    net: nn.Module,
    config: RunConfig,
    out: Path,
    *,
    trained_on: str = TRAINED_ON_PHANTOMS,
    tolerance: float = PARITY_TOLERANCE,
    temperature: str = "",
) -> ExportReport:
    """Export a network, check the graph, check parity, then (only then) write `out`."""
    net = net.eval()
    example = torch.zeros(input_shape(config, PARITY_BATCH))
    proto = _to_onnx(net, example)
    for key, value in metadata(config, trained_on, temperature).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "ctjoint"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise OnnxExportError(f"the exported graph fails onnx.checker: {err}") from err
    serialized = proto.SerializeToString()
    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    # Two batch sizes other than the traced one prove the batch axis is really dynamic.
    diffs = [parity(net, session, config, batch, seed=batch) for batch in PARITY_BATCHES]
    cam_diff = _cam_parity(net, session, config)
    seg_diff = max(d[0] for d in diffs)
    cls_diff = max(d[1] for d in diffs)
    logger.info("ONNX parity: seg %.3g, cls %.3g", seg_diff, cls_diff)
    if max(seg_diff, cls_diff, cam_diff) > tolerance:
        raise OnnxExportError(
            f"ONNX Runtime disagrees with PyTorch: max abs diff seg_logits {seg_diff:.3g}, "
            f"cls_logits {cls_diff:.3g}, cam {cam_diff:.3g} (tolerance {tolerance:g})"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target, then renamed: a served model directory never sees half a file.
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".onnx.tmp", delete=False) as handle:
        handle.write(serialized)
    os.replace(handle.name, out)
    return ExportReport(out, OPSET, seg_diff, cls_diff, len(serialized))


def export_onnx(model: str, weights: Path | None = None, out: Path | None = None) -> str:
    """Export a checkpoint (default: the bundled tiny weights) to ONNX (default:
    contracts.onnx_path(model)); returns a summary with the parity figures."""
    if model not in contracts.MODEL_NAMES:
        raise OnnxExportError(f"unknown model {model!r}; expected one of {contracts.MODEL_NAMES}")
    source = Path(weights) if weights is not None else bundled_weights(model)
    target = Path(out) if out is not None else contracts.onnx_path(model)
    net, config, checkpoint = model_from_checkpoint(source)
    if config.model != model:
        raise OnnxExportError(f"{source}: holds a {config.model} checkpoint, not {model}")
    temperature = checkpoint.get("temperature")
    report = export_network(
        net,
        config,
        target,
        temperature=json.dumps(temperature, sort_keys=True) if temperature else "",
    )
    return report.summary()
