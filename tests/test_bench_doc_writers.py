"""`bench/perf_analyzer.py --doc` writes its table between its markers, from a run's reports.

The sweep itself needs perf_analyzer and a tritonserver (tests/test_triton_server.py runs
one); the writer is checked here on a small made-up result, exactly.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest

from ctjoint.contracts import repo_root
from ctjoint.export.triton_perf import PerfReport, PerfRow

SCRIPT = repo_root() / "bench" / "perf_analyzer.py"


def _script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("ctjoint_bench_perf_analyzer", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(model: str, batch: int, rows: list[PerfRow]) -> PerfReport:
    return PerfReport(model, batch, Path("x.csv"), Path("x.json"), tuple(rows))


def test_the_doc_table_has_one_row_per_model_and_concurrency(tmp_path: Path) -> None:
    perf = _script()
    reports = [
        _report("jcs2d", 4, [PerfRow(1, 74.5, 45.04, 50.0, 61.26), PerfRow(2, 88.75, 80, 90, 99)]),
        _report("deepsc3d", 1, [PerfRow(1, 1.9, 520.0, 530.0, 600.0)]),
    ]
    e2e = {"jcs2d": {1: {"slices_per_s": 15.5, "scans_per_s": 0.155, "latency_p50_ms": 6300.0}}}
    host = {"cpu": "AMD EPYC", "cores": 2, "load_average": [3.1, 2.0, 1.0]}
    lines = perf.doc_lines("bench/perf_analyzer.py --doc d.md", reports, e2e, host, 4.256)
    assert lines == [
        "`bench/perf_analyzer.py --doc d.md`",
        "",
        "| model | samples per request | concurrency | Triton alone | p50 / p99 (ms) "
        "| end to end (`ctjoint bench`) |",
        "|---|---|---|---|---|---|",
        "| jcs2d | 4 | 1 | 298.0 slices/s | 45.0 / 61.3 "
        "| 15.5 slices/s, 0.155 scans/s, p50 6.30 s |",
        "| jcs2d | 4 | 2 | 355.0 slices/s | 80.0 / 99.0 |  |",
        "| deepsc3d | 1 | 1 | 1.9 scans/s | 520.0 / 600.0 |  |",
        "",
        "AMD EPYC, 2 cores, 1-min load 3.1 at start, 4.26 at end; the CPU tritonserver of "
        "`make triton-runtime`.",
    ]
    doc = tmp_path / "performance.md"
    doc.write_text(f"intro\n{perf.DOC_BEGIN}\nold\n{perf.DOC_END}\nafter\n", encoding="utf-8")
    perf.write_doc(doc, ["new", "| a |"])
    assert doc.read_text(encoding="utf-8") == (
        f"intro\n{perf.DOC_BEGIN}\nnew\n| a |\n{perf.DOC_END}\nafter\n"
    )


def test_a_doc_without_the_block_is_refused_naming_it(tmp_path: Path) -> None:
    perf = _script()
    doc = tmp_path / "other.md"
    doc.write_text("no block here\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"other\.md: no <!-- bench/perf_analyzer\.py begin"):
        perf.write_doc(doc, ["x"])
