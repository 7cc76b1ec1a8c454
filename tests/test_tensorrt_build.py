"""TensorRT engine build: the build plan (bindings, profile, calibration shape) from the shipped
models on CPU; real builds of the shipped models where an NVIDIA GPU exists, a clear refusal
elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from ctjoint import contracts
from ctjoint.export.bundled import bundled_onnx
from ctjoint.export.tensorrt_build import (
    CALIBRATION_BATCH,
    PARITY_TOLERANCE,
    EngineBuildError,
    build_engine,
    engine_plan,
    gpu_problem,
    profile_shapes,
)
from ctjoint.export.triton_spec import SERVING
from ctjoint.gateway.preprocess import PreprocessPlan

GPU_PROBLEM = gpu_problem()
needs_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"TensorRT: {GPU_PROBLEM}")


def test_2d_profile_spans_one_to_the_served_maximum_batch() -> None:
    plan = PreprocessPlan.default(contracts.MODEL_JCS2D, height=128, width=128)
    shapes = profile_shapes(plan, 32, [-1, 3, 128, 128])
    assert shapes == {"min": [1, 3, 128, 128], "opt": [32, 3, 128, 128], "max": [32, 3, 128, 128]}


def test_3d_profile_spans_depth_only_when_the_onnx_depth_is_dynamic() -> None:
    plan = PreprocessPlan.default(contracts.MODEL_DEEPSC3D, height=128, width=128, depth=64)
    fixed = profile_shapes(plan, 4, ["batch", 1, 64, 128, 128])
    assert [s[2] for s in fixed.values()] == [64, 64, 64]
    dynamic = profile_shapes(plan, 4, ["batch", 1, "depth", 128, 128])
    assert [s[2] for s in dynamic.values()] == [32, 64, 128]
    assert [s[0] for s in dynamic.values()] == [1, 4, 4]


@pytest.mark.parametrize("model", contracts.MODEL_NAMES)
def test_the_plan_of_a_shipped_model_binds_every_graph_output(model: str) -> None:
    plan = engine_plan(bundled_onnx(model), SERVING[model].max_batch_size)
    assert [t.name for t in plan.outputs] == [
        contracts.OUTPUT_SEG_LOGITS,
        contracts.OUTPUT_CLS_LOGITS,
        contracts.OUTPUT_CAM,
    ]
    grid = plan.image.dims[2:]
    assert plan.outputs[0].dims == (-1, len(contracts.SEG_CLASS_NAMES), *grid)
    assert plan.profile["min"] == [1, *plan.image.dims[1:]]
    assert plan.profile["max"] == [SERVING[model].max_batch_size, *plan.image.dims[1:]]
    assert plan.calibration_shape == [CALIBRATION_BATCH, *plan.image.dims[1:]]


def test_a_graph_whose_outputs_differ_from_the_config_is_refused(tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(bundled_onnx(contracts.MODEL_JCS2D)))
    cam = next(o for o in proto.graph.output if o.name == contracts.OUTPUT_CAM)
    cam.name = "cam_renamed"  # an output the configs do not declare
    path = tmp_path / "jcs2d.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(EngineBuildError, match="differ from what the repository configures"):
        engine_plan(path, 32)


@pytest.mark.skipif(GPU_PROBLEM is None, reason="a GPU is present: the build runs instead")
def test_without_a_gpu_the_command_says_why_and_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ctjoint.cli", "export", "trt", "--model", "jcs2d"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "error: cannot build a TensorRT engine here:" in done.stderr
    assert "Traceback" not in done.stderr


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("model", contracts.MODEL_NAMES)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_onnx_runtime_and_records_its_build(
    tmp_path: Path, model: str, precision: str
) -> None:
    engine = tmp_path / f"{model}_{precision}.plan"
    record = build_engine(
        model=model,
        precision=precision,
        onnx_file=bundled_onnx(model),
        out=engine,
        calibration_scans=1,
        timing_cache=tmp_path / "timing.cache",
    )
    print(record.summary())
    assert engine.is_file() and (tmp_path / "timing.cache").is_file()
    assert sorted(record.parity_max_abs_diff) == ["cam", "cls_logits", "seg_logits"]
    assert max(record.parity_max_abs_diff.values()) <= PARITY_TOLERANCE[precision]
    saved = json.loads(engine.with_suffix(".json").read_text())
    assert saved["precision"] == precision and saved["tensorrt_version"]
    assert saved["profiles"][contracts.INPUT_IMAGE]["max"][0] >= 1
