"""The class activation map through a REAL tritonserver (CPU build): the bundled models' `cam`
output travels through both ensembles like the masks, and the Triton backend gives the same
map as the embedded backend on the same scan."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from ctjoint import contracts
from ctjoint.export.bundled import bundled_onnx
from ctjoint.export.triton_repository import write_repository
from ctjoint.gateway.analysis import ScanAnalysis, ScanAnalyzer
from ctjoint.gateway.backends.base import InferenceBackend
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.backends.triton import MAX_IN_FLIGHT_PER_SCAN, REQUEST_SLICES, TritonBackend
from ctjoint.gateway.series import list_series_files
from ctjoint.gateway.triton_server import TritonServer, TritonServerConfig, free_ports

pytestmark = [pytest.mark.xdist_group("tritonserver"), pytest.mark.timeout(600)]

CAM_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundled_onnx")
    for model in contracts.MODEL_NAMES:
        shutil.copyfile(bundled_onnx(model), contracts.onnx_path(model, folder))
    return folder


@pytest.fixture(scope="module")
def triton_url(tmp_path_factory: pytest.TempPathFactory, bundled_dir: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("triton_cam")
    write_repository(root / "repository", target="cpu", onnx_dir=bundled_dir)
    (grpc_port,) = free_ports(1)
    config = TritonServerConfig(root / "repository", grpc_port=grpc_port)
    with TritonServer(config, log_file=root / "tritonserver.log"):
        yield config.grpc_url


def _analyze(backend: InferenceBackend, series: Path, model: str, **kwargs: int) -> ScanAnalysis:
    files = [(p.name, p) for p in list_series_files(series)]

    async def run() -> ScanAnalysis:
        async with backend:
            return await ScanAnalyzer(backend, **kwargs).analyze_files(files, model)

    return asyncio.run(run())


@pytest.mark.parametrize("model", contracts.MODEL_NAMES)
def test_triton_returns_the_embedded_class_activation_map(
    triton_url: str, bundled_dir: Path, ct_series_dir: Path, model: str
) -> None:
    embedded = _analyze(
        EmbeddedBackend((model,), model_dir=bundled_dir, intra_op_threads=1), ct_series_dir, model
    )
    served = _analyze(
        TritonBackend(triton_url, (model,), load_timeout_s=60),
        ct_series_dir,
        model,
        batch_size=REQUEST_SLICES,
        max_in_flight=MAX_IN_FLIGHT_PER_SCAN,
    )
    assert embedded.cam is not None and served.cam is not None
    assert served.cam.shape == embedded.cam.shape
    diff = float(np.max(np.abs(served.cam - embedded.cam)))
    print(f"{model}: cam {served.cam.shape}, max abs diff Triton vs embedded {diff:.2e}")
    assert diff <= CAM_TOLERANCE
    assert served.result.label == embedded.result.label
