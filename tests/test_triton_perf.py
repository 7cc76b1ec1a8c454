"""perf_analyzer wrapper: argument checks and its CSV, without running it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctjoint.export.triton_perf import PerfAnalyzerError, _read_rows, _sweep, run_perf_analyzer


def test_concurrency_ranges_read_like_perf_analyzer() -> None:
    assert _sweep("1:4") == (1, 5, 1)
    assert _sweep("2:8:2") == (2, 9, 2)
    assert _sweep("3") == (3, 4, 1)


def test_a_malformed_concurrency_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PerfAnalyzerError, match=r"START\[:END\[:STEP\]\], got '1-4'"):
        run_perf_analyzer(model="jcs2d", url="127.0.0.1:1", concurrency="1-4", out_dir=tmp_path)


def test_rows_come_back_in_concurrency_order_with_latencies_in_ms(tmp_path: Path) -> None:
    csv_path = tmp_path / "sweep.csv"
    csv_path.write_text(
        "Concurrency,Inferences/Second,p50 latency,p90 latency,p99 latency\n"
        "2,150.5,15000,20000,26000\n"
        "1,95.0,9600,12000,19100\n"
    )
    rows = _read_rows(csv_path)
    assert [r.concurrency for r in rows] == [1, 2]
    assert rows[0].p99_latency_ms == pytest.approx(19.1)
    assert rows[1].throughput_per_s == pytest.approx(150.5)
