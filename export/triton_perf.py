"""`ctjoint triton perf`: perf_analyzer against a served ensemble, a concurrency sweep written
as CSV (perf_analyzer's own) and JSON (its profile export plus our summary).

perf_analyzer ships as `bin/perf_analyzer` with the tritonclient 2.51 wheel. On a CPU machine
it still links the CUDA runtime: it needs `libb64-0d` (apt) and the pip package
`nvidia-cuda-runtime-cu12` whose library folder this module puts on LD_LIBRARY_PATH.
Input is random data of the ensemble's own input shape (perf_analyzer reads it from Triton).

    ctjoint triton serve &                      # or any Triton with the ensembles loaded
    ctjoint triton perf --model jcs2d --concurrency 1:4 --out out/perf
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ctjoint.gateway.errors import CtJointError

_CONCURRENCY: Final = re.compile(r"^\d+(:\d+(:\d+)?)?$")


class PerfAnalyzerError(CtJointError):
    """perf_analyzer is missing, cannot start, or failed."""


@dataclass(frozen=True)
class PerfRow:
    """One step of the sweep."""

    concurrency: int
    throughput_per_s: float
    p50_latency_ms: float
    p90_latency_ms: float
    p99_latency_ms: float


@dataclass(frozen=True)
class PerfReport:
    model: str
    batch: int
    csv_path: Path
    json_path: Path
    rows: tuple[PerfRow, ...]

    def summary(self) -> str:
        lines = [f"perf_analyzer {self.model} (batch {self.batch}): {self.csv_path}"]
        lines += [
            f"  concurrency {r.concurrency}: {r.throughput_per_s:.1f} infer/s, "
            f"p50 {r.p50_latency_ms:.1f} ms, p99 {r.p99_latency_ms:.1f} ms"
            for r in self.rows
        ]
        return "\n".join(lines)


def find_perf_analyzer() -> Path:
    """perf_analyzer on PATH (the NGC SDK container), else the tritonclient wheel's."""
    found = shutil.which("perf_analyzer") or str(Path(sys.prefix) / "bin" / "perf_analyzer")
    path = Path(found)
    if not path.is_file():
        raise PerfAnalyzerError(
            "perf_analyzer not found: it comes with tritonclient==2.51.0 (the gateway extra) "
            "or the NGC tritonserver SDK container"
        )
    return path


def perf_env() -> dict[str, str]:
    """The environment perf_analyzer needs on a machine without CUDA: the pip CUDA runtime."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is not None and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
        current = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{lib}{os.pathsep}{current}" if current else str(lib)
    return env


def run_perf_analyzer(
    *,
    model: str,
    url: str,
    concurrency: str = "1:4",
    batch: int = 1,
    out_dir: Path,
    measurement_ms: int = 3000,
) -> PerfReport:
    """Sweep concurrency against `model` at `url` (gRPC); returns the parsed rows."""
    if not _CONCURRENCY.match(concurrency):
        raise PerfAnalyzerError(f"concurrency must be START[:END[:STEP]], got {concurrency!r}")
    if batch < 1 or measurement_ms < 100:
        raise PerfAnalyzerError("batch must be >= 1 and the measurement window >= 100 ms")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{model}_b{batch}.csv"
    profile_path = out_dir / f"{model}_b{batch}.profile.json"
    args = [
        str(find_perf_analyzer()),
        "-m",
        model,
        "-i",
        "grpc",
        "-u",
        url,
        "-b",
        str(batch),
        "--concurrency-range",
        concurrency,
        "--measurement-interval",
        str(measurement_ms),
        "--percentile",
        "99",
        "-f",
        str(csv_path),
        "--profile-export-file",
        str(profile_path),
    ]
    try:
        done = subprocess.run(args, env=perf_env(), capture_output=True, text=True, check=False)
    except OSError as err:
        raise PerfAnalyzerError(f"cannot run perf_analyzer: {err}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        hint = ""
        if "libb64" in tail or "libcudart" in tail:
            hint = " (install libb64-0d and nvidia-cuda-runtime-cu12; see this module's doc)"
        raise PerfAnalyzerError(f"perf_analyzer failed{hint}:\n{tail}")
    rows = tuple(_read_rows(csv_path))
    report = PerfReport(model, batch, csv_path, out_dir / f"{model}_b{batch}.json", rows)
    report.json_path.write_text(
        json.dumps(
            {
                "model": model,
                "batch": batch,
                "url": url,
                "rows": [asdict(r) for r in rows],
                "perf_analyzer_profile": profile_path.name,
                "perf_analyzer_csv": csv_path.name,
            },
            indent=2,
        )
        + "\n"
    )
    return report


def _read_rows(csv_path: Path) -> list[PerfRow]:
    """perf_analyzer's CSV: one row per concurrency; latencies in microseconds."""
    with csv_path.open(newline="") as handle:
        rows = []
        for row in csv.DictReader(handle):
            rows.append(
                PerfRow(
                    concurrency=int(row["Concurrency"]),
                    throughput_per_s=float(row["Inferences/Second"]),
                    p50_latency_ms=float(row["p50 latency"]) / 1000.0,
                    p90_latency_ms=float(row["p90 latency"]) / 1000.0,
                    p99_latency_ms=float(row["p99 latency"]) / 1000.0,
                )
            )
    return rows
