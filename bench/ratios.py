"""The performance ratios of the serving path, each numerator and denominator measured in one
run on the same series (a phantom chest CT, 512x512x100 by default), printed with its target.

    .venv/bin/python bench/ratios.py [--size 512 --slices 100] [--only decode,upload,...]
    .venv/bin/python bench/ratios.py --slices 100,400,600 [--only growth,tail] [--doc FILE]

1. triton   Triton path per-scan time / embedded in-process ONNX Runtime        (<= 1.10)
2. overhead gateway non-model time / model time (Triton's own compute stats)    (<= 0.25)
3. decode   gateway decode + preprocess per slice / pydicom dcmread+pixel_array (<= 2.0)
4. upload   gateway gRPC receive path / bare grpc.aio byte stream, throughput   (>= 0.5)
5. scaling  end-to-end throughput at concurrency 4 / concurrency 1 via Triton   (>= 1.3)
6. tail     last file received -> result / the scan's model time (2.5D, jcs2d)  (<= 0.2)
            3D (deepsc3d, needs every slice before inference): the same interval /
            (model time + 0.5 s)                                                  (<= 1.0)
            as fast as loopback takes the files, and paced like a scanner (--pace files/s)
7. growth   per-slice cost of each stage at N slices / at the first count given  (<= 1.2)
            (read, validate, preprocess, infer, postprocess, total, and the process's CPU
            time; both models, embedded backend, streaming as `ctjoint analyze`; best of
            --growth-runs, counts alternated)

With several counts (`--slices 100,400,600`) every other ratio asked is measured once per
count, on its own phantom (named `NAME@COUNT`); `growth` is the default then, and --doc writes
its table between `<!-- slice growth -->` and `<!-- /slice growth -->`.

Two builds compared (each LABEL a list of --out files, e.g. runs alternated between them),
the table written between the markers `<!-- ratios compare -->` and `<!-- /ratios compare -->`
of a document:

    .venv/bin/python bench/ratios.py --compare before=a1.json,a2.json after=b1.json,b2.json \
        --doc docs/reliability.md

A benchmark, not a test: it takes minutes and its figures depend on the machine and its load
(printed with the results). Writes everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from ctjoint.bench import (
    BenchPoint,
    ScanSample,
    host_facts,
    load_series,
    phantom_series,
    run_point,
    run_scan,
    spawned_stack,
)
from ctjoint.launch import Stack
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

RATIOS = ("decode", "upload", "triton", "overhead", "scaling", "tail")
GROWTH = "growth"
# Wall-time stages as the pipeline times them, and "cpu": the process's CPU seconds over the
# whole analysis (every thread), which a shared machine's load inflates far less.
GROWTH_STAGES = ("read", "validate", "preprocess", "infer", "postprocess", "total", "cpu")
GROWTH_MODELS = ("jcs2d", "deepsc3d")
GROWTH_TARGET = 1.2


@dataclass(frozen=True)
class Ratio:
    """One figure: numerator / denominator against its target."""

    name: str
    what: str
    numerator: float
    denominator: float
    unit: str
    target: float
    at_most: bool
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return self.numerator / self.denominator if self.denominator else float("inf")

    @property
    def met(self) -> bool:
        return self.value <= self.target if self.at_most else self.value >= self.target

    def line(self) -> str:
        sign = "<=" if self.at_most else ">="
        verdict = "met" if self.met else "MISSED"
        return (
            f"{self.name:<9} {self.value:7.3f}  (target {sign} {self.target:g}: {verdict})  "
            f"{self.what}: {self.numerator:.4g} / {self.denominator:.4g} {self.unit}"
        )


def _median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


# --- 3. decode + preprocess vs bare pydicom ----------------------------------------------------


def ratio_decode(contents: Sequence[bytes], model: str, runs: int) -> Ratio:
    """Per slice: the gateway's own per-file read/validate/decode to HU, series assembly and
    preprocessing (what it does before inference) against pydicom's dcmread + pixel_array."""
    from pydicom import dcmread

    from ctjoint.gateway.dicom_io import describe_source, read_ct_slice
    from ctjoint.gateway.preprocess import preprocess_volume
    from ctjoint.gateway.series import SeriesAssembler

    plan = _embedded_plan(model)

    def gateway() -> float:
        started = time.perf_counter()
        assembler = SeriesAssembler(expected_slices=len(contents))
        for index, data in enumerate(contents, start=1):
            source = describe_source(index)
            assembler.add(read_ct_slice(data, source=source, hu_out=assembler.next_slot))
        volume = assembler.finish()
        preprocess_volume(volume.hu, plan)
        return (time.perf_counter() - started) / len(contents)

    def bare() -> float:
        started = time.perf_counter()
        for data in contents:
            dcmread(io.BytesIO(data)).pixel_array  # noqa: B018 - the decode is the point
        return (time.perf_counter() - started) / len(contents)

    gateway_s, bare_s = [], []
    for _ in range(runs):  # alternated, so a load spike hits both sides alike
        gateway_s.append(gateway())
        bare_s.append(bare())
    return Ratio(
        "decode",
        "gateway decode+preprocess / pydicom dcmread+pixel_array, per slice",
        statistics.median(gateway_s) * 1e3,
        statistics.median(bare_s) * 1e3,
        "ms",
        2.0,
        True,
        {"gateway_ms_runs": gateway_s, "pydicom_ms_runs": bare_s},
    )


def _embedded_plan(model: str) -> Any:
    from ctjoint.gateway.backends.embedded import EmbeddedBackend

    async def load() -> Any:
        backend = EmbeddedBackend([model], intra_op_threads=1)
        await backend.load()
        try:
            return backend.model_info(model).plan
        finally:
            await backend.close()

    return asyncio.run(load())


# --- 4. upload: the gateway's receive path vs a bare grpc.aio stream ---------------------------


class _BareServicer(scan_pb2_grpc.ScanServiceServicer):
    """Reads the stream and nothing else: the floor for moving these bytes over gRPC."""

    async def AnalyzeScan(  # noqa: N802 - the generated base class names it
        self, request_iterator: AsyncIterator[scan_pb2.ScanRequest], context: Any
    ) -> scan_pb2.ScanResult:
        count = 0
        async for _ in request_iterator:
            count += 1
        return scan_pb2.ScanResult(request_id=str(count))


class _ReceiveServicer(scan_pb2_grpc.ScanServiceServicer):
    """The gateway's own receive path: header first, then `_Receiver` (per-file message type,
    slice-count and file-size limits, byte metrics, progress hook) yielding each file."""

    async def AnalyzeScan(  # noqa: N802 - the generated base class names it
        self, request_iterator: AsyncIterator[scan_pb2.ScanRequest], context: Any
    ) -> scan_pb2.ScanResult:
        from ctjoint.gateway.limits import GatewayLimits
        from ctjoint.gateway.metrics import GatewayMetrics
        from ctjoint.gateway.service import _Receiver

        stream = aiter(request_iterator)
        first = await anext(stream)
        receiver = _Receiver(
            stream,
            GatewayLimits(),
            self.metrics if hasattr(self, "metrics") else GatewayMetrics(),
            lambda stage, done, total: None,
            first.header.expected_files or None,
        )
        count = 0
        async for _ in receiver.files():
            count += 1
        return scan_pb2.ScanResult(request_id=str(count))


async def _upload_rates(contents: Sequence[bytes], runs: int) -> tuple[list[float], list[float]]:
    from ctjoint.gateway.limits import GatewayLimits
    from ctjoint.gateway.metrics import GatewayMetrics
    from ctjoint.gateway.server import MAX_SEND_MESSAGE_BYTES

    limits = GatewayLimits()
    options = [
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
    ]
    receive = _ReceiveServicer()
    receive.metrics = GatewayMetrics()  # type: ignore[attr-defined]
    servers, addresses = [], []
    for servicer in (_BareServicer(), receive):
        server = grpc.aio.server(options=options)
        scan_pb2_grpc.add_ScanServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    header = scan_pb2.ScanRequest(
        header=scan_pb2.ScanHeader(request_id="bench", expected_files=len(contents))
    )
    messages = [header] + [
        scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=c)) for c in contents
    ]
    total = sum(len(c) for c in contents)
    rates: tuple[list[float], list[float]] = ([], [])
    try:
        channels = [
            grpc.aio.insecure_channel(a, options=[("grpc.max_send_message_length", -1)])
            for a in addresses
        ]
        stubs = [scan_pb2_grpc.ScanServiceStub(c) for c in channels]

        async def stream() -> AsyncIterator[scan_pb2.ScanRequest]:
            for message in messages:
                yield message

        for _ in range(runs + 1):  # the first round warms both connections up
            for i, stub in enumerate(stubs):
                started = time.perf_counter()
                answer = await stub.AnalyzeScan(stream())
                seconds = time.perf_counter() - started
                if int(answer.request_id) < len(contents):
                    raise RuntimeError(f"server {i} saw {answer.request_id} messages")
                rates[i].append(total / seconds / 1e6)
        for channel in channels:
            await channel.close()
    finally:
        for server in servers:
            await server.stop(None)
    return rates[0][1:], rates[1][1:]


def ratio_upload(contents: Sequence[bytes], runs: int) -> Ratio:
    bare, gateway = asyncio.run(_upload_rates(contents, runs))
    return Ratio(
        "upload",
        "gateway receive path / bare grpc.aio stream, loopback throughput",
        statistics.median(gateway),
        statistics.median(bare),
        "MB/s",
        0.5,
        False,
        {"gateway_mb_s_runs": gateway, "bare_mb_s_runs": bare, "mb": sum(map(len, contents)) / 1e6},
    )


# --- 1. Triton vs embedded, in-process, same volume --------------------------------------------


async def _per_scan_times(
    contents: Sequence[bytes], model: str, triton_url: str, runs: int
) -> dict[str, list[float]]:
    from ctjoint.gateway.analysis import ScanAnalyzer
    from ctjoint.gateway.backends.embedded import EmbeddedBackend
    from ctjoint.gateway.backends.triton import (
        MAX_IN_FLIGHT_PER_SCAN,
        REQUEST_SLICES,
        TritonBackend,
    )
    from ctjoint.gateway.dicom_io import describe_source, read_ct_slice
    from ctjoint.gateway.series import SeriesAssembler

    assembler = SeriesAssembler(expected_slices=len(contents))
    for index, data in enumerate(contents, start=1):
        source = describe_source(index)
        assembler.add(read_ct_slice(data, source=source, hu_out=assembler.next_slot))
    volume = assembler.finish()
    embedded = EmbeddedBackend([model])
    triton = TritonBackend(triton_url, [model], load_timeout_s=120.0)
    await embedded.load()
    await triton.load()
    analyzers = {
        # As the gateway configures each (gateway/server.py create_analyzer).
        "embedded": ScanAnalyzer(embedded),
        "triton": ScanAnalyzer(
            triton, batch_size=REQUEST_SLICES, max_in_flight=MAX_IN_FLIGHT_PER_SCAN
        ),
    }
    times: dict[str, list[float]] = {f"{k}_{s}": [] for k in analyzers for s in ("scan", "infer")}
    try:
        for round_ in range(runs + 1):  # round 0 warms both paths up
            for name, analyzer in analyzers.items():
                started = time.perf_counter()
                analysis = await analyzer.analyze_volume(volume, model)
                seconds = time.perf_counter() - started
                if round_:
                    times[f"{name}_scan"].append(seconds)
                    times[f"{name}_infer"].append(analysis.result.timings.infer_ms / 1e3)
    finally:
        await embedded.close()
        await triton.close()
    return times


def ratio_triton(contents: Sequence[bytes], model: str, triton_url: str, runs: int) -> Ratio:
    times = asyncio.run(_per_scan_times(contents, model, triton_url, runs))
    infer = statistics.median(times["triton_infer"]) / statistics.median(times["embedded_infer"])
    return Ratio(
        "triton",
        f"{model} per scan (preprocess+infer+postprocess), Triton / embedded ORT",
        statistics.median(times["triton_scan"]),
        statistics.median(times["embedded_scan"]),
        "s",
        1.10,
        True,
        {"infer_stage_ratio": round(infer, 3), **times},
    )


# --- 7. growth: per-slice cost of each stage against the slice count ---------------------------


async def _stage_times(
    series: dict[int, Sequence[bytes]], models: Sequence[str], runs: int
) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Milliseconds per stage of each model at each count, `runs` times, in-process as a scan
    worker runs it (embedded backend, streaming intake, files as bytes, its allocator)."""
    import gc

    from ctjoint.gateway.analysis import ScanAnalyzer
    from ctjoint.gateway.backends.embedded import EmbeddedBackend
    from ctjoint.gateway.server import _keep_freed_memory

    # Memory as a gateway's scan worker has it (gateway/memory.py FreedMemory: freed arrays
    # kept for reuse, small pages): huge pages, when the kernel finds them, made a 100-slice
    # volume's fresh pages several times cheaper than a 400-slice one's on the build machine.
    _keep_freed_memory()
    backend = EmbeddedBackend(list(models))
    await backend.load()
    analyzer = ScanAnalyzer(backend, streaming=True)
    times: dict[str, dict[int, dict[str, list[float]]]] = {
        m: {n: {stage: [] for stage in GROWTH_STAGES} for n in series} for m in models
    }

    async def one(model: str, contents: Sequence[bytes]) -> dict[str, float]:
        gc.collect()
        inputs = [(f"{i:05d}.dcm", data) for i, data in enumerate(contents)]
        cpu = time.process_time()
        analysis = await analyzer.analyze_files(inputs, model, expected_slices=len(contents))
        return {**analysis.result.timings.to_dict(), "cpu_ms": (time.process_time() - cpu) * 1e3}

    try:
        smallest = min(series)
        for model in models:  # warm-up: sessions, allocator, caches
            await one(model, series[smallest])
        for _ in range(runs):  # counts alternated, so a load spike hits them alike
            for model in models:
                for count, contents in series.items():
                    timings = await one(model, contents)
                    for stage in GROWTH_STAGES:
                        times[model][count][stage].append(timings[f"{stage}_ms"])
    finally:
        await backend.close()
    return times


def ratios_growth(
    series: dict[int, Sequence[bytes]], models: Sequence[str], runs: int
) -> tuple[list[Ratio], str]:
    """Per model, stage and count above the first: per-slice cost (best of `runs`) at that
    count / at the first count; and the markdown table of all of them."""
    counts = list(series)
    base = counts[0]
    times = asyncio.run(_stage_times(series, models, runs))
    ratios: list[Ratio] = []
    header = "| model | stage | " + " | ".join(f"{n} slices" for n in counts) + " |"
    lines = [header, "|---|---|" + "---|" * len(counts)]
    for model in models:
        for stage in GROWTH_STAGES:
            per_slice = {n: min(times[model][n][stage]) / n for n in counts}
            cells = [f"{per_slice[base]:.3f} ms"]
            for count in counts[1:]:
                ratio = Ratio(
                    f"{GROWTH}-{model}-{stage}@{count}",
                    f"{model} {stage} per slice at {count} / at {base} slices (best of {runs})",
                    per_slice[count],
                    per_slice[base],
                    "ms",
                    GROWTH_TARGET,
                    True,
                    {"ms_runs": {n: times[model][n][stage] for n in counts}},
                )
                ratios.append(ratio)
                mark = "" if ratio.met else " **over**"
                cells.append(f"{per_slice[count]:.3f} ms ({ratio.value:.2f}x{mark})")
            lines.append(f"| {model} | {stage} | " + " | ".join(cells) + " |")
    return ratios, "\n".join(lines) + "\n"


# --- 2, 5, 6: through the gateway and Triton ---------------------------------------------------


def triton_compute_s(http_url: str, model: str) -> float:
    """Seconds Triton spent executing the network model (`<model>_cpu`), summed over its batch
    executions: batch_stats counts each execution once, where the per-request figures would
    count a batch of k requests k times."""
    name = f"{model}_cpu"
    with urllib.request.urlopen(f"{http_url}/v2/models/{name}/stats", timeout=10) as response:
        stats = json.load(response)
    total_ns = 0
    for entry in stats.get("model_stats", []):
        for batch in entry.get("batch_stats", []):
            total_ns += int(batch["compute_infer"]["ns"])
    return total_ns / 1e9


# A 3D model infers once every slice is in: its answer may come its model time plus this
# after the last file (issue 22, point 2); a 2.5D model's within TAIL_SHARE of its model time.
WHOLE_VOLUME_ALLOWANCE_S = 0.5
TAIL_SHARE = 0.2


def _tail(
    name: str,
    samples: Sequence[Any],
    model_s: float,
    upload: float | None,
    pace: float,
    model: str = "jcs2d",
) -> Ratio:
    tails = [s.latency_s - s.last_received_s for s in samples if s.last_received_s]
    how = f"files sent at {pace:g}/s" if pace else "files sent as fast as gRPC takes them"
    whole_volume = model == "deepsc3d"
    return Ratio(
        name,
        (
            f"last file received -> result / (Triton compute + {WHOLE_VOLUME_ALLOWANCE_S:g} s), "
            f"per scan ({how})"
            if whole_volume
            else f"last file received -> result / Triton compute, per scan ({how})"
        ),
        statistics.median(tails),
        model_s + WHOLE_VOLUME_ALLOWANCE_S if whole_volume else model_s,
        "s",
        1.0 if whole_volume else TAIL_SHARE,
        True,
        {
            "tails_s": tails,
            # The gateway's own figure for the same interval, from its result timings.
            "gateway_after_last_file_s": [
                s.stages_ms.get("after_last_file", 0.0) / 1e3 for s in samples
            ],
            "upload_mb_s_gateway": upload,
            "pace_files_per_s": pace,
        },
    )


def _point_and_model_time(
    stack: Stack,
    contents: Sequence[bytes],
    model: str,
    *,
    scans: int,
    pids: dict[str, int] | None = None,
    interval_s: float = 0.0,
) -> tuple[BenchPoint, list[ScanSample], float]:
    """One scan at a time through the spawned stack, and Triton's own compute seconds per scan
    over the same scans (its counters read before and after)."""
    assert stack.triton_http_url is not None
    before = triton_compute_s(stack.triton_http_url, model)
    point, samples = run_point(
        stack.address,
        contents,
        model=model,
        concurrency=1,
        scans=scans,
        pids=pids,
        progress_events=True,
        interval_s=interval_s,
    )
    model_s = (triton_compute_s(stack.triton_http_url, model) - before) / len(samples)
    return point, samples, model_s


def ratios_end_to_end(
    contents: Sequence[bytes],
    series_dir: Path,
    model: str,
    scans: int,
    wanted: set[str],
    log_dir: Path,
    pace: float = 0.0,
) -> tuple[list[Ratio], str | None]:
    ratios: list[Ratio] = []
    with spawned_stack(log_dir, backend="triton") as stack:
        assert stack.triton_http_url is not None and stack.triton_url is not None
        if "triton" in wanted:
            ratios.append(ratio_triton(contents, model, stack.triton_url, max(2, scans)))
        if not wanted & {"overhead", "scaling", "tail"}:
            return ratios, stack.triton_url
        with grpc.insecure_channel(stack.address) as channel:
            run_scan(channel, contents, model=model)  # warm-up
        one, samples, model_s = _point_and_model_time(
            stack, contents, model, scans=scans, pids=stack.pids
        )
        gateway_ms = statistics.mean(s.stages_ms.get("gateway_total", 0.0) for s in samples)
        detail = {"c1": asdict(one), "triton_compute_s_per_scan": model_s}
        if "overhead" in wanted:
            ratios.append(
                Ratio(
                    "overhead",
                    "gateway_total - Triton compute / Triton compute, per scan",
                    gateway_ms / 1e3 - model_s,
                    model_s,
                    "s",
                    0.25,
                    True,
                    detail,
                )
            )
        if "tail" in wanted:
            ratios.append(_tail("tail", samples, model_s, one.upload_mb_per_s, 0.0, model))
            if pace > 0:
                # Loopback uploads 100 slices faster than two cores infer them, so the tail
                # above is mostly inference backlog; a scanner sends as it reconstructs.
                _, paced, paced_model_s = _point_and_model_time(
                    stack, contents, model, scans=scans, interval_s=1.0 / pace
                )
                ratios.append(_tail("tail-paced", paced, paced_model_s, None, pace, model))
        if "scaling" in wanted:
            four, _ = run_point(
                stack.address,
                contents,
                model=model,
                concurrency=4,
                scans=max(4, 2 * scans),
                pids=stack.pids,
                progress_events=True,
            )
            ratios.append(
                Ratio(
                    "scaling",
                    "end-to-end scans/s at concurrency 4 / concurrency 1 (gateway + Triton)",
                    four.scans_per_s,
                    one.scans_per_s,
                    "scans/s",
                    1.3,
                    False,
                    {"c1": asdict(one), "c4": asdict(four)},
                )
            )
    return ratios, None


DOC_BEGIN = "<!-- ratios compare -->"
DOC_END = "<!-- /ratios compare -->"
GROWTH_BEGIN = "<!-- slice growth -->"
GROWTH_END = "<!-- /slice growth -->"


def compare_table(runs: dict[str, list[Path]]) -> str:
    """A markdown table: each ratio's median value (and its numerator, in its unit) per label,
    over that label's result files, with the files' hosts and loads."""
    loaded = {label: [json.loads(p.read_text()) for p in paths] for label, paths in runs.items()}
    names: list[str] = []
    for results in loaded.values():
        for result in results:
            names.extend(r["name"] for r in result["ratios"] if r["name"] not in names)
    lines = [
        "| ratio | "
        + " | ".join(f"{label} (median of {len(loaded[label])})" for label in loaded)
        + " |",
        "|---|" + "---|" * len(loaded),
    ]
    for name in names:
        cells = []
        for results in loaded.values():
            found = [r for result in results for r in result["ratios"] if r["name"] == name]
            if not found:
                cells.append("-")
                continue
            value = statistics.median(r["value"] for r in found)
            numerator = statistics.median(r["numerator"] for r in found)
            cells.append(f"{value:.3f} ({numerator:.4g} {found[0]['unit']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # What the overhead and tail ratios are made of (the end-to-end point at concurrency 1):
    # a ratio can move because its denominator (Triton's compute) or its start (the last
    # file's arrival) moved while the scan as a whole did not.
    for figure, unit, read in _END_TO_END_FIGURES:
        cells = []
        for results in loaded.values():
            values = [read(d) for d in (_c1(result) for result in results) if d is not None]
            cells.append(f"{statistics.median(values):.4g} {unit}" if values else "-")
        if any(cell != "-" for cell in cells):
            lines.append(f"| {figure} | " + " | ".join(cells) + " |")
    for label, results in loaded.items():
        loads = ", ".join(str(r["host"]["load_average"][0]) for r in results)
        host = results[0]["host"]
        lines.append("")
        lines.append(f"{label}: {host['cpu']}, {host['cores']} cores, 1-min load at start {loads}")
    return "\n".join(lines) + "\n"


def _c1(result: dict[str, Any]) -> dict[str, Any] | None:
    """The overhead ratio's end-to-end point at concurrency 1, with Triton's compute."""
    for ratio in result["ratios"]:
        if ratio["name"] == "overhead" and "c1" in ratio.get("detail", {}):
            return {**ratio["detail"]["c1"], "compute_s": ratio["denominator"]}
    return None


_END_TO_END_FIGURES: tuple[tuple[str, str, Callable[[dict[str, Any]], float]], ...] = (
    ("scan, first message to answer", "s", lambda d: d["raw_stages_ms"]["gateway_total"] / 1e3),
    ("throughput at concurrency 1", "scans/s", lambda d: d["scans_per_s"]),
    ("Triton compute per scan", "s", lambda d: d["compute_s"]),
    (
        "last file received, from the first message",
        "s",
        lambda d: (
            (d["raw_stages_ms"]["gateway_total"] - d["raw_stages_ms"]["after_last_file"]) / 1e3
        ),
    ),
)


def write_into_doc(
    doc: Path, table: str, command: str, markers: tuple[str, str] = (DOC_BEGIN, DOC_END)
) -> None:
    """Replace what lies between the markers in `doc` with the table and its command."""
    text = doc.read_text()
    begin_mark, end_mark = markers
    begin, end = text.find(begin_mark), text.find(end_mark)
    if begin < 0 or end < begin:
        raise SystemExit(f"{doc}: no {begin_mark} ... {end_mark} block to write into")
    block = f"{begin_mark}\n`{command}`\n\n{table}"
    doc.write_text(text[:begin] + block + text[end:])


def _counts(parser: argparse.ArgumentParser, text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--slices takes counts separated by commas, not {text!r}")
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        parser.error(f"--slices takes distinct positive counts, not {text!r}")
    return counts


def _at_count(
    contents: Sequence[bytes], series_dir: Path, wanted: set[str], args: argparse.Namespace
) -> list[Ratio]:
    """The ratios other than growth, on one series."""
    ratios: list[Ratio] = []
    if "decode" in wanted:
        ratios.append(ratio_decode(contents, args.model, args.runs))
    if "upload" in wanted:
        ratios.append(ratio_upload(contents, args.runs))
    if wanted & {"triton", "overhead", "scaling", "tail"}:
        more, _ = ratios_end_to_end(
            contents,
            series_dir,
            args.model,
            args.scans,
            wanted,
            args.out.parent / "logs",
            args.pace,
        )
        ratios.extend(more)
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="LABEL=OUT.json[,OUT.json...]",
        help="compare earlier runs instead of measuring (see the module docstring)",
    )
    parser.add_argument(
        "--doc", type=Path, help="with --compare or growth: the document to write into"
    )
    parser.add_argument("--series", type=Path, help="series folder (default: a phantom)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--slices", default="100", help="slice count, or counts separated by commas"
    )
    parser.add_argument("--model", default="jcs2d", choices=("jcs2d", "deepsc3d"))
    parser.add_argument("--scans", type=int, default=3, help="scans per end-to-end point")
    parser.add_argument("--runs", type=int, default=5, help="repeats of in-process figures")
    parser.add_argument(
        "--only",
        default=None,
        help=f"subset of {','.join(RATIOS)},{GROWTH} (default: all but growth for one count, "
        "growth for several)",
    )
    parser.add_argument("--growth-runs", type=int, default=2, help="repeats of each growth point")
    parser.add_argument("--out", type=Path, default=Path("out/bench/ratios.json"))
    parser.add_argument("--phantoms", type=Path, default=Path("out/bench/phantoms"))
    parser.add_argument(
        "--pace",
        type=float,
        default=30.0,
        help="files per second for the paced tail figure (0: unpaced only)",
    )
    args = parser.parse_args(argv)
    if args.compare:
        runs = {}
        for item in args.compare:
            label, _, paths = item.partition("=")
            runs[label] = [Path(p) for p in paths.split(",") if p]
        table = compare_table(runs)
        print(table)
        if args.doc is not None:
            command = "bench/ratios.py " + " ".join(sys.argv[1:] if argv is None else list(argv))
            write_into_doc(args.doc, table, command)
        return 0
    counts = _counts(parser, args.slices)
    several = len(counts) > 1
    only = args.only or (GROWTH if several else ",".join(RATIOS))
    wanted = {w.strip() for w in only.split(",")}
    wanted.discard("")
    unknown = wanted - {*RATIOS, GROWTH}
    if unknown:
        parser.error(f"unknown ratio(s) {sorted(unknown)}; choose from {','.join(RATIOS)},growth")
    if GROWTH in wanted and not several:
        parser.error("growth needs several slice counts, e.g. --slices 100,400,600")
    if args.series is not None and several:
        parser.error("--series takes one count; several counts are phantoms")
    host = host_facts()
    series: dict[int, Path] = {}
    contents: dict[int, list[bytes]] = {}
    for count in counts:
        series[count] = args.series or phantom_series(args.phantoms, size=args.size, slices=count)
        contents[count] = load_series(series[count])
        print(
            f"series {series[count]}: {len(contents[count])} files, "
            f"{sum(map(len, contents[count])) / 1e6:.1f} MB",
            flush=True,
        )
    print(f"{host['cpu']}, {host['cores']} cores, load {host['load_average']}", flush=True)
    ratios: list[Ratio] = []
    if GROWTH in wanted:
        growth, table = ratios_growth(
            {n: contents[n] for n in counts}, GROWTH_MODELS, args.growth_runs
        )
        ratios.extend(growth)
        load = host_facts()["load_average"]
        table += (
            f"\nPer-slice cost, best of {args.growth_runs} (ratio to {counts[0]} slices; target "
            f"<= {GROWTH_TARGET:g}x); {host['cpu']}, {host['cores']} cores, 1-min load "
            f"{host['load_average'][0]} at start, {load[0]} at end.\n"
        )
        print(table, flush=True)
        if args.doc is not None:
            command = "bench/ratios.py " + " ".join(sys.argv[1:] if argv is None else list(argv))
            write_into_doc(args.doc, table, command, (GROWTH_BEGIN, GROWTH_END))
    for count in counts:
        more = _at_count(contents[count], series[count], wanted, args)
        for ratio in more:
            if several:
                ratio = replace(ratio, name=f"{ratio.name}@{count}")
            print(ratio.line(), flush=True)
            ratios.append(ratio)
    load_after = host_facts()["load_average"]
    print(f"load average before {host['load_average']}, after {load_after}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "series": {n: str(p) for n, p in series.items()},
                "model": args.model,
                "host": host,
                "load_after": load_after,
                "ratios": [{**asdict(r), "value": r.value, "met": r.met} for r in ratios],
            },
            indent=2,
            default=float,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
