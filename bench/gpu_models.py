"""Model-only throughput on an NVIDIA GPU: torch eager fp32/fp16, ONNX Runtime and TensorRT
fp16/int8, for the `full` jcs2d (2.5D, 512x512) and deepsc3d (3D) configurations.

    .venv/bin/python bench/gpu_models.py [--models jcs2d,deepsc3d] [--out out/bench/gpu.json]

Throughput is of the network alone (input already on the device, outputs left there): no
DICOM, no preprocessing, no serving. The networks are freshly initialised (`full` weights are
not bundled); speed does not depend on the weights. The TensorRT engines are built by
export/tensorrt_build.py, with its parity check against ONNX Runtime. On a machine without a
CUDA GPU (torch.cuda unavailable, or no tensorrt package) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Samples per timed call: a batch of slices for the 2.5D model, one scan for the 3D one.
BATCH = {"jcs2d": 16, "deepsc3d": 1}
WARMUP = 5


@dataclass(frozen=True)
class Figure:
    model: str
    mode: str
    batch: int
    samples_per_s: float | None
    ms_per_batch: float | None
    note: str = ""

    def line(self) -> str:
        if self.samples_per_s is None:
            return f"{self.model:<9} {self.mode:<16} skipped: {self.note}"
        unit = "slices/s" if self.model == "jcs2d" else "scans/s"
        return (
            f"{self.model:<9} {self.mode:<16} {self.samples_per_s:10.1f} {unit:<8} "
            f"({self.ms_per_batch:.2f} ms per batch of {self.batch}) {self.note}"
        )


def _time(run: Callable[[], None], sync: Callable[[], None], seconds: float) -> float:
    """Mean seconds per call over at least `seconds` (after warm-up), device-synchronised."""
    for _ in range(WARMUP):
        run()
    sync()
    calls, started = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        if calls % 5 == 0:
            sync()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return elapsed / calls


def _figure(model: str, mode: str, batch: int, per_call: float, note: str = "") -> Figure:
    return Figure(model, mode, batch, round(batch / per_call, 2), round(per_call * 1e3, 3), note)


def bench_model(model: str, seconds: float, work: Path) -> list[Figure]:
    import torch

    from ctjoint import contracts
    from ctjoint.export.configs import get_config
    from ctjoint.export.models import build_model
    from ctjoint.export.onnx_export import export_network, input_shape
    from ctjoint.export.tensorrt_build import build_engine

    config = get_config(model, "full")
    batch = BATCH[model]
    net = build_model(config).eval()
    shape = input_shape(config, batch)
    figures: list[Figure] = []
    sync = torch.cuda.synchronize
    # .cuda() and .half() convert the module in place; it goes back to fp32 on the CPU after.
    net.cuda()
    x = torch.randn(shape, device="cuda")
    xh = x.half()
    with torch.inference_mode():
        per_call = _time(lambda: net(x), sync, seconds)
        figures.append(_figure(model, "torch fp32", batch, per_call))
        net.half()
        per_call = _time(lambda: net(xh), sync, seconds)
        figures.append(_figure(model, "torch fp16", batch, per_call))
    net.float().cpu()
    torch.cuda.empty_cache()

    onnx_file = work / f"{model}_full.onnx"
    export_network(net, config, onnx_file)
    figures.append(_onnxruntime(model, onnx_file, shape, batch, seconds))

    for precision in ("fp16", "int8"):
        engine = work / f"{model}_full_{precision}.plan"
        try:
            record = build_engine(
                model=model,
                precision=precision,
                onnx_file=onnx_file,
                out=engine,
                max_batch=max(batch, 1),
                timing_cache=work / "timing.cache",
            )
        except Exception as err:  # a refused build is a result to report, not a crash
            figures.append(Figure(model, f"tensorrt {precision}", batch, None, None, str(err)))
            continue
        per_call = _tensorrt_seconds(engine, shape, seconds, contracts)
        figures.append(
            _figure(
                model,
                f"tensorrt {precision}",
                batch,
                per_call,
                f"parity {record.parity_max_abs_diff}",
            )
        )
    return figures


def _onnxruntime(
    model: str, onnx_file: Path, shape: Sequence[int], batch: int, seconds: float
) -> Figure:
    """ONNX Runtime with its CUDA provider when installed (onnxruntime-gpu), inputs and outputs
    bound on the device (IO binding) so copies are not timed."""
    import numpy as np
    import onnxruntime as ort

    from ctjoint import contracts

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return Figure(
            model,
            "onnxruntime cuda",
            batch,
            None,
            None,
            "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)",
        )
    session = ort.InferenceSession(str(onnx_file), providers=["CUDAExecutionProvider"])
    image = ort.OrtValue.ortvalue_from_numpy(
        np.random.default_rng(0).standard_normal(shape).astype(np.float32), "cuda", 0
    )
    binding = session.io_binding()
    binding.bind_ortvalue_input(contracts.INPUT_IMAGE, image)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    per_call = _time(
        lambda: session.run_with_iobinding(binding), binding.synchronize_outputs, seconds
    )
    return _figure(model, "onnxruntime cuda", batch, per_call)


def _tensorrt_seconds(
    engine_file: Path, shape: Sequence[int], seconds: float, contracts: Any
) -> float:
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_file.read_bytes())
    context = engine.create_execution_context()
    context.set_input_shape(contracts.INPUT_IMAGE, list(shape))
    image = torch.randn(tuple(shape), device="cuda")
    context.set_tensor_address(contracts.INPUT_IMAGE, image.data_ptr())
    buffers = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            out = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda")
            buffers.append(out)
            context.set_tensor_address(name, out.data_ptr())
    stream = torch.cuda.Stream()
    return _time(lambda: context.execute_async_v3(stream.cuda_stream), stream.synchronize, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="jcs2d,deepsc3d")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per mode")
    parser.add_argument("--out", type=Path, default=Path("out/bench/gpu_models.json"))
    args = parser.parse_args(argv)
    from ctjoint.export.tensorrt_build import gpu_problem

    problem = gpu_problem()
    if problem is not None:
        print(f"GPU benchmark skipped: {problem}")
        return 0
    import torch

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="ctjoint-gpu-bench-") as tmp:
        for model in models:
            if model not in BATCH:
                parser.error(f"unknown model {model!r}; expected jcs2d or deepsc3d")
            for figure in bench_model(model, args.seconds, Path(tmp)):
                print(figure.line(), flush=True)
                figures.append(figure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"gpu": torch.cuda.get_device_name(0), "figures": [asdict(f) for f in figures]},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
