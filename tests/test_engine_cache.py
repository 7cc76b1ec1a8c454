"""The TensorRT engine cache of the container start-up: keys, reuse, rebuilds, repository.

No GPU needed: a stand-in builder writes the engine file, so what is tested is the decision
(build or reuse) and the layout Triton gets, not TensorRT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ctjoint import contracts
from ctjoint.export.engine_cache import (
    EngineKey,
    GpuFacts,
    file_sha256,
    link_engines,
    main,
    prepare_engines,
)
from ctjoint.export.tensorrt_build import gpu_problem
from ctjoint.export.triton_repository import write_repository

H100 = GpuFacts(name="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="10.8.0")
KEY = EngineKey(
    model=contracts.MODEL_JCS2D,
    onnx_sha256="ab" * 32,
    gpu=H100.name,
    compute_capability="9.0",
    tensorrt_version="10.8.0",
    precision="fp16",
    max_batch=32,
)


class _Builder:
    """Records each build and writes a small stand-in engine where TensorRT would."""

    def __init__(self) -> None:
        self.built: list[str] = []

    def __call__(
        self, model: str, onnx: Path, out: Path, timing: Path, precision: str, batch: int
    ) -> None:
        self.built.append(model)
        out.write_bytes(f"engine {model} {precision} {batch}".encode())


def test_the_key_is_stable_for_the_same_inputs() -> None:
    again = dataclasses.replace(KEY, gpu="  NVIDIA  H100 80GB HBM3 ")
    assert again == KEY and again.digest == KEY.digest and len(KEY.digest) == 16


@pytest.mark.parametrize(
    "field, value",
    [
        ("onnx_sha256", "cd" * 32),
        ("gpu", "NVIDIA L4"),
        ("compute_capability", "8.9"),
        ("tensorrt_version", "10.9.0"),
        ("precision", "int8"),
        ("max_batch", 16),
        ("model", contracts.MODEL_DEEPSC3D),
    ],
)
def test_every_input_of_the_key_changes_the_digest(field: str, value: object) -> None:
    assert dataclasses.replace(KEY, **{field: value}).digest != KEY.digest


def test_the_file_name_says_model_gpu_and_tensorrt() -> None:
    assert KEY.file_name == f"jcs2d-nvidia-h100-80gb-hbm3-trt10.8.0-fp16-{KEY.digest}.plan"


def test_a_malformed_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        dataclasses.replace(KEY, onnx_sha256="not-a-hash")


def test_file_sha256_is_the_content_hash(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"ctjoint")
    assert file_sha256(path) == "aa3e2926525bbddba6992b769d44161e8a88ceb6985df98830b520578241fb01"


def test_engines_are_built_once_then_reused(tmp_path: Path, contract_model_dir: Path) -> None:
    builder = _Builder()
    first = prepare_engines(tmp_path / "cache", contract_model_dir, H100, builder=builder)
    second = prepare_engines(tmp_path / "cache", contract_model_dir, H100, builder=builder)
    assert builder.built == list(contracts.MODEL_NAMES)
    assert [e.built for e in first] == [True, True] and [e.built for e in second] == [False, False]
    assert [e.path for e in first] == [e.path for e in second]


def test_another_gpu_or_tensorrt_builds_its_own_engines(
    tmp_path: Path, contract_model_dir: Path
) -> None:
    builder = _Builder()
    models = (contracts.MODEL_JCS2D,)
    prepare_engines(tmp_path, contract_model_dir, H100, models=models, builder=builder)
    l4 = GpuFacts(name="NVIDIA L4", compute_capability="8.9", tensorrt_version="10.8.0")
    newer = dataclasses.replace(H100, tensorrt_version="10.9.0")
    for gpu in (l4, newer):
        prepare_engines(tmp_path, contract_model_dir, gpu, models=models, builder=builder)
    assert builder.built == [contracts.MODEL_JCS2D] * 3
    assert len(list(tmp_path.glob("*.plan"))) == 3


def test_a_changed_onnx_file_builds_a_new_engine(tmp_path: Path, contract_model_dir: Path) -> None:
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    source = contracts.onnx_path(contracts.MODEL_JCS2D, contract_model_dir)
    target = contracts.onnx_path(contracts.MODEL_JCS2D, onnx_dir)
    target.write_bytes(source.read_bytes())
    builder = _Builder()
    models = (contracts.MODEL_JCS2D,)
    (before,) = prepare_engines(tmp_path / "cache", onnx_dir, H100, models=models, builder=builder)
    target.write_bytes(source.read_bytes() + b"\0")
    (after,) = prepare_engines(tmp_path / "cache", onnx_dir, H100, models=models, builder=builder)
    assert after.built and after.path != before.path


def test_the_gpu_repository_takes_the_cached_engines(
    tmp_path: Path, contract_model_dir: Path
) -> None:
    engines = prepare_engines(tmp_path / "cache", contract_model_dir, H100, builder=_Builder())
    engine_dir = link_engines(engines, tmp_path / "engines")
    repository = tmp_path / "repository"
    write_repository(repository, target="gpu", onnx_dir=contract_model_dir, engine_dir=engine_dir)
    for engine in engines:
        plan = repository / f"{engine.key.model}_trt" / "1" / contracts.TRITON_PLAN_FILE
        assert plan.read_bytes() == engine.path.read_bytes()


def test_start_up_without_a_gpu_fails_in_one_log_line(
    tmp_path: Path, contract_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    problem = gpu_problem()
    if problem is None:
        pytest.skip("a GPU with TensorRT is here: the start-up would build real engines")
    args = ["--cache", str(tmp_path / "cache"), "--onnx-dir", str(contract_model_dir)]
    status = main([*args, "--repository", str(tmp_path / "repository")])
    assert status == 2
    assert "cannot prepare the Triton repository: cannot build TensorRT engines here" in caplog.text
    assert not (tmp_path / "repository").exists()
