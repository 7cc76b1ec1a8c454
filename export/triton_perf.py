"""`ctjoint triton perf`: perf_analyzer against a served ensemble, a concurrency sweep written
as CSV (perf_analyzer's own) and JSON (the parsed rows).

perf_analyzer ships as `bin/perf_analyzer` in the tritonclient 2.51 wheel (newer wheels dropped
it, and the gateway's tritonclient is newer), so `make perf-tools` puts that wheel, without its
Python dependencies, in an environment of its own, `.venv-perf`, together with the pip CUDA
runtime (`nvidia-cuda-runtime-cu12`) it links even on a CPU machine; it also needs `libb64-0d`
(apt). Input is zeros of the ensemble's input shape (perf_analyzer reads it from Triton).
The run is bounded in memory and time: against a server that dies under it, perf_analyzer's
memory grows without limit, and this machine is shared.

    make perf-tools
    ctjoint triton serve &                      # or any Triton with the ensembles loaded
    ctjoint triton perf --model jcs2d --concurrency 1:4 --out out/perf
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ctjoint.contracts import repo_root
from ctjoint.export.errors import PerfAnalyzerError

ENV_PERF_ANALYZER: Final = "CTJOINT_PERF_ANALYZER"
PERF_VENV: Final = ".venv-perf"
# perf_analyzer itself needs a few hundred MB; the cap only stops a runaway.
MEMORY_LIMIT_BYTES: Final = 4 << 30
_CONCURRENCY: Final = re.compile(r"^\d+(:\d+(:\d+)?)?$")


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
    """$CTJOINT_PERF_ANALYZER, else perf_analyzer on PATH (the NGC SDK container), else the one
    `make perf-tools` installs in <repo>/.venv-perf, else this environment's."""
    candidates = [
        os.environ.get(ENV_PERF_ANALYZER),
        shutil.which("perf_analyzer"),
        str(repo_root() / PERF_VENV / "bin" / "perf_analyzer"),
        str(Path(sys.prefix) / "bin" / "perf_analyzer"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise PerfAnalyzerError(
        "perf_analyzer not found: run `make perf-tools` (tritonclient 2.51's binary in "
        f"{PERF_VENV}), set {ENV_PERF_ANALYZER}, or use the NGC tritonserver SDK container"
    )


def perf_env(binary: Path) -> dict[str, str]:
    """The environment perf_analyzer needs on a machine without CUDA: the pip CUDA runtime
    installed beside it (in the same virtual environment)."""
    env = dict(os.environ)
    venv = binary.resolve().parent.parent
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    libs = sorted(venv.glob(f"lib/{version}/site-packages/nvidia/cuda_runtime/lib"))
    if libs:
        current = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{libs[0]}{os.pathsep}{current}" if current else str(libs[0])
    return env


def _limit_memory() -> None:
    """In the child before exec: cap its heap (RLIMIT_DATA), so a runaway fails alone."""
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_perf_analyzer(
    *,
    model: str,
    url: str,
    concurrency: str = "1:4",
    batch: int = 1,
    out_dir: Path,
    measurement_ms: int = 3000,
    stability_percent: int = 30,
) -> PerfReport:
    """Sweep concurrency against `model` at `url` (gRPC); returns the parsed rows."""
    if not _CONCURRENCY.match(concurrency):
        raise PerfAnalyzerError(f"concurrency must be START[:END[:STEP]], got {concurrency!r}")
    if batch < 1 or measurement_ms < 100:
        raise PerfAnalyzerError("batch must be >= 1 and the measurement window >= 100 ms")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{model}_b{batch}.csv"
    binary = find_perf_analyzer()
    args = [
        str(binary),
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
        # perf_analyzer's "random" FP32 data are random bit patterns, NaN and inf among them,
        # which the network model refuses per request; the cost does not depend on the values.
        "--input-data",
        "zero",
        # A shared or small machine rarely holds perf_analyzer's default 10 % stability.
        "--stability-percentage",
        str(stability_percent),
        "--percentile",
        "99",
        # No --profile-export-file: perf_analyzer 2.51 holds every request's record for it and
        # grew to tens of GB on this machine; the CSV has what the sweep needs.
        "-f",
        str(csv_path),
    ]
    # Each step measures until stable, at most 10 windows; anything far beyond is a hang.
    steps = len(range(*_sweep(concurrency)))
    timeout_s = 60.0 + steps * 12 * measurement_ms / 1000.0
    try:
        done = subprocess.run(
            args,
            env=perf_env(binary),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired as err:
        raise PerfAnalyzerError(f"perf_analyzer did not finish within {timeout_s:.0f} s") from err
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
                "perf_analyzer_csv": csv_path.name,
            },
            indent=2,
        )
        + "\n"
    )
    return report


def _sweep(concurrency: str) -> tuple[int, int, int]:
    """START[:END[:STEP]] as range() arguments."""
    parts = [int(p) for p in concurrency.split(":")]
    start = parts[0]
    end = parts[1] if len(parts) > 1 else start
    step = parts[2] if len(parts) > 2 else 1
    return start, end + 1, max(step, 1)


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
    return sorted(rows, key=lambda r: r.concurrency)
