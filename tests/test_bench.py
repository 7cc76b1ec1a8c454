"""`ctjoint bench` against a real gateway process (tiny contract models, a small series): the
sweep writes JSON, CSV and PNG that agree with each other, with the client side alone."""

from __future__ import annotations

import csv
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import figures
import pytest
from gateway_process import GatewayProcess, ctjoint
from test_gateway_client import BLOCK_GATEWAY
from test_packaging import BLOCK_HEAVY

from ctjoint.bench import STAGE_GROUPS, BenchError, parse_concurrency

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    process = GatewayProcess(contract_model_dir, tmp_path_factory.mktemp("gw") / "gateway.log")
    process.start()
    yield process
    process.stop()


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from IHDR, after checking the signature and every chunk's CRC."""
    assert data[:8] == PNG_SIGNATURE
    offset, size = 8, (0, 0)
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + payload) & 0xFFFFFFFF == crc, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", payload[:8])
        offset += 12 + length
    return size


def test_bench_sweep_writes_consistent_json_csv_png(
    gateway: GatewayProcess, ct_series_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    assert gateway.process is not None
    done = ctjoint(
        "bench",
        "--gateway",
        gateway.address,
        "--series",
        str(ct_series_dir),
        "--model",
        "jcs2d",
        "--concurrency",
        "1,2",
        "--scans",
        "4",
        "--out",
        str(out),
        "--gateway-pid",
        str(gateway.process.pid),
        # Scanner-side install: no torch/onnxruntime, nothing of the gateway's code.
        code=BLOCK_HEAVY + BLOCK_GATEWAY,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "bench.json").read_text())
    points = report["points"]
    assert [p["concurrency"] for p in points] == [1, 2]
    assert report["slices"] == 8
    for point in points:
        assert point["scans"] == 4
        assert point["scans_per_s"] == pytest.approx(4 / point["wall_s"], rel=0.01)
        assert point["slices_per_s"] == pytest.approx(32 / point["wall_s"], rel=0.01)
        assert 0 < point["latency_p50_ms"] <= point["latency_p95_ms"] <= point["latency_p99_ms"]
        # A scan cannot finish faster than the slowest percentile allows over the wall time.
        assert point["latency_p50_ms"] / 1000.0 <= point["wall_s"]
        assert set(point["stages_ms"]) == {name for name, _ in STAGE_GROUPS}
        for stage in ("decode", "preprocess", "infer", "postprocess"):
            assert point["stages_ms"][stage] > 0, stage
        # Stages overlap while a series streams in, so only each one alone is bounded by the
        # gateway's own total for the scan.
        for stage in ("infer", "postprocess", "outputs"):
            assert point["stages_ms"][stage] <= point["raw_stages_ms"]["gateway_total"], stage
        gw = point["processes"]["gateway"]
        assert gw["cpu_s"] > 0 and gw["peak_rss_mb"] > 20
    with (out / "bench.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(points)
    for row, point in zip(rows, points, strict=True):
        assert int(row["concurrency"]) == point["concurrency"]
        assert float(row["scans_per_s"]) == point["scans_per_s"]
        assert float(row["latency_p95_ms"]) == point["latency_p95_ms"]
        assert float(row["infer_ms"]) == point["stages_ms"]["infer"]
        assert float(row["gateway_peak_rss_mb"]) == point["processes"]["gateway"]["peak_rss_mb"]
    width, height = _png_size((out / "bench.png").read_bytes())
    assert width > 600 and height > 200
    assert "concurrency 2:" in done.stdout
    figures.record(
        "ctjoint bench (8x32x32 series, contract models, embedded)",
        **{f"c{p['concurrency']}_scans_per_s": p["scans_per_s"] for p in points},
    )


def test_bench_needs_a_gateway_or_spawn(tmp_path: Path) -> None:
    done = ctjoint("bench", "--series", str(tmp_path), "--out", str(tmp_path / "o"))
    assert done.returncode != 0
    assert "--gateway HOST:PORT or --spawn" in done.stderr


def test_bench_refuses_a_bad_concurrency() -> None:
    with pytest.raises(BenchError, match="1,2,4 or 1:4"):
        parse_concurrency("four")
    assert parse_concurrency("1:3") == [1, 2, 3]
    assert parse_concurrency("4,1,2,2") == [1, 2, 4]


@pytest.mark.skipif(
    os.environ.get("CTJOINT_BENCH_SPAWN") != "1",
    reason="starts tritonserver and a gateway (about a minute); set CTJOINT_BENCH_SPAWN=1",
)
def test_bench_spawn_measures_gateway_and_triton(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = ctjoint(
        "bench",
        "--spawn",
        "--size",
        "128",
        "--slices",
        "12",
        "--concurrency",
        "1,2",
        "--scans",
        "2",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["slices"] == 12
    for point in report["points"]:
        assert set(point["processes"]) == {"gateway", "triton"}
        # Triton ran the model: its process tree used CPU, and the gateway timed the calls.
        assert point["processes"]["triton"]["cpu_s"] > 0
        assert point["stages_ms"]["infer"] > 0
