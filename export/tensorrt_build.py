"""`ctjoint export trt`: build a TensorRT engine from an exported ONNX model.

TensorRT Python API: the ONNX parser, one optimisation profile over the batch range the Triton
spec serves (and the depth range for a 3D model whose depth axis is dynamic), a persistent
timing cache (rebuilds reuse measured tactics), FP16 or INT8 (entropy calibration on phantom
scans through the shared preprocessing), then a parity check of the engine against ONNX
Runtime on phantom input. Writes the engine and a JSON build record beside it.

Needs an NVIDIA GPU, its driver, `tensorrt` and a CUDA build of torch (used for device buffers
and streams). Without them it stops with `GpuUnavailableError` before doing anything.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from ctjoint import contracts
from ctjoint.export.triton_repository import default_engine_dir, engine_path
from ctjoint.export.triton_spec import SERVING, ModelFacts
from ctjoint.gateway.errors import CtJointError
from ctjoint.gateway.preprocess import PreprocessPlan, preprocess_volume

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: Final = ("fp32", "fp16", "int8")
WORKSPACE_BYTES: Final = 4 << 30
# Engine vs ONNX Runtime, max abs difference of the logits, per precision.
PARITY_TOLERANCE: Final = {"fp32": 1e-3, "fp16": 5e-2, "int8": 5e-1}
CALIBRATION_BATCH: Final = 8
CALIBRATION_KINDS: Final = ("covid19", "cap", "normal")


class GpuUnavailableError(CtJointError):
    """TensorRT cannot run here (no NVIDIA GPU, driver, tensorrt or CUDA torch)."""


class EngineBuildError(CtJointError):
    """TensorRT refused the network, or the engine disagrees with ONNX Runtime."""


@dataclass(frozen=True)
class BuildRecord:
    """What was built, with what, and how well it agrees with ONNX Runtime (written as JSON)."""

    model: str
    precision: str
    engine: str
    onnx: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    profiles: dict[str, dict[str, list[int]]]
    build_seconds: float
    engine_bytes: int
    timing_cache: str
    calibration: dict[str, Any] = field(default_factory=dict)
    parity_max_abs_diff: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.parity_max_abs_diff.items())
        return (
            f"wrote {self.engine} ({self.engine_bytes / 1e6:.1f} MB, {self.precision}, "
            f"TensorRT {self.tensorrt_version} on {self.gpu}) in {self.build_seconds:.0f} s; "
            f"parity vs ONNX Runtime, max abs diff: {diffs}"
        )


def gpu_problem() -> str | None:
    """Why TensorRT cannot run here, or None when it can (also the tests' skip reason)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (the export extra provides it)"
    if not torch.cuda.is_available():
        return (
            "no NVIDIA GPU with a working driver is visible (torch.cuda.is_available() is "
            "False); build engines on the GPU machine or inside the NGC TensorRT container"
        )
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install tensorrt)"
    return None


def profile_shapes(
    plan: PreprocessPlan, max_batch: int, onnx_shape: list[Any]
) -> dict[str, list[int]]:
    """min/opt/max shapes of `image`: batch 1..max_batch (opt: the largest preferred batch),
    and for 3D a depth range when the ONNX depth axis is dynamic (else the plan's depth)."""
    preferred = SERVING[plan.model].preferred_batch_sizes
    opt_batch = max((b for b in preferred if b <= max_batch), default=max_batch)
    if plan.kind == "2.5d":
        tail = [plan.channels, plan.height, plan.width]
        return {
            "min": [1, *tail],
            "opt": [opt_batch, *tail],
            "max": [max_batch, *tail],
        }
    depth_dynamic = len(onnx_shape) == 5 and not isinstance(onnx_shape[2], int)
    low, high = (max(4, plan.depth // 2), plan.depth * 2) if depth_dynamic else (plan.depth,) * 2
    plane = [plan.height, plan.width]
    return {
        "min": [1, 1, low, *plane],
        "opt": [opt_batch, 1, plan.depth, *plane],
        "max": [max_batch, 1, high, *plane],
    }


def calibration_batches(
    plan: PreprocessPlan, scans: int, *, size: int = 256, seed: int = 7000
) -> Iterator[np.ndarray]:
    """Model input from phantom scans of every class, in batches for the INT8 calibrator."""
    from ctjoint.export.phantom import generate_phantom

    pending: list[np.ndarray] = []
    for index in range(scans):
        kind = CALIBRATION_KINDS[index % len(CALIBRATION_KINDS)]
        phantom = generate_phantom(kind=kind, seed=seed + index, size=size)
        image, _ = preprocess_volume(phantom.hu.astype(np.float32), plan)
        pending.extend(image)  # 2.5D: one sample per slice; 3D: one sample per scan
        while len(pending) >= CALIBRATION_BATCH:
            yield np.stack(pending[:CALIBRATION_BATCH]).astype(np.float32)
            pending = pending[CALIBRATION_BATCH:]
    if pending:
        yield np.stack(pending).astype(np.float32)


def build_engine(
    *,
    model: str,
    precision: str = "fp16",
    onnx_file: Path | None = None,
    out: Path | None = None,
    max_batch: int | None = None,
    calibration_scans: int = 8,
    timing_cache: Path | None = None,
) -> BuildRecord:
    """Build, check parity, then (only then) write the engine and its build record."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if model not in contracts.MODEL_NAMES:
        raise EngineBuildError(f"unknown model {model!r}; expected {contracts.MODEL_NAMES}")
    problem = gpu_problem()
    if problem is not None:
        raise GpuUnavailableError(f"cannot build a TensorRT engine here: {problem}")
    onnx_file = onnx_file or contracts.onnx_path(model)
    if not onnx_file.is_file():
        raise EngineBuildError(f"no ONNX file at {onnx_file}; run `make onnx` first")
    out = out or engine_path(model)
    timing_cache = timing_cache or default_engine_dir() / "timing.cache"
    facts = ModelFacts.from_onnx(onnx_file)
    batch = max_batch or SERVING[model].max_batch_size
    return _Builder(facts, onnx_file, precision, batch, timing_cache).build(out, calibration_scans)


class _Builder:
    """One engine build; everything that touches tensorrt or CUDA lives here."""

    def __init__(
        self, facts: ModelFacts, onnx_file: Path, precision: str, max_batch: int, cache: Path
    ) -> None:
        import tensorrt as trt

        self.trt = trt
        self.facts = facts
        self.onnx_file = onnx_file
        self.precision = precision
        self.max_batch = max_batch
        self.cache_file = cache
        self.logger = trt.Logger(trt.Logger.WARNING)

    def build(self, out: Path, calibration_scans: int) -> BuildRecord:
        trt = self.trt
        started = time.perf_counter()
        builder = trt.Builder(self.logger)
        # TensorRT 10 networks are always explicit-batch; the flag is gone.
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT cannot parse {self.onnx_file}: {errors}")
        image = network.get_input(0)
        if image.name != contracts.INPUT_IMAGE:
            raise EngineBuildError(f"the network's input is {image.name!r}, not 'image'")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        shapes = profile_shapes(self.facts.plan, self.max_batch, list(image.shape))
        profile = builder.create_optimization_profile()
        profile.set_shape(image.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)

        cache_bytes = self.cache_file.read_bytes() if self.cache_file.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)

        calibration: dict[str, Any] = {}
        calibrator = None
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            calibrator = _make_calibrator(
                trt,
                calibration_batches(self.facts.plan, calibration_scans),
                self.cache_file.with_name(f"{self.facts.model}.int8.calib"),
            )
            config.int8_calibrator = calibrator
            # Calibration runs at one fixed shape: the optimum of the serving profile.
            calib_profile = builder.create_optimization_profile()
            calib_shape = [CALIBRATION_BATCH, *shapes["opt"][1:]]
            calib_profile.set_shape(image.name, calib_shape, calib_shape, calib_shape)
            config.set_calibration_profile(calib_profile)
            calibration = {"scans": calibration_scans, "batch": CALIBRATION_BATCH}

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(
                f"TensorRT could not build {self.facts.model} at {self.precision}"
            )
        engine_bytes = bytes(serialized)
        if calibrator is not None:
            calibration["samples"] = calibrator.samples
        build_seconds = time.perf_counter() - started
        diffs = self._parity(engine_bytes, shapes)
        tolerance = PARITY_TOLERANCE[self.precision]
        if max(diffs.values()) > tolerance:
            raise EngineBuildError(
                f"the {self.precision} engine disagrees with ONNX Runtime: max abs diff "
                f"{diffs} (tolerance {tolerance:g}); engine not written"
            )

        import torch

        props = torch.cuda.get_device_properties(0)
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(out, engine_bytes)
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.cache_file, bytes(config.get_timing_cache().serialize()))
        record = BuildRecord(
            model=self.facts.model,
            precision=self.precision,
            engine=str(out),
            onnx=str(self.onnx_file),
            tensorrt_version=trt.__version__,
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            profiles={contracts.INPUT_IMAGE: shapes},
            build_seconds=round(build_seconds, 2),
            engine_bytes=len(engine_bytes),
            timing_cache=str(self.cache_file),
            calibration=calibration,
            parity_max_abs_diff=diffs,
        )
        _atomic_write(
            out.with_suffix(".json"),
            (json.dumps(asdict(record), indent=2) + "\n").encode(),
        )
        return record

    def _parity(self, engine_bytes: bytes, shapes: dict[str, list[int]]) -> dict[str, float]:
        """Max abs differences of the logits, engine vs ONNX Runtime, on phantom input."""
        import onnxruntime as ort
        import torch

        trt = self.trt
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise EngineBuildError("TensorRT cannot deserialize the engine it just built")
        context = engine.create_execution_context()
        batch = next(calibration_batches(self.facts.plan, 1))
        batch = batch[: shapes["max"][0]]
        if self.facts.plan.kind == "3d":
            batch = batch[:1]
        context.set_input_shape(contracts.INPUT_IMAGE, list(batch.shape))
        device_in = torch.from_numpy(batch).cuda()
        context.set_tensor_address(contracts.INPUT_IMAGE, device_in.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in (contracts.OUTPUT_SEG_LOGITS, contracts.OUTPUT_CLS_LOGITS):
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.Stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError("the engine failed to run the parity batch")
        stream.synchronize()
        session = ort.InferenceSession(str(self.onnx_file), providers=["CPUExecutionProvider"])
        reference = session.run(
            [contracts.OUTPUT_SEG_LOGITS, contracts.OUTPUT_CLS_LOGITS],
            {contracts.INPUT_IMAGE: batch},
        )
        return {
            name: float(np.max(np.abs(outputs[name].cpu().numpy() - ref)))
            for name, ref in zip(
                (contracts.OUTPUT_SEG_LOGITS, contracts.OUTPUT_CLS_LOGITS), reference, strict=True
            )
        }


def _make_calibrator(trt: Any, batches: Iterator[np.ndarray], cache_file: Path) -> Any:
    """An IInt8EntropyCalibrator2 fed from `batches` (device copies kept alive per batch)."""
    import torch

    class PhantomCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.samples = 0
            self._device: torch.Tensor | None = None

        def get_batch_size(self) -> int:
            return CALIBRATION_BATCH

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(batches, None)
            if batch is None:
                return None
            if batch.shape[0] < CALIBRATION_BATCH:  # the calibration profile is fixed-size
                pad = np.repeat(batch[-1:], CALIBRATION_BATCH - batch.shape[0], axis=0)
                batch = np.concatenate([batch, pad])
            self._device = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
            self.samples += batch.shape[0]
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(cache_file, bytes(cache))

    return PhantomCalibrator()


def _atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(data)
    os.replace(handle.name, path)
