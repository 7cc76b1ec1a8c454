"""ONNX export: checker, parity with PyTorch, dynamic batch, self-describing metadata."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ctjoint import contracts
from ctjoint.export.configs import NetConfig, RunConfig, get_config
from ctjoint.export.errors import OnnxExportError
from ctjoint.export.models import build_model
from ctjoint.export.onnx_export import (
    PARITY_TOLERANCE,
    ExportReport,
    export_network,
    export_onnx,
)
from ctjoint.export.train import model_checkpoint, save_atomic
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.preprocess import PreprocessPlan


def small_config(model: str) -> RunConfig:
    base = get_config(model, "tiny")
    if model == "jcs2d":
        plan = PreprocessPlan.default(model, 32, 32)
        net = NetConfig(widths=(8, 16, 32), deep_supervision=(1,))
    else:
        plan = PreprocessPlan.default(model, 32, 32, 8)
        net = NetConfig(
            widths=(4, 8, 16), norm="instance", stem_stride=(2, 2, 2), deep_supervision=(1,)
        )
    train = dataclasses.replace(base.train, aux_weights=(0.5,))
    return dataclasses.replace(base, plan=plan, net=net, train=train)


@pytest.fixture(scope="module", params=contracts.MODEL_NAMES)
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, torch.nn.Module, ExportReport]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = small_config(request.param)
    net = build_model(config).eval()
    out = tmp_path_factory.mktemp("onnx") / f"{config.model}.onnx"
    return config, net, export_network(net, config, out)


def input_of(config: RunConfig, batch: int) -> np.ndarray:
    plan = config.plan
    grid = (
        (plan.height, plan.width) if plan.kind == "2.5d" else (plan.depth, plan.height, plan.width)
    )
    shape = (batch, plan.channels, *grid)
    return np.random.default_rng(batch).normal(size=shape).astype(np.float32)


def test_exported_graph_passes_the_onnx_checker(exported) -> None:
    _, _, report = exported
    model = onnx.load(report.path)
    onnx.checker.check_model(model, full_check=True)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17


def test_onnx_runtime_matches_pytorch_within_tolerance(exported) -> None:
    _, _, report = exported
    assert report.seg_max_abs_diff < PARITY_TOLERANCE
    assert report.cls_max_abs_diff < PARITY_TOLERANCE


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_axis_is_dynamic(exported, batch: int) -> None:
    config, net, report = exported
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    image = input_of(config, batch)
    seg, cls = session.run(
        [contracts.OUTPUT_SEG_LOGITS, contracts.OUTPUT_CLS_LOGITS], {contracts.INPUT_IMAGE: image}
    )
    with torch.no_grad():
        seg_ref, cls_ref = net(torch.from_numpy(image))
    assert seg.shape == (batch, len(contracts.SEG_CLASS_NAMES), *image.shape[2:])
    assert cls.shape == (batch, len(contracts.CLASS_NAMES))
    np.testing.assert_allclose(seg, seg_ref.numpy(), atol=PARITY_TOLERANCE)
    np.testing.assert_allclose(cls, cls_ref.numpy(), atol=PARITY_TOLERANCE)


def test_metadata_carries_the_preprocessing_plan(exported) -> None:
    config, _, report = exported
    meta = {p.key: p.value for p in onnx.load(report.path).metadata_props}
    assert PreprocessPlan.from_json(meta[contracts.ONNX_META_PLAN]) == config.plan
    assert meta[contracts.ONNX_META_MODEL] == config.model
    assert meta[contracts.ONNX_META_VERSION] == config.version
    assert json.loads(meta[contracts.ONNX_META_CLASSES]) == list(contracts.CLASS_NAMES)
    assert json.loads(meta[contracts.ONNX_META_SEG_CLASSES]) == list(contracts.SEG_CLASS_NAMES)
    assert "not for clinical use" in meta[contracts.ONNX_META_TRAINED_ON]


def test_embedded_backend_serves_the_exported_file(exported) -> None:
    config, _, report = exported

    async def info() -> object:
        backend = EmbeddedBackend((config.model,), model_dir=report.path.parent)
        async with backend:
            return backend.model_info(config.model)

    assert asyncio.run(info()).plan == config.plan  # type: ignore[attr-defined]


def test_export_from_a_checkpoint_reports_parity(tmp_path: Path) -> None:
    config = small_config("jcs2d")
    weights = tmp_path / "model.pt"
    save_atomic(model_checkpoint(build_model(config), config, {}, 0), weights)
    summary = export_onnx("jcs2d", weights, tmp_path / "out" / "jcs2d.onnx")
    assert "parity vs PyTorch" in summary
    assert (tmp_path / "out" / "jcs2d.onnx").is_file()


def test_export_refuses_a_checkpoint_of_the_other_model(tmp_path: Path) -> None:
    config = small_config("deepsc3d")
    weights = tmp_path / "model.pt"
    save_atomic(model_checkpoint(build_model(config), config, {}, 0), weights)
    with pytest.raises(OnnxExportError, match="holds a deepsc3d checkpoint, not jcs2d"):
        export_onnx("jcs2d", weights, tmp_path / "jcs2d.onnx")


def test_failed_parity_writes_no_file(tmp_path: Path) -> None:
    config = small_config("jcs2d")
    out = tmp_path / "jcs2d.onnx"
    with pytest.raises(OnnxExportError, match="ONNX Runtime disagrees with PyTorch"):
        export_network(build_model(config), config, out, tolerance=-1.0)
    assert not out.exists()
