"""`ctjoint export repository --check`: the committed repositories of both targets agree with
the REAL exported models (the committed ONNX of the bundled weights), and any mutation of a
committed config is caught. No server, no sockets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ctjoint import contracts
from ctjoint.export.bundled import bundled_onnx
from ctjoint.export.triton_check import check_repository, graph_tensors, source_tensors

REPOSITORY = contracts.repo_root() / "model_repository"
REAL_ONNX = {m: bundled_onnx(m) for m in contracts.MODEL_NAMES}
CONFIGS = [
    (target, path.parent.name)
    for target in contracts.TRITON_TARGETS
    for path in sorted((REPOSITORY / target).glob("*/config.pbtxt"))
]
Config = model_config_pb2.ModelConfig


@pytest.mark.parametrize("target", contracts.TRITON_TARGETS)
def test_committed_repository_agrees_with_the_real_exported_models(target: str) -> None:
    report = check_repository(REPOSITORY / target, REAL_ONNX)
    assert report.problems == ()
    assert len(report.models) == (6 if target == "cpu" else 8)


def test_the_real_models_have_a_cam_output_that_every_network_config_declares() -> None:
    for model, path in REAL_ONNX.items():
        _, outputs = graph_tensors(path)
        assert set(outputs) == {
            contracts.OUTPUT_SEG_LOGITS,
            contracts.OUTPUT_CLS_LOGITS,
            contracts.OUTPUT_CAM,
        }
        for variant in ("trt", "onnx"):
            config = _read(REPOSITORY / "gpu" / f"{model}_{variant}")
            assert contracts.OUTPUT_CAM in [o.name for o in config.output]


def test_python_models_declare_the_tensors_they_read_and_write() -> None:
    post = source_tensors(REPOSITORY / "cpu" / "postprocess_jcs2d" / "1" / "model.py")
    assert post == {
        "INPUTS": ("seg_logits", "cls_logits"),
        "OUTPUTS": ("mask", "lesion_area"),
    }
    network = source_tensors(REPOSITORY / "cpu" / "jcs2d_cpu" / "1" / "model.py")
    assert network["OPTIONAL_OUTPUTS"] == ("cam",)


def _read(folder: Path) -> Config:
    return text_format.Parse((folder / "config.pbtxt").read_text(), Config())


def _drop_last_output(config: Config) -> None:
    del config.output[-1]


def _rename_first_output(config: Config) -> None:
    config.output[0].name += "_renamed"


def _grow_first_output(config: Config) -> None:
    config.output[0].dims[-1] += 1


def _retype_first_output(config: Config) -> None:
    config.output[0].data_type = model_config_pb2.TYPE_FP16


def _shrink_first_input(config: Config) -> None:
    config.input[0].dims[-1] -= 1


MUTATIONS: dict[str, Callable[[Config], None]] = {
    "drop an output": _drop_last_output,
    "rename an output": _rename_first_output,
    "change an output's dims": _grow_first_output,
    "change an output's type": _retype_first_output,
    "change an input's dims": _shrink_first_input,
}


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize(("target", "name"), CONFIGS)
def test_any_mutated_committed_config_fails_the_check(
    tmp_path: Path, target: str, name: str, mutation: str
) -> None:
    copy = tmp_path / target
    shutil.copytree(REPOSITORY / target, copy, ignore=shutil.ignore_patterns("model.onnx"))
    config = _read(copy / name)
    MUTATIONS[mutation](config)
    (copy / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    report = check_repository(copy, REAL_ONNX)
    assert report.problems, f"{target}/{name}: {mutation} was not caught"
    assert any(str(copy / name) in p or f"({name})" in p for p in report.problems)


def test_an_ensemble_step_mapping_a_tensor_nobody_produces_is_named(tmp_path: Path) -> None:
    copy = tmp_path / "gpu"
    shutil.copytree(REPOSITORY / "gpu", copy)
    config = _read(copy / "jcs2d")
    step = config.ensemble_scheduling.step[1]
    step.input_map[contracts.OUTPUT_SEG_LOGITS] = "no_such_tensor"
    (copy / "jcs2d" / "config.pbtxt").write_text(text_format.MessageToString(config))
    problems = check_repository(copy, REAL_ONNX).problems
    assert any(
        "tensor 'no_such_tensor' is neither an ensemble input nor an output of an earlier step" in p
        for p in problems
    )


def test_an_ensemble_naming_a_missing_model_is_named(tmp_path: Path) -> None:
    copy = tmp_path / "cpu"
    shutil.copytree(REPOSITORY / "cpu", copy)
    shutil.rmtree(copy / "postprocess_deepsc3d")
    problems = check_repository(copy, REAL_ONNX).problems
    assert any("no model 'postprocess_deepsc3d' in the repository" in p for p in problems)


def test_a_python_model_reading_a_tensor_its_config_lacks_is_named(tmp_path: Path) -> None:
    copy = tmp_path / "cpu"
    shutil.copytree(REPOSITORY / "cpu", copy)
    source = copy / "postprocess_jcs2d" / "1" / "model.py"
    text = source.read_text().replace(
        "INPUTS = (OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS)",
        "INPUTS = (OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS, OUTPUT_CAM)",
    )
    source.write_text(text.replace("    CLASS_NAMES,\n", "    CLASS_NAMES,\n    OUTPUT_CAM,\n", 1))
    problems = check_repository(copy, REAL_ONNX).problems
    assert problems == (
        f"{copy}/postprocess_jcs2d/config.pbtxt: inputs ['cls_logits', 'seg_logits'], but "
        "model.py reads ['cam', 'cls_logits', 'seg_logits']",
    )


def test_the_command_exits_1_and_names_each_problem(tmp_path: Path) -> None:
    copy = tmp_path / "gpu"
    shutil.copytree(REPOSITORY / "gpu", copy)
    config = _read(copy / "jcs2d_trt")
    _drop_last_output(config)
    (copy / "jcs2d_trt" / "config.pbtxt").write_text(text_format.MessageToString(config))
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for model, path in REAL_ONNX.items():
        shutil.copyfile(path, contracts.onnx_path(model, onnx_dir))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctjoint.cli",
            "export",
            "repository",
            str(copy),
            "--check",
            "--onnx-dir",
            str(onnx_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "output 'cam' of the graph is not configured" in done.stdout
    assert "jcs2d_trt/config.pbtxt vs jcs2d.onnx" in done.stdout
