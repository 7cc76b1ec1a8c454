"""perf_analyzer figures for both ensembles at concurrency 1..4, next to the end-to-end
figures of `ctjoint bench`, so the cost of the gateway (DICOM, preprocessing, postprocessing,
outputs) shows beside Triton alone.

    make perf-tools
    .venv/bin/python bench/perf_analyzer.py [--url HOST:PORT] \
        [--e2e jcs2d=out/bench/jcs2d/bench.json --e2e deepsc3d=out/bench/deepsc3d/bench.json] \
        [--doc docs/performance.md]

Without --url it starts tritonserver on the checkout's CPU repository (free loopback ports)
and stops it after. jcs2d requests carry 4 slices each (what the gateway sends, REQUEST_SLICES),
deepsc3d requests one scan. perf_analyzer's input is zeros; the cost does not depend on values.
With --doc the run's table (and the command and machine) replaces the block between DOC_BEGIN
and DOC_END of that Markdown file: the page's figures are the last run's, never typed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ctjoint.bench import host_facts, host_line, write_doc_block
from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D, TRITON_TARGET_CPU, repo_root
from ctjoint.export.triton_perf import PerfAnalyzerError, PerfReport, run_perf_analyzer
from ctjoint.gateway.backends.triton import REQUEST_SLICES
from ctjoint.gateway.triton_server import TritonServer, TritonServerConfig, free_ports

ENSEMBLES = (MODEL_JCS2D, MODEL_DEEPSC3D)
# The ensembles, and (on request) the network models inside them alone: the difference is
# what the ensemble's python-backend postprocess step costs.
BATCH = {
    MODEL_JCS2D: REQUEST_SLICES,
    MODEL_DEEPSC3D: 1,
    f"{MODEL_JCS2D}_{TRITON_TARGET_CPU}": REQUEST_SLICES,
    f"{MODEL_DEEPSC3D}_{TRITON_TARGET_CPU}": 1,
}
UNIT = {name: "scans/s" if name.startswith(MODEL_DEEPSC3D) else "slices/s" for name in BATCH}
DOC_BEGIN = "<!-- bench/perf_analyzer.py begin -->"
DOC_END = "<!-- bench/perf_analyzer.py end -->"


@contextlib.contextmanager
def triton(url: str | None, log_dir: Path) -> Iterator[str]:
    if url:
        yield url
        return
    grpc_port, http_port, metrics_port = free_ports(3)
    config = TritonServerConfig(
        repository=repo_root() / "model_repository" / TRITON_TARGET_CPU,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
    )
    with TritonServer(config, log_file=log_dir / "triton.log"):
        yield config.grpc_url


def e2e_rows(path: Path) -> dict[int, dict[str, float]]:
    """concurrency -> slices/s, scans/s, p50 of a `ctjoint bench` report."""
    report = json.loads(path.read_text())
    return {
        int(p["concurrency"]): {
            "slices_per_s": float(p["slices_per_s"]),
            "scans_per_s": float(p["scans_per_s"]),
            "latency_p50_ms": float(p["latency_p50_ms"]),
        }
        for p in report["points"]
    }


def table(report: PerfReport, e2e: dict[int, dict[str, float]] | None) -> list[str]:
    model = report.model
    lines = [
        f"{model}: perf_analyzer, {report.batch} sample(s) per request "
        f"({UNIT[model]} = requests/s x {report.batch})"
        + ("; end to end = ctjoint bench through the gateway" if e2e else "")
    ]
    for row in report.rows:
        samples = row.throughput_per_s * report.batch
        line = (
            f"  concurrency {row.concurrency}: Triton {samples:8.1f} {UNIT[model]}, "
            f"p50 {row.p50_latency_ms:7.1f} ms, p99 {row.p99_latency_ms:7.1f} ms"
        )
        if e2e and row.concurrency in e2e:
            point = e2e[row.concurrency]
            line += (
                f" | end to end {point['slices_per_s']:8.1f} slices/s, "
                f"{point['scans_per_s']:.3f} scans/s, p50 {point['latency_p50_ms']:.0f} ms"
            )
        lines.append(line)
    return lines


def doc_lines(
    command: str,
    reports: Sequence[PerfReport],
    e2e: dict[str, dict[int, dict[str, float]]],
    host: dict[str, object],
    load_end: float,
) -> list[str]:
    """The Markdown block of one run: the command, one row per model and concurrency (Triton
    alone, and `ctjoint bench` end to end where given), and where it ran."""
    lines = [
        f"`{command}`",
        "",
        "| model | samples per request | concurrency | Triton alone | p50 / p99 (ms) "
        "| end to end (`ctjoint bench`) |",
        "|---|---|---|---|---|---|",
    ]
    for report in reports:
        points = e2e.get(report.model, {})
        for row in report.rows:
            point = points.get(row.concurrency)
            through = (
                f"{point['slices_per_s']:.1f} slices/s, {point['scans_per_s']:.3f} scans/s, "
                f"p50 {point['latency_p50_ms'] / 1000:.2f} s"
                if point
                else ""
            )
            lines.append(
                f"| {report.model} | {report.batch} | {row.concurrency} "
                f"| {row.throughput_per_s * report.batch:.1f} {UNIT[report.model]} "
                f"| {row.p50_latency_ms:.1f} / {row.p99_latency_ms:.1f} | {through} |"
            )
    lines += ["", f"{host_line(host, load_end)}; the CPU tritonserver of `make triton-runtime`."]
    return lines


def write_doc(path: Path, lines: Sequence[str]) -> None:
    """Replace the block between DOC_BEGIN and DOC_END of `path` with `lines`."""
    write_doc_block(path, DOC_BEGIN, DOC_END, lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Triton's gRPC HOST:PORT")
    parser.add_argument("--concurrency", default="1:4")
    parser.add_argument("--models", default=",".join(ENSEMBLES), help=f"any of {','.join(BATCH)}")
    # A deepsc3d request takes seconds on a small CPU: its windows must hold several requests.
    parser.add_argument("--measurement-ms", type=int, default=3000, help="jcs2d window")
    parser.add_argument("--measurement-ms-3d", type=int, default=12000, help="deepsc3d window")
    parser.add_argument("--stability", type=int, default=30, help="percent")
    parser.add_argument("--out", type=Path, default=Path("out/bench/perf_analyzer"))
    parser.add_argument(
        "--e2e", action="append", default=[], help="MODEL=bench.json of `ctjoint bench`"
    )
    parser.add_argument("--doc", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args(argv)
    command = shlex.join(["bench/perf_analyzer.py", *(sys.argv[1:] if argv is None else argv)])
    host = host_facts()
    e2e: dict[str, dict[int, dict[str, float]]] = {}
    for item in args.e2e:
        model, _, path = item.partition("=")
        if model not in BATCH or not path:
            parser.error(f"--e2e takes MODEL=PATH with MODEL in {sorted(BATCH)}, got {item!r}")
        e2e[model] = e2e_rows(Path(path))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not set(models) <= set(BATCH):
        parser.error(f"--models takes names from {sorted(BATCH)}")
    lines: list[str] = []
    reports: list[PerfReport] = []
    failed = 0
    with triton(args.url, args.out) as url:
        for model in models:
            try:
                report = run_perf_analyzer(
                    model=model,
                    url=url,
                    concurrency=args.concurrency,
                    batch=BATCH[model],
                    out_dir=args.out,
                    measurement_ms=args.measurement_ms_3d
                    if model.startswith(MODEL_DEEPSC3D)
                    else args.measurement_ms,
                    stability_percent=args.stability,
                )
            except PerfAnalyzerError as err:
                # One ensemble that cannot be measured must not hide the other's figures.
                failed += 1
                block = [f"{model}: perf_analyzer failed: {err}"]
                print(block[0], file=sys.stderr, flush=True)
                lines += block
                continue
            reports.append(report)
            block = table(report, e2e.get(model))
            print("\n".join(block), flush=True)
            lines += block
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    # A table with a model missing would read as complete: only a whole run is written.
    if args.doc is not None and not failed and reports:
        write_doc(args.doc, doc_lines(command, reports, e2e, host, os.getloadavg()[0]))
        print(f"wrote the table into {args.doc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
