"""`ctjoint export trt`: build a TensorRT engine from an exported ONNX model.

TensorRT Python API: the ONNX parser, one optimisation profile over the batch range the Triton
spec serves (and the depth range for a 3D model whose depth axis is dynamic), a persistent
timing cache (rebuilds reuse measured tactics), FP16 or INT8 (entropy calibration on phantom
scans through the shared preprocessing), then a parity check of the engine against ONNX
Runtime on phantom input, for every output of the graph. Writes the engine and a JSON build
record beside it.

What to bind, the profile and the calibration input come from the ONNX graph and the typed
spec (`engine_plan`, plain code tested on CPU with the shipped models), never from names
written here. Needs an NVIDIA GPU, its driver, TensorRT's Python bindings and cuda-python
(device buffers and streams; no torch). Without them it stops with `GpuUnavailableError`
before doing anything.
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
from ctjoint.export.errors import EngineBuildError, GpuUnavailableError
from ctjoint.export.triton_check import Tensor, graph_tensors
from ctjoint.export.triton_repository import default_engine_dir, engine_path
from ctjoint.export.triton_spec import SERVING, ModelFacts, network_spec
from ctjoint.gateway.preprocess import PreprocessPlan, preprocess_volume

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: Final = ("fp32", "fp16", "int8")
WORKSPACE_BYTES: Final = 4 << 30
# Engine vs ONNX Runtime, max abs difference of the logits, per precision.
PARITY_TOLERANCE: Final = {"fp32": 1e-3, "fp16": 5e-2, "int8": 5e-1}
CALIBRATION_BATCH: Final = 8
CALIBRATION_KINDS: Final = ("covid19", "cap", "normal")


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


def import_tensorrt() -> Any:
    """TensorRT's Python API: `tensorrt`, or the bare bindings wheel (`tensorrt_bindings`,
    what the image installs over the NGC base's own TensorRT libraries)."""
    try:
        import tensorrt
    except ImportError:
        import tensorrt_bindings as tensorrt
    return tensorrt


def gpu_problem() -> str | None:
    """Why TensorRT cannot run here, or None when it can (also the tests' skip reason)."""
    from ctjoint.export.cuda_buffers import CudaError, device_info

    try:
        import_tensorrt()
    except ImportError:
        return "TensorRT's Python bindings are not installed (the `tensorrt` extra)"
    try:
        device_info()
    except CudaError as err:
        return (
            f"no usable NVIDIA GPU ({err}); build engines on the GPU machine or inside the "
            "NGC tritonserver image"
        )
    return None


@dataclass(frozen=True)
class EnginePlan:
    """What one engine build binds and profiles, read from the ONNX graph and checked against
    the spec the repository's config is generated from (an engine output without a config
    would make Triton refuse the model)."""

    facts: ModelFacts
    image: Tensor
    outputs: tuple[Tensor, ...]
    profile: dict[str, list[int]]

    @property
    def calibration_shape(self) -> list[int]:
        """INT8 calibration runs at one fixed shape: the profile's optimum, CALIBRATION_BATCH."""
        return [CALIBRATION_BATCH, *self.profile["opt"][1:]]


def engine_plan(onnx_file: Path, max_batch: int) -> EnginePlan:
    """The build plan of an exported model: its one input, every output, the profile."""
    facts = ModelFacts.from_onnx(onnx_file)
    inputs, outputs = graph_tensors(onnx_file)
    if list(inputs) != [contracts.INPUT_IMAGE]:
        raise EngineBuildError(
            f"{onnx_file}: the graph's inputs are {list(inputs)}, not [{contracts.INPUT_IMAGE!r}]"
        )
    spec = network_spec(facts, contracts.TRITON_VARIANT_TRT)
    configured = {t.name: (t.data_type, (-1, *t.dims)) for t in spec.outputs}
    found = {t.name: (t.data_type, t.dims) for t in outputs.values()}
    if configured != found:
        raise EngineBuildError(
            f"{onnx_file}: the graph's outputs {found} differ from what the repository "
            f"configures for {spec.name} {configured}; regenerate the repository"
        )
    image = inputs[contracts.INPUT_IMAGE]
    shapes = profile_shapes(facts.plan, max_batch, list(image.dims))
    return EnginePlan(facts, image, tuple(outputs.values()), shapes)


def profile_shapes(
    plan: PreprocessPlan, max_batch: int, onnx_shape: list[Any]
) -> dict[str, list[int]]:
    """min/opt/max shapes of `image`: batch 1..max_batch (opt: the largest preferred batch),
    and for 3D a depth range when the ONNX depth axis is dynamic (else the plan's depth)."""
    preferred = SERVING[plan.model].preferred_batch_sizes
    opt_batch = max((b for b in preferred if b <= max_batch), default=max_batch)
    if plan.preprocessor().per_slice:
        tail = list(plan.preprocessor().input_shape(1)[1:])
        return {
            "min": [1, *tail],
            "opt": [opt_batch, *tail],
            "max": [max_batch, *tail],
        }
    depth_dynamic = len(onnx_shape) == 5 and (
        not isinstance(onnx_shape[2], int) or onnx_shape[2] < 0
    )
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
    plan = engine_plan(onnx_file, max_batch or SERVING[model].max_batch_size)
    return _Builder(plan, onnx_file, precision, timing_cache).build(out, calibration_scans)


class _Builder:
    """One engine build; everything that touches tensorrt or CUDA lives here."""

    def __init__(self, plan: EnginePlan, onnx_file: Path, precision: str, cache: Path) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.plan = plan
        self.facts = plan.facts
        self.onnx_file = onnx_file
        self.precision = precision
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
        parsed = {network.get_output(i).name for i in range(network.num_outputs)}
        if parsed != {t.name for t in self.plan.outputs}:
            raise EngineBuildError(f"TensorRT parsed outputs {sorted(parsed)} from the graph")
        image = network.get_input(0)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        shapes = self.plan.profile
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
            calib_shape = self.plan.calibration_shape
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

        from ctjoint.export.cuda_buffers import device_info

        device = device_info()
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
            gpu=device.name,
            compute_capability=device.compute_capability,
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
        """Max abs difference of every output, engine vs ONNX Runtime, on phantom input."""
        import onnxruntime as ort

        from ctjoint.export.cuda_buffers import DeviceBuffer, Stream

        trt = self.trt
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise EngineBuildError("TensorRT cannot deserialize the engine it just built")
        context = engine.create_execution_context()
        batch = next(calibration_batches(self.facts.plan, 1))
        batch = batch[: shapes["max"][0]]
        if not self.facts.plan.preprocessor().per_slice:
            batch = batch[:1]
        context.set_input_shape(contracts.INPUT_IMAGE, list(batch.shape))
        buffers = [DeviceBuffer.from_array(batch)]
        stream = Stream()
        try:
            context.set_tensor_address(contracts.INPUT_IMAGE, buffers[0].ptr)
            # TensorRT 10 refuses to run with any output lacking an address: bind them all.
            shapes_out = {}
            for output in self.plan.outputs:
                shape = tuple(context.get_tensor_shape(output.name))
                buffers.append(DeviceBuffer(int(np.prod(shape)) * 4))
                context.set_tensor_address(output.name, buffers[-1].ptr)
                shapes_out[output.name] = (shape, buffers[-1])
            if not context.execute_async_v3(stream.handle):
                raise EngineBuildError("the engine failed to run the parity batch")
            stream.synchronize()
            results = {
                name: buffer.download(shape, np.dtype(np.float32))
                for name, (shape, buffer) in shapes_out.items()
            }
        finally:
            stream.close()
            for buffer in buffers:
                buffer.free()
        session = ort.InferenceSession(str(self.onnx_file), providers=["CPUExecutionProvider"])
        names = [t.name for t in self.plan.outputs]
        reference = session.run(names, {contracts.INPUT_IMAGE: batch})
        return {
            name: float(np.max(np.abs(results[name] - ref)))
            for name, ref in zip(names, reference, strict=True)
        }


def _make_calibrator(trt: Any, batches: Iterator[np.ndarray], cache_file: Path) -> Any:
    """An IInt8EntropyCalibrator2 fed from `batches` (one device buffer, refilled per batch)."""
    from ctjoint.export.cuda_buffers import DeviceBuffer

    class PhantomCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.samples = 0
            self._device: DeviceBuffer | None = None

        def get_batch_size(self) -> int:
            return CALIBRATION_BATCH

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(batches, None)
            if batch is None:
                return None
            if batch.shape[0] < CALIBRATION_BATCH:  # the calibration profile is fixed-size
                pad = np.repeat(batch[-1:], CALIBRATION_BATCH - batch.shape[0], axis=0)
                batch = np.concatenate([batch, pad])
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if self._device is None:
                self._device = DeviceBuffer(batch.nbytes)
            self._device.upload(batch)
            self.samples += batch.shape[0]
            return [self._device.ptr]

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
