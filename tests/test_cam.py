"""Class activation maps: the in-graph Grad-CAM equals autograd's, and both networks return it
beside the unchanged contract outputs."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from inprocess_gateway import scan_in_process
from test_render import decode_png

from ctjoint.client.render import write_overlay_png
from ctjoint.contracts import (
    MODEL_JCS2D,
    OUTPUT_CAM,
    OUTPUT_CLS_LOGITS,
    OUTPUT_SEG_LOGITS,
    onnx_path,
)
from ctjoint.export.configs import get_config
from ctjoint.export.models import build_model
from ctjoint.export.models.blocks import ClassifierHead, attention_pool, global_pool, grad_cam
from ctjoint.export.onnx_export import export_network
from ctjoint.gateway.analysis import analyze_directory, cam_on_source
from ctjoint.render import CAM_COLOUR
from ctjoint.v1 import scan_pb2


@pytest.mark.parametrize("grid", [(6, 5), (3, 4, 5)])
def test_grad_cam_equals_autograd(grid: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    head = ClassifierHead(2 * 8 + 4, 16, 3, dropout=0.0).eval()
    maps = torch.randn(2, 8, *grid, requires_grad=True)
    attention = torch.rand(2, 1, *grid)
    extra = torch.randn(2, 4)
    features = torch.cat([global_pool(maps), attention_pool(maps, attention), extra], dim=1)
    logits = head(features)
    axes = tuple(range(2, maps.dim()))
    expected = []
    for k in range(logits.shape[1]):
        (gradient,) = torch.autograd.grad(logits[:, k].sum(), maps, retain_graph=True)
        weights = gradient.mean(dim=axes, keepdim=True)
        expected.append(torch.relu((weights * maps).sum(dim=1)))
    with torch.no_grad():
        cam = grad_cam(head, features, maps, attention)
    torch.testing.assert_close(cam, torch.stack(expected, dim=1).detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "shape"), [("jcs2d", (2, 3, 64, 64)), ("deepsc3d", (1, 1, 16, 32, 32))]
)
def test_networks_return_the_cam_beside_unchanged_outputs(
    model: str, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(1)
    net = build_model(get_config(model, "tiny")).eval()
    image = torch.randn(*shape)
    with torch.no_grad():
        seg, cls = net(image)
        seg_cam, cls_cam, cam = net.forward_with_cam(image)
    torch.testing.assert_close(seg_cam, seg)
    torch.testing.assert_close(cls_cam, cls)
    assert cam.shape[:2] == (shape[0], 3) and cam.dim() == len(shape)
    assert bool((cam >= 0).all())


@pytest.fixture(scope="module")
def cam_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny (untrained) jcs2d exported with its `cam` output; the parity check covers it."""
    folder = tmp_path_factory.mktemp("cam_model")
    config = get_config(MODEL_JCS2D, "tiny")
    torch.manual_seed(3)
    export_network(build_model(config), config, onnx_path(MODEL_JCS2D, folder))
    return folder


def test_the_exported_model_has_the_optional_cam_output(cam_model_dir: Path) -> None:
    session = ort.InferenceSession(str(onnx_path(MODEL_JCS2D, cam_model_dir)))
    names = [o.name for o in session.get_outputs()]
    assert names == [OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS, OUTPUT_CAM]


def test_analysis_maps_the_cam_onto_the_source_grid_and_draws_it(
    cam_model_dir: Path, ct_series_dir: Path, tmp_path: Path
) -> None:
    analysis = analyze_directory(ct_series_dir, model=MODEL_JCS2D, model_dir=cam_model_dir)
    assert analysis.cam is not None
    assert analysis.cam.shape[0] == analysis.volume.shape[0]
    heat = cam_on_source(analysis.cam, analysis.volume.shape)
    assert heat.shape == analysis.volume.shape and heat.dtype == np.uint8
    assert 0 < heat.max() <= 255
    np.testing.assert_array_equal(
        cam_on_source(analysis.cam, analysis.volume.shape, [2]), heat[2:3]
    )
    png = tmp_path / "overlay.png"
    write_overlay_png(analysis.volume_hu, analysis.label_map, png, cam=heat)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_models_without_a_cam_output_still_serve(
    contract_model_dir: Path, ct_series_dir: Path
) -> None:
    analysis = analyze_directory(ct_series_dir, model=MODEL_JCS2D, model_dir=contract_model_dir)
    assert analysis.cam is None


def test_the_gateway_returns_the_cam_on_request_and_draws_it(
    cam_model_dir: Path, ct_series_dir: Path
) -> None:
    files = [p.read_bytes() for p in sorted(ct_series_dir.iterdir())]
    outputs = scan_pb2.OutputOptions(cam=True, overlay=True)
    message = scan_in_process(files, cam_model_dir, outputs=outputs)
    shape = tuple(message.cam.shape)
    assert shape == (message.geometry.slices, message.geometry.rows, message.geometry.columns)
    heat = np.frombuffer(zlib.decompress(message.cam.data), dtype=np.uint8).reshape(shape)
    assert heat.max() > 0
    overlay = decode_png(message.overlay_png)
    assert (overlay == CAM_COLOUR).all(axis=2).any()  # the legend's CAM swatch
