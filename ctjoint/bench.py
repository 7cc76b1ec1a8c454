"""`ctjoint bench`: end-to-end throughput and latency of a running gateway, swept over
concurrency, with the gateway's own per-stage timings and the CPU and memory of the serving
processes. Writes JSON, CSV and a PNG plot.

At the command-line layer (docs/architecture.md), beside the CLI: the sweep needs the client
side only (no torch, no onnxruntime); `--spawn` starts tritonserver and a gateway (the gateway
side, imported only then) and writes a phantom series (the export extra); the plot is drawn
with matplotlib (the `bench` extra).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ctjoint.client.channel import ChannelSecurity
from ctjoint.client.channel import open_channel as open_secure_channel
from ctjoint.client.errors import ChannelConfigError
from ctjoint.client.send import MAX_RECEIVE_MESSAGE_BYTES, list_series_files
from ctjoint.contracts import REQUEST_ID_METADATA
from ctjoint.errors import CtJointError
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

if TYPE_CHECKING:
    from ctjoint.launch import Stack

log = logging.getLogger(__name__)

REPORT_JSON: Final = "bench.json"
REPORT_CSV: Final = "bench.csv"
REPORT_PNG: Final = "bench.png"
# The stage breakdown, each a sum of the gateway's own timing entries (in ms).
STAGE_GROUPS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("receive", ("receive",)),
    ("decode", ("read", "validate")),
    ("preprocess", ("preprocess",)),
    ("infer", ("infer",)),
    ("postprocess", ("postprocess",)),
    ("outputs", ("encode", "dicom_outputs")),
)
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(CtJointError):
    """The benchmark could not run: bad arguments, no gateway, a scan that failed."""


# --- one scan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanSample:
    """One scan as the client saw it, plus the gateway's stage timings (ms) for it.

    `last_received_s` is when the gateway reported the last file received (seconds after the
    call started; only with progress events), `result_s` when the answer arrived.
    """

    latency_s: float
    slices: int
    upload_bytes: int
    stages_ms: dict[str, float]
    last_received_s: float | None = None


def scan_messages(
    contents: Sequence[bytes], *, model: str, request_id: str, interval_s: float = 0.0
) -> Iterator[scan_pb2.ScanRequest]:
    """The request stream of one scan: the header, then one message per file, optionally one
    every `interval_s` seconds (a scanner sends images as it reconstructs them)."""
    header = scan_pb2.ScanHeader(request_id=request_id, model=model, expected_files=len(contents))
    yield scan_pb2.ScanRequest(header=header)
    due = time.perf_counter()
    for content in contents:
        if interval_s > 0:
            due += interval_s
            time.sleep(max(0.0, due - time.perf_counter()))
        yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))


def open_channel(address: str, security: ChannelSecurity | None = None) -> grpc.Channel:
    """A channel through the client's one channel helper (TLS, mTLS, token as asked)."""
    try:
        return open_secure_channel(
            address,
            security,
            [
                ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
                ("grpc.max_send_message_length", -1),
            ],
        )
    except ChannelConfigError as err:
        raise BenchError(str(err)) from None


def run_scan(
    channel: grpc.Channel,
    contents: Sequence[bytes],
    *,
    model: str,
    progress_events: bool = False,
    timeout: float = 600.0,
    interval_s: float = 0.0,
) -> ScanSample:
    """Send one series (already in memory, so disk reads are not measured) and time it."""
    stub = scan_pb2_grpc.ScanServiceStub(channel)
    request_id = uuid.uuid4().hex[:16]
    metadata = ((REQUEST_ID_METADATA, request_id),)
    started = time.perf_counter()
    last_received: float | None = None
    result: scan_pb2.ScanResult | None = None
    messages = scan_messages(contents, model=model, request_id=request_id, interval_s=interval_s)
    try:
        if progress_events:
            for event in stub.AnalyzeScanWithProgress(messages, timeout=timeout, metadata=metadata):
                if event.HasField("result"):
                    result = event.result
                elif (
                    event.progress.stage == scan_pb2.Progress.STAGE_RECEIVED
                    and event.progress.done == len(contents)
                ):
                    last_received = time.perf_counter() - started
        else:
            result = stub.AnalyzeScan(messages, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        details = err.details() if hasattr(err, "details") else str(err)
        raise BenchError(f"scan failed: {code}: {details}") from None
    latency = time.perf_counter() - started
    if result is None:
        raise BenchError("the gateway closed the stream without a result")
    stages: dict[str, float] = {}
    for timing in result.timings:
        stages[timing.stage] = stages.get(timing.stage, 0.0) + float(timing.milliseconds)
    return ScanSample(
        latency_s=latency,
        slices=int(result.geometry.slices),
        upload_bytes=sum(len(c) for c in contents),
        stages_ms=stages,
        last_received_s=last_received,
    )


# --- process CPU and memory (Linux /proc) ---------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Triton's python-backend stubs are its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, ()))
    return tree


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the processes (utime and stime are fields 14 and 15)."""
    total = 0
    for pid in pids:
        stat = _read_stat(pid)
        if stat is not None:
            total += int(stat[11]) + int(stat[12])
    return total / _CLOCK_TICKS


def tree_rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(fields[1]) * _PAGE_SIZE
    return total


class ResourceSampler:
    """CPU seconds used and peak RSS of named process trees over an interval, sampled on a
    background thread (peak memory falls between samples, so the interval is short)."""

    def __init__(self, pids: Mapping[str, int], interval_s: float = 0.2) -> None:
        self._roots = dict(pids)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trees: dict[str, list[int]] = {}
        self._cpu_start: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self.cpu_s: dict[str, float] = {}
        self._started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> ResourceSampler:
        self._started = time.perf_counter()
        for name, pid in self._roots.items():
            self._trees[name] = process_tree(pid)
            self._cpu_start[name] = tree_cpu_seconds(self._trees[name])
            self.peak_rss[name] = tree_rss_bytes(self._trees[name])
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for name, tree in self._trees.items():
                self.peak_rss[name] = max(self.peak_rss[name], tree_rss_bytes(tree))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = time.perf_counter() - self._started
        for name, tree in self._trees.items():
            self.cpu_s[name] = tree_cpu_seconds(tree) - self._cpu_start[name]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per process tree: CPU seconds, mean CPU percent of one core, peak RSS in MB."""
        return {
            name: {
                "cpu_s": round(self.cpu_s.get(name, 0.0), 3),
                "cpu_percent": round(100.0 * self.cpu_s.get(name, 0.0) / self.seconds, 1)
                if self.seconds
                else 0.0,
                "peak_rss_mb": round(self.peak_rss.get(name, 0) / 1e6, 1),
            }
            for name in self._roots
        }


# --- one point of the sweep and the whole report ----------------------------------------------


@dataclass(frozen=True)
class BenchPoint:
    """All scans at one concurrency."""

    concurrency: int
    scans: int
    slices_per_scan: int
    wall_s: float
    scans_per_s: float
    slices_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    stages_ms: dict[str, float]
    raw_stages_ms: dict[str, float]
    processes: dict[str, dict[str, float]]
    upload_mb_per_s: float | None = None
    last_file_to_result_ms: float | None = None

    def csv_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("stages_ms", "raw_stages_ms", "processes")
        }
        for stage, _ in STAGE_GROUPS:
            row[f"{stage}_ms"] = self.stages_ms.get(stage, 0.0)
        for name, figures in self.processes.items():
            for key, value in figures.items():
                row[f"{name}_{key}"] = value
        return row


@dataclass(frozen=True)
class BenchReport:
    model: str
    gateway: str
    series: str
    slices: int
    upload_bytes_per_scan: int
    points: tuple[BenchPoint, ...]
    host: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["points"] = [asdict(p) for p in self.points]
        return data

    def summary(self) -> str:
        lines = [
            f"{self.model} on {self.gateway}: {self.slices} slices per scan "
            f"({self.upload_bytes_per_scan / 1e6:.1f} MB)"
        ]
        for p in self.points:
            stages = ", ".join(f"{k} {v:.0f}" for k, v in p.stages_ms.items())
            procs = "; ".join(
                f"{name} CPU {f['cpu_percent']:.0f}% RSS {f['peak_rss_mb']:.0f} MB"
                for name, f in p.processes.items()
            )
            lines.append(
                f"  concurrency {p.concurrency}: {p.scans_per_s:.3f} scans/s, "
                f"{p.slices_per_s:.1f} slices/s, latency p50 {p.latency_p50_ms:.0f} / "
                f"p95 {p.latency_p95_ms:.0f} / p99 {p.latency_p99_ms:.0f} ms; "
                f"stages (ms per scan) {stages}" + (f"; {procs}" if procs else "")
            )
        return "\n".join(lines)


def stage_breakdown(samples: Sequence[ScanSample]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean ms per scan of the issue's stages, and of every raw timing entry the gateway sent."""
    raw: dict[str, float] = {}
    for sample in samples:
        for stage, ms in sample.stages_ms.items():
            raw[stage] = raw.get(stage, 0.0) + ms / len(samples)
    grouped = {name: sum(raw.get(part, 0.0) for part in parts) for name, parts in STAGE_GROUPS}
    return (
        {k: round(v, 3) for k, v in grouped.items()},
        {k: round(v, 3) for k, v in raw.items()},
    )


def run_point(
    address: str,
    contents: Sequence[bytes],
    *,
    model: str,
    concurrency: int,
    scans: int,
    pids: Mapping[str, int] | None = None,
    progress_events: bool = False,
    on_done: Any = None,
    security: ChannelSecurity | None = None,
    interval_s: float = 0.0,
) -> tuple[BenchPoint, list[ScanSample]]:
    """`scans` scans with `concurrency` in flight at a time (one channel per worker)."""
    if concurrency < 1 or scans < 1:
        raise BenchError("concurrency and scans must be at least 1")
    lock = threading.Lock()
    remaining = [scans]
    samples: list[ScanSample] = []

    def worker() -> None:
        with open_channel(address, security) as channel:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                sample = run_scan(
                    channel,
                    contents,
                    model=model,
                    progress_events=progress_events,
                    interval_s=interval_s,
                )
                with lock:
                    samples.append(sample)
                if on_done is not None:
                    on_done()

    workers = min(concurrency, scans)
    with ResourceSampler(pids or {}) as sampler, ThreadPoolExecutor(workers) as pool:
        started = time.perf_counter()
        futures = [pool.submit(worker) for _ in range(workers)]
        for future in futures:
            future.result()
        wall = time.perf_counter() - started
    latencies = np.array([s.latency_s for s in samples]) * 1000.0
    stages, raw = stage_breakdown(samples)
    slices = samples[0].slices
    uploads = [s.upload_bytes / s.last_received_s / 1e6 for s in samples if s.last_received_s]
    tails = [s.latency_s - s.last_received_s for s in samples if s.last_received_s is not None]
    point = BenchPoint(
        concurrency=concurrency,
        scans=len(samples),
        slices_per_scan=slices,
        wall_s=round(wall, 3),
        scans_per_s=round(len(samples) / wall, 4),
        slices_per_s=round(sum(s.slices for s in samples) / wall, 2),
        latency_p50_ms=round(float(np.percentile(latencies, 50)), 2),
        latency_p95_ms=round(float(np.percentile(latencies, 95)), 2),
        latency_p99_ms=round(float(np.percentile(latencies, 99)), 2),
        stages_ms=stages,
        raw_stages_ms=raw,
        processes=sampler.summary(),
        upload_mb_per_s=round(float(np.median(uploads)), 2) if uploads else None,
        last_file_to_result_ms=round(float(np.median(tails)) * 1000.0, 2) if tails else None,
    )
    return point, samples


def load_series(series_dir: Path) -> list[bytes]:
    """Every file of the series, read once, so each scan sends the same bytes from memory."""
    try:
        return [path.read_bytes() for path in list_series_files(series_dir)]
    except Exception as err:  # SendError or OSError, both worth one line
        raise BenchError(f"cannot read the series in {series_dir}: {err}") from err


def parse_concurrency(text: str) -> list[int]:
    """'1,2,4' or '1:4' (inclusive range) -> sorted distinct positive levels."""
    try:
        if ":" in text:
            low, high = (int(v) for v in text.split(":", 1))
            levels = list(range(low, high + 1))
        else:
            levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"concurrency must look like 1,2,4 or 1:4, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise BenchError(f"concurrency levels must be positive integers, got {text!r}")
    return sorted(set(levels))


def write_doc_block(path: Path, begin: str, end: str, lines: Sequence[str]) -> None:
    """Replace the block between the marker lines `begin` and `end` of a docs page with
    `lines`: how the benchmark scripts write their tables into docs/ (never typed by hand)."""
    text = path.read_text(encoding="utf-8")
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"{path}: no {begin} ... {end} block to write into")
    block = "\n".join([begin, *lines, end])
    path.write_text(text[:start] + block + text[stop + len(end) :], encoding="utf-8")


def host_line(host: Mapping[str, Any], load_end: float) -> str:
    """The footer of a benchmark's docs table: the CPU, its cores and the load around the run
    (these machines are shared, so a figure says what else was running)."""
    load = host.get("load_average") or ["?"]
    return (
        f"{host.get('cpu')}, {host.get('cores')} cores, 1-min load {load[0]} at start, "
        f"{load_end:.2f} at end"
    )


def host_facts() -> dict[str, Any]:
    """Where the figures were taken: CPU model, cores, load, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        load = []
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": load,
        "python": platform.python_version(),
    }


def run_bench(
    *,
    address: str,
    series_dir: Path,
    model: str,
    levels: Sequence[int],
    scans: int,
    out_dir: Path,
    pids: Mapping[str, int] | None = None,
    warmup: int = 1,
    progress_events: bool = False,
    show_progress: bool = True,
    security: ChannelSecurity | None = None,
) -> BenchReport:
    """The sweep: a warm-up scan, then `scans` scans per concurrency level; writes the reports."""
    contents = load_series(series_dir)
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (show_progress and console.is_terminal),
    )
    points: list[BenchPoint] = []
    slices = 0
    with bar:
        if warmup:
            task = bar.add_task("warm-up", total=warmup)
            with open_channel(address, security) as channel:
                for _ in range(warmup):
                    slices = run_scan(channel, contents, model=model).slices
                    bar.advance(task)
        for level in levels:
            task = bar.add_task(f"concurrency {level}", total=scans)
            point, _ = run_point(
                address,
                contents,
                model=model,
                concurrency=level,
                scans=scans,
                pids=pids,
                progress_events=progress_events,
                on_done=lambda task=task: bar.advance(task),
                security=security,
            )
            slices = point.slices_per_scan
            points.append(point)
    report = BenchReport(
        model=model,
        gateway=address,
        series=str(series_dir),
        slices=slices,
        upload_bytes_per_scan=sum(len(c) for c in contents),
        points=tuple(points),
        host=host_facts(),
    )
    write_reports(report, out_dir)
    return report


def write_reports(report: BenchReport, out_dir: Path) -> tuple[Path, Path, Path]:
    """bench.json (everything), bench.csv (one row per concurrency), bench.png (the plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, png_path = (
        out_dir / REPORT_JSON,
        out_dir / REPORT_CSV,
        out_dir / REPORT_PNG,
    )
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    rows = [p.csv_row() for p in report.points]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_report(report, png_path)
    return json_path, csv_path, png_path


# --- the plot (matplotlib, the `bench` extra) -------------------------------------------------


def plot_report(report: BenchReport, path: Path) -> None:
    """bench.png: throughput and p95 latency against concurrency, and the stage times per scan
    stacked in pipeline order."""
    if not report.points:
        raise BenchError("nothing to plot: the report has no points")
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise BenchError(
            "the plot needs matplotlib: pip install 'ctjoint[bench]' (make install has it)"
        ) from err
    levels = [str(p.concurrency) for p in report.points]
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    figure.suptitle(f"{report.model}, {report.slices} slices per scan")
    throughput, latency, stages = figure.subplots(1, 3)
    for axes, values, title, colour in (
        (throughput, [p.scans_per_s for p in report.points], "scans/s", "tab:blue"),
        (latency, [p.latency_p95_ms for p in report.points], "p95 latency (ms)", "tab:red"),
    ):
        axes.plot(levels, values, marker="o", color=colour)
        for level, value in zip(levels, values, strict=True):
            axes.annotate(f"{value:.3g}", (level, value), textcoords="offset points", xytext=(0, 6))
        axes.set_title(title)
        axes.set_xlabel("concurrency")
        axes.set_ylim(bottom=0, top=max(values) * 1.2 or 1.0)
    bottom = np.zeros(len(report.points))
    for stage, _ in STAGE_GROUPS:
        ms = np.array([p.stages_ms.get(stage, 0.0) for p in report.points])
        stages.bar(levels, ms, bottom=bottom, label=stage)
        bottom += ms
    stages.set_title("stage time per scan (ms)")
    stages.set_xlabel("concurrency")
    stages.legend(loc="upper left", fontsize="small")
    figure.savefig(path, format="png", dpi=100)


# --- a gateway (and Triton) started for the run -----------------------------------------------


@contextmanager
def spawned_stack(
    log_dir: Path, *, backend: str = "triton", threads: int | None = None
) -> Iterator[Stack]:
    """tritonserver on the checkout's CPU repository (triton backend) and a gateway, both on
    loopback with free ports (ctjoint/launch.py); stopped on exit."""
    try:
        from ctjoint.launch import LaunchError, serving_stack
    except ImportError as err:
        raise BenchError(f"--spawn needs the gateway side installed ({err})") from err
    args = () if threads is None else ("--threads", str(threads))
    try:
        with serving_stack(log_dir, *args, backend=backend) as stack:
            yield stack
    except (LaunchError, ImportError) as err:
        raise BenchError(f"--spawn could not start the stack: {err}") from err


def phantom_series(
    cache_dir: Path, *, size: int, slices: int, kind: str = "covid19", seed: int = 2026
) -> Path:
    """A phantom series (made once and cached); needs the export extra."""
    folder = cache_dir / f"phantom-{kind}-{size}x{slices}-s{seed}"
    series = folder / "series"
    if series.is_dir() and any(series.iterdir()):
        return series
    try:
        from ctjoint.export.phantom import write_phantom_case
    except ImportError as err:
        raise BenchError(
            f"making a phantom needs the export extra ({err}); pass --series DIR instead"
        ) from err
    write_phantom_case(folder, kind=kind, seed=seed, slices=slices, size=size)
    return series
