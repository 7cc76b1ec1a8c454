"""The committed Triton repositories are exactly what the typed spec generates, and they are
valid Triton model configs. No server, no sockets."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ctjoint import contracts
from ctjoint.export.triton_repository import (
    CONFIG_FILE,
    generated_files,
    write_repository,
)
from ctjoint.export.triton_spec import (
    PYTHON_SOURCES,
    DynamicBatching,
    ModelFacts,
    ModelSpec,
    SpecError,
    TensorSpec,
    repository_specs,
)

REPOSITORY = contracts.repo_root() / "model_repository"
BUILT = {contracts.TRITON_ONNX_FILE, contracts.TRITON_PLAN_FILE}


def _committed(target: str) -> dict[Path, str]:
    root = REPOSITORY / target
    return {
        path.relative_to(root): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in BUILT and "__pycache__" not in path.parts
    }


@pytest.mark.parametrize("target", contracts.TRITON_TARGETS)
def test_committed_repository_equals_the_generated_one(target: str) -> None:
    generated = generated_files(target)
    committed = _committed(target)
    stale = sorted(str(p) for p in generated if committed.get(p) != generated[p])
    extra = sorted(str(p) for p in committed if p not in generated)
    assert not stale and not extra, (
        f"model_repository/{target} is stale {stale} or has extra files {extra}; run "
        f"`ctjoint export repository model_repository/{target} --target {target} --configs-only`"
    )


@pytest.mark.parametrize("target", contracts.TRITON_TARGETS)
def test_every_committed_config_parses_back_as_a_model_config(target: str) -> None:
    configs = sorted((REPOSITORY / target).glob(f"*/{CONFIG_FILE}"))
    assert len(configs) == len(repository_specs(target, _tiny_facts()))
    for path in configs:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == path.parent.name
        assert config.version_policy.latest.num_versions == 1


def test_cpu_ensembles_wire_the_network_to_its_postprocessing() -> None:
    for model in contracts.MODEL_NAMES:
        text = (REPOSITORY / "cpu" / model / CONFIG_FILE).read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        steps = config.ensemble_scheduling.step
        assert [s.model_name for s in steps] == [
            contracts.triton_model_name(model, contracts.TRITON_VARIANT_CPU),
            contracts.triton_postprocess_name(model),
        ]
        assert dict(steps[0].output_map) == {
            contracts.OUTPUT_SEG_LOGITS: contracts.ENSEMBLE_LESION_LOGITS,
            contracts.OUTPUT_CLS_LOGITS: contracts.ENSEMBLE_DIAGNOSIS_LOGITS,
            contracts.OUTPUT_CAM: contracts.OUTPUT_CAM,
        }
        assert dict(steps[1].input_map) == {
            contracts.OUTPUT_SEG_LOGITS: contracts.ENSEMBLE_LESION_LOGITS,
            contracts.OUTPUT_CLS_LOGITS: contracts.ENSEMBLE_DIAGNOSIS_LOGITS,
        }
        assert contracts.OUTPUT_CAM in [o.name for o in config.output]
        assert config.parameters[contracts.ONNX_META_PLAN].string_value


def test_gpu_models_use_instance_kind_gpu_and_warm_up() -> None:
    for variant in (contracts.TRITON_VARIANT_TRT, contracts.TRITON_VARIANT_ONNX):
        name = contracts.triton_model_name(contracts.MODEL_JCS2D, variant)
        text = (REPOSITORY / "gpu" / name / CONFIG_FILE).read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert [g.kind for g in config.instance_group] == [
            model_config_pb2.ModelInstanceGroup.KIND_GPU
        ]
        assert [w.batch_size for w in config.model_warmup] == [1, 32]
    onnx = (REPOSITORY / "gpu" / "jcs2d_onnx" / CONFIG_FILE).read_text()
    assert 'name: "tensorrt"' in onnx and 'backend: "onnxruntime"' in onnx
    assert (
        'platform: "tensorrt_plan"' in (REPOSITORY / "gpu" / "jcs2d_trt" / CONFIG_FILE).read_text()
    )


def test_a_preferred_batch_above_the_maximum_is_refused() -> None:
    with pytest.raises(SpecError, match=r"preferred batch sizes \[64\] exceed max_batch_size 32"):
        ModelSpec(
            name="m",
            backend="python",
            max_batch_size=32,
            inputs=(TensorSpec("x", "TYPE_FP32", (1,)),),
            outputs=(TensorSpec("y", "TYPE_FP32", (1,)),),
            dynamic_batching=DynamicBatching((8, 64), 100),
        )


def test_an_unknown_data_type_is_refused() -> None:
    with pytest.raises(SpecError, match="unknown data type 'TYPE_FLOAT'"):
        TensorSpec("x", "TYPE_FLOAT", (1,))  # type: ignore[arg-type]


def test_writing_without_onnx_files_names_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="build it with `make onnx`"):
        write_repository(tmp_path / "repo", target="cpu", onnx_dir=tmp_path / "none")


def test_written_repository_takes_shapes_from_the_onnx_files(
    tmp_path: Path, contract_model_dir: Path
) -> None:
    report = write_repository(tmp_path / "repo", target="cpu", onnx_dir=contract_model_dir)
    assert len(report.artefacts) == len(contracts.MODEL_NAMES)
    text = (tmp_path / "repo" / "jcs2d_cpu" / CONFIG_FILE).read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert list(config.input[0].dims) == [3, 32, 32]
    copied = tmp_path / "repo" / "jcs2d_cpu" / "1" / contracts.TRITON_ONNX_FILE
    assert copied.read_bytes() == contracts.onnx_path("jcs2d", contract_model_dir).read_bytes()


def _tiny_facts() -> dict[str, ModelFacts]:
    return {m: ModelFacts.from_config(m) for m in contracts.MODEL_NAMES}


def _postprocess_module() -> types.ModuleType:
    """The postprocess model's source, imported with a stand-in for Triton's utilities."""
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("pb_utils_stub"))
    spec = importlib.util.spec_from_file_location("ctjoint_pp", PYTHON_SOURCES / "postprocess.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_postprocess_counts_lesion_pixels_per_slice_and_class() -> None:
    post = _postprocess_module()
    logits = np.zeros((1, 3, 2, 4, 4), np.float32)  # one 3D sample, two slices
    logits[0, 1, 0, :2, :2] = 5.0  # 4 ground-glass pixels on slice 0
    logits[0, 2, 1, 0, :3] = 5.0  # 3 consolidation pixels on slice 1
    mask = post.label_mask(logits)
    assert mask.dtype == np.uint8
    assert post.lesion_area(mask).tolist() == [[[4, 0], [0, 3]]]


@pytest.mark.parametrize("target", contracts.TRITON_TARGETS)
def test_no_repository_model_computes_probabilities(target: str) -> None:
    """The one softmax is the gateway's: no model of either repository outputs probabilities
    or carries a temperature, and the postprocess source takes no exponential."""
    for path in sorted((REPOSITORY / target).glob(f"*/{CONFIG_FILE}")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert "probs" not in [o.name for o in config.output], path
        if config.name.startswith("postprocess_"):
            assert list(config.output) and not config.parameters, path
    post = _postprocess_module()
    assert "exp(" not in (PYTHON_SOURCES / "postprocess.py").read_text()
    assert not hasattr(post, "softmax")
    assert post.OUTPUTS == (contracts.POST_MASK, contracts.POST_LESION_AREA)
