"""`make gpu-check`: the two networks on an NVIDIA GPU, one command, one report.

For jcs2d (2.5D slices) and deepsc3d (3D scans), `tiny` (the bundled weights) and `full`
(paper-scale, freshly initialised: speed does not depend on the weights) configurations:
model-only latency and throughput in torch eager fp32, fp16 and bf16 autocast,
`torch.compile` and CUDA graphs over a batch sweep (jcs2d 1-64 slices, deepsc3d 1-4 scans),
each mode's parity against eager fp32 on the same input (max class-probability difference,
mask agreement) and the peak GPU memory. Writes one JSON and one PNG.

Runs on a bare GPU machine with torch, numpy and (for the PNG) matplotlib: nothing to install,
no network; `make gpu-check` imports the package from the checkout. Where TensorRT and
tritonserver are present (the NGC image) it also builds fp16 and int8 engines of the shipped
models with export/tensorrt_build.py (parity included) and runs perf_analyzer against the GPU
repository. A time budget bounds the whole run; what did not fit is listed as skipped.

    make gpu-check                               # on the GPU machine
    make gpu-check GPU_CHECK_ARGS=--smoke        # anywhere: CPU, tiny sizes (proves it runs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("jcs2d", "deepsc3d")
BATCHES = {"jcs2d": (1, 2, 4, 8, 16, 32, 64), "deepsc3d": (1, 2, 3, 4)}
SMOKE_BATCHES = {"jcs2d": (1, 2), "deepsc3d": (1,)}
GPU_MODES = ("eager fp32", "autocast fp16", "autocast bf16", "torch.compile", "cuda graphs")
CPU_MODES = ("eager fp32", "autocast bf16")


# Each point is timed for at least `seconds` and `calls` calls, after `warmup` calls.
@dataclass(frozen=True)
class Timing:
    seconds: float = 0.4
    calls: int = 3
    warmup: int = 3


GPU_TIMING = Timing()
# The smoke run proves the script works; its CPU figures mean nothing.
SMOKE_TIMING = Timing(seconds=0.0, calls=1, warmup=1)


@dataclass
class Point:
    """One (model, configuration, mode, batch) measurement."""

    model: str
    config: str
    mode: str
    batch: int
    ms_per_batch: float
    samples_per_s: float
    peak_mib: float | None
    max_prob_diff: float
    mask_agreement: float


@dataclass
class Report:
    device: str
    torch: str
    python: str
    started: str
    budget_s: float
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tensorrt: list[dict[str, Any]] = field(default_factory=list)
    perf_analyzer: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _network(model: str, config_name: str) -> tuple[Any, Any]:
    """(net in eval mode, RunConfig): the bundled weights for tiny, fresh weights for full."""
    import torch

    from ctjoint.export.bundled import bundled_weights
    from ctjoint.export.configs import RunConfig, get_config
    from ctjoint.export.models import build_model

    if config_name == "tiny":
        data = torch.load(bundled_weights(model), map_location="cpu", weights_only=True)
        config = RunConfig.from_dict(data["config"])
        net = build_model(config)
        net.load_state_dict(data["state_dict"])
    else:
        config = get_config(model, config_name)
        net = build_model(config)
    return net.eval(), config


def _input_shape(config: Any, batch: int) -> tuple[int, ...]:
    plan = config.plan
    if plan.kind == "3d":
        return (batch, 1, plan.depth, plan.height, plan.width)
    return (batch, plan.channels, plan.height, plan.width)


class Runner:
    """The callables of every mode for one network on one device."""

    def __init__(self, net: Any, device: str) -> None:
        import torch

        self.torch = torch
        self.net = net.to(device)
        self.device = device
        self._compiled: Any = None
        self._graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}

    def _autocast(self, dtype: Any) -> Any:
        return self.torch.autocast(self.device, dtype=dtype)

    def call(self, mode: str, x: Any) -> tuple[Any, Any]:
        torch = self.torch
        with torch.inference_mode():
            if mode == "eager fp32":
                return self.net(x)[:2]
            if mode == "autocast fp16":
                with self._autocast(torch.float16):
                    return self.net(x)[:2]
            if mode == "autocast bf16":
                with self._autocast(torch.bfloat16):
                    return self.net(x)[:2]
            if mode == "torch.compile":
                if self._compiled is None:
                    # Automatic dynamic shapes: one recompile for the batch axis, not one per size.
                    self._compiled = torch.compile(self.net)
                return self._compiled(x)[:2]
            if mode == "cuda graphs":
                return self._replay(x)
        raise ValueError(f"unknown mode {mode!r}")

    def _replay(self, x: Any) -> tuple[Any, Any]:
        """fp32 eager captured once per input shape, then replayed (no launch overhead)."""
        torch = self.torch
        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up on a side stream, as capture requires
                    self.net(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.net(static_in)[:2]
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _time(run: Callable[[], object], sync: Callable[[], None], timing: Timing) -> float:
    """Mean seconds per call, device-synchronised, after warm-up."""
    for _ in range(timing.warmup):
        run()
    sync()
    calls, started = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        sync()
        elapsed = time.perf_counter() - started
        if calls >= timing.calls and elapsed >= timing.seconds:
            return elapsed / calls


def _parity(reference: tuple[Any, Any], outputs: tuple[Any, Any]) -> tuple[float, float]:
    """(max abs class-probability difference, fraction of mask voxels that agree)."""
    import torch

    ref_seg, ref_cls = (t.float() for t in reference)
    seg, cls = (t.float() for t in outputs)
    prob_diff = (torch.softmax(cls, -1) - torch.softmax(ref_cls, -1)).abs().max().item()
    agreement = (seg.argmax(1) == ref_seg.argmax(1)).float().mean().item()
    return float(prob_diff), float(agreement)


def measure(
    report: Report,
    model: str,
    config_name: str,
    modes: Sequence[str],
    batches: Sequence[int],
    device: str,
    deadline: float,
    timing: Timing = GPU_TIMING,
) -> None:
    import torch

    net, config = _network(model, config_name)
    runner = Runner(net, device)
    sync = _sync(device)
    generator = torch.Generator(device="cpu").manual_seed(17)
    for batch in batches:
        x = torch.randn(_input_shape(config, batch), generator=generator).to(device)
        reference = tuple(t.clone() for t in runner.call("eager fp32", x))
        for mode in modes:
            what = f"{model} {config_name} {mode} batch {batch}"
            if time.monotonic() > deadline:
                report.skipped.append(f"{what}: the time budget was spent")
                continue
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                outputs = runner.call(mode, x)
                prob_diff, agreement = _parity(reference, outputs)
                seconds = _time(lambda mode=mode, x=x: runner.call(mode, x), sync, timing)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # a result, not a crash
                report.skipped.append(f"{what}: {type(err).__name__}: {str(err)[:200]}")
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
            point = Point(
                model, config_name, mode, batch, round(seconds * 1e3, 3),
                round(batch / seconds, 2), None if peak is None else round(peak, 1),
                prob_diff, agreement,
            )  # fmt: skip
            report.points.append(point)
            print(
                f"{model:<8} {config_name:<4} {mode:<14} batch {batch:>2}: "
                f"{point.ms_per_batch:9.2f} ms, {point.samples_per_s:9.1f}/s, "
                f"peak {point.peak_mib} MiB, prob diff {prob_diff:.1e}, "
                f"mask agreement {agreement:.5f}",
                flush=True,
            )
    if device == "cuda":
        runner.net.cpu()
        torch.cuda.empty_cache()


def tensorrt_engines(report: Report, deadline: float, work: Path) -> dict[str, Path]:
    """fp16 and int8 engines of the shipped models, where TensorRT can run (else noted)."""
    if not any(importlib.util.find_spec(name) for name in ("tensorrt", "tensorrt_bindings")):
        # The bare GPU machine: no TensorRT, and no tritonclient for the build code either.
        report.skipped.append("TensorRT engines: TensorRT's Python bindings are not installed")
        return {}
    from ctjoint.export.bundled import bundled_onnx
    from ctjoint.export.tensorrt_build import build_engine, gpu_problem

    problem = gpu_problem()
    if problem is not None:
        report.skipped.append(f"TensorRT engines: {problem}")
        return {}
    engines: dict[str, Path] = {}
    for model in MODELS:
        for precision in ("fp16", "int8"):
            if time.monotonic() > deadline:
                report.skipped.append(f"TensorRT {model} {precision}: the time budget was spent")
                continue
            out = work / f"{model}_{precision}.plan"
            try:
                record = build_engine(
                    model=model,
                    precision=precision,
                    onnx_file=bundled_onnx(model),
                    out=out,
                    calibration_scans=2,
                    timing_cache=work / "timing.cache",
                )
            except Exception as err:  # a refused build is a finding to report
                report.tensorrt.append({"model": model, "precision": precision, "error": str(err)})
                continue
            report.tensorrt.append(asdict(record))
            print(record.summary(), flush=True)
            if precision == "fp16":
                engines[model] = out
    return engines


def perf_on_gpu_repository(report: Report, engines: dict[str, Path], work: Path) -> None:
    """perf_analyzer against the GPU repository served by tritonserver (the NGC image)."""
    if not shutil.which("tritonserver") or len(engines) != len(MODELS):
        report.skipped.append("perf_analyzer on the GPU repository: no tritonserver or engines")
        return
    from ctjoint.export.bundled import bundled_onnx
    from ctjoint.export.triton_perf import PerfAnalyzerError, run_perf_analyzer
    from ctjoint.export.triton_repository import write_repository
    from ctjoint.gateway.triton_server import TritonServer, TritonServerConfig, free_ports

    onnx_dir = work / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    engine_dir = work / "engines"
    engine_dir.mkdir(exist_ok=True)
    for model in MODELS:
        shutil.copyfile(bundled_onnx(model), onnx_dir / f"{model}.onnx")
        shutil.copyfile(engines[model], engine_dir / f"{model}.plan")
    repository = work / "repository"
    write_repository(repository, target="gpu", onnx_dir=onnx_dir, engine_dir=engine_dir)
    (grpc_port,) = free_ports(1)
    config = TritonServerConfig(repository, grpc_port=grpc_port)
    with TritonServer(config, log_file=work / "tritonserver.log"):
        for model, batch in (("jcs2d", 16), ("deepsc3d", 1)):
            try:
                perf = run_perf_analyzer(
                    model=model, url=config.grpc_url, concurrency="1:4", batch=batch,
                    out_dir=work / "perf",
                )  # fmt: skip
            except PerfAnalyzerError as err:
                report.perf_analyzer.append({"model": model, "error": str(err)})
                continue
            report.perf_analyzer.append(
                {"model": model, "batch": batch, "rows": [asdict(r) for r in perf.rows]}
            )
            print(perf.summary(), flush=True)


TABLE_BEGIN = "<!-- bench/gpu_models.py begin -->"
TABLE_END = "<!-- bench/gpu_models.py end -->"


def table(report: Report) -> str:
    """One row per network, configuration and mode: samples/s at the smallest and largest
    batch measured, that batch's peak memory and the worst parity against eager fp32."""
    lines = [
        f"{report.device}, torch {report.torch}, {report.started[:10]} "
        f"({report.seconds:.0f} s of a {report.budget_s:.0f} s budget; "
        f"{len(report.skipped)} measurements skipped):",
        "",
        "| model | config | mode | samples/s at batch 1 | largest batch | samples/s there "
        "| peak MiB there | max probability difference | min mask agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((p.model, p.config, p.mode) for p in report.points)
    for model, config, mode in keys:
        points = sorted(
            (p for p in report.points if (p.model, p.config, p.mode) == (model, config, mode)),
            key=lambda p: p.batch,
        )
        first, last = points[0], points[-1]
        peak = "-" if last.peak_mib is None else f"{last.peak_mib:.0f}"
        lines.append(
            f"| {model} | {config} | {mode} | "
            f"{first.samples_per_s:,.0f}{'' if first.batch == 1 else f' (batch {first.batch})'} "
            f"| {last.batch} | {last.samples_per_s:,.0f} | {peak} "
            f"| {max(p.max_prob_diff for p in points):.1e} "
            f"| {min(p.mask_agreement for p in points):.5f} |"
        )
    return "\n".join(lines)


def plot(report: Report, path: Path) -> str:
    """samples/s against batch, one panel per network and configuration, one line per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (re-run `--plot JSON` where it is)"
    panels = sorted({(p.model, p.config) for p in report.points})
    if not panels:
        return "nothing measured: no PNG"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for axis, (model, config) in zip(axes[0], panels, strict=True):
        for mode in dict.fromkeys(p.mode for p in report.points):
            points = [
                p for p in report.points if (p.model, p.config, p.mode) == (model, config, mode)
            ]
            if points:
                axis.plot(
                    [p.batch for p in points], [p.samples_per_s for p in points], "o-", label=mode
                )
        unit = "slices/s" if model == "jcs2d" else "scans/s"
        axis.set(title=f"{model} {config}", xlabel="batch", ylabel=unit, xscale="log", yscale="log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{report.device}, torch {report.torch} ({report.started[:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"))
    parser.add_argument("--budget-s", type=float, default=450.0, help="whole run, seconds")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--configs", default="tiny,full")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny configuration, small batches"
    )
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an earlier JSON")
    parser.add_argument("--doc", type=Path, help="with --plot: write its table here too")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot is not None:
        data = json.loads(args.plot.read_text())
        points = [Point(**p) for p in data.pop("points")]
        loaded = Report(
            **{k: data[k] for k in ("device", "torch", "python", "started", "budget_s")}
        )
        loaded.points = points
        loaded.skipped = list(data.get("skipped", []))
        loaded.seconds = float(data.get("seconds", 0.0))
        print(plot(loaded, args.out / "gpu_check.png"))
        if args.doc is not None:
            from doc_section import publish  # bench/doc_section.py

            return publish(table(loaded), args.doc, TABLE_BEGIN, TABLE_END)
        return 0

    started = time.monotonic()
    deadline = started + args.budget_s
    try:
        import torch
    except ImportError:  # the NGC image: no torch, but TensorRT and tritonserver
        torch = None
    cuda = torch is not None and torch.cuda.is_available()
    device = "cuda" if cuda and not args.smoke else "cpu"
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if torch is None:
        report = Report("unknown (no torch)", "none", platform.python_version(), now, args.budget_s)
        report.skipped.append("torch modes: torch is not installed here")
    else:
        if device == "cpu" and not args.smoke:
            print("no CUDA device is visible; run with --smoke for the CPU check", file=sys.stderr)
            return 2
        name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
        report = Report(
            device=name or "cpu",
            torch=torch.__version__,
            python=platform.python_version(),
            started=now,
            budget_s=args.budget_s,
        )
        modes = GPU_MODES if device == "cuda" else CPU_MODES
        configs = ("tiny",) if args.smoke else tuple(c for c in args.configs.split(",") if c)
        for config_name in configs:  # tiny first: the bundled models are measured regardless
            for model in (m for m in args.models.split(",") if m):
                batches = SMOKE_BATCHES[model] if args.smoke else BATCHES[model]
                timing = SMOKE_TIMING if args.smoke else GPU_TIMING
                measure(report, model, config_name, modes, batches, device, deadline, timing)
    if not args.smoke:
        with tempfile.TemporaryDirectory(prefix="ctjoint-gpu-check-") as tmp:
            engines = tensorrt_engines(report, deadline, Path(tmp))
            perf_on_gpu_repository(report, engines, Path(tmp))
    report.seconds = round(time.monotonic() - started, 1)
    json_path = args.out / "gpu_check.json"
    json_path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"wrote {json_path} ({len(report.points)} points, {len(report.skipped)} skipped)")
    print(plot(report, args.out / "gpu_check.png"))
    for line in report.skipped:
        print(f"skipped: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
