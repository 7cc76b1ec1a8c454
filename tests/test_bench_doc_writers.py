"""The benchmark scripts' `--doc` writers put their tables between their markers.

The benchmarks themselves need perf_analyzer, a tritonserver or h2load (tests/test_triton_server.py
and tests/test_load.py run them); the writers are checked here on small made-up results, exactly.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import bench_scripts
import pytest

from ctjoint.contracts import CLASS_NAMES as CLASSES
from ctjoint.contracts import repo_root
from ctjoint.export.triton_perf import PerfReport, PerfRow

BENCH = bench_scripts.BENCH


def _script(name: str = "perf_analyzer") -> types.ModuleType:
    return bench_scripts.load(name)


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


def test_the_refusal_burst_table_has_one_row_per_generator(tmp_path: Path) -> None:
    burst = _script("refusal_burst")
    aio = burst.Generator("grpc.aio client", [0.010, 0.030, 0.020], 1, "gateway 0.200 ms")
    lean = burst.Generator("h2load", [0.0155, 0.0425], 1, "gateway 0.190 ms")
    host = {"cpu": "AMD EPYC", "cores": 2, "load_average": [0.5, 0.4, 0.3]}
    lines = burst.doc_lines("bench/refusal_burst.py --rounds 2", [aio, lean], 192, host, 1.0)
    assert lines == [
        "`bench/refusal_burst.py --rounds 2`",
        "",
        "| fired by | bursts of 192 after the first | time to refusal p50 (ms) "
        "| slowest refusal (ms) | CPU per refusal |",
        "|---|---|---|---|---|",
        "| grpc.aio client | 1 | 20.0 | 30.0 | gateway 0.200 ms |",
        "| h2load | 1 | 29.0 | 42.5 | gateway 0.190 ms |",
        "",
        "Target: every refusal within 50 ms. AMD EPYC, 2 cores, 1-min load 0.5 at start, "
        "1.00 at end.",
    ]
    doc = tmp_path / "reliability.md"
    doc.write_text(f"{burst.DOC_BEGIN}\nold\n{burst.DOC_END}\n", encoding="utf-8")
    burst.write_doc(doc, ["new"])
    assert doc.read_text(encoding="utf-8") == f"{burst.DOC_BEGIN}\nnew\n{burst.DOC_END}\n"


def test_a_section_is_replaced_between_its_markers_and_missing_markers_are_named(
    tmp_path: Path,
) -> None:
    section = _script("doc_section")
    doc = tmp_path / "topic.md"
    doc.write_text("intro\n<!-- b -->\nold table\n<!-- e -->\noutro\n", encoding="utf-8")
    section.replace_section(doc, "<!-- b -->", "<!-- e -->", "| new |")
    assert doc.read_text(encoding="utf-8") == "intro\n<!-- b -->\n| new |\n<!-- e -->\noutro\n"
    with pytest.raises(section.MissingMarkersError, match=r"topic\.md: has no <!-- x --> / "):
        section.replace_section(doc, "<!-- x -->", "<!-- e -->", "t")


def test_publish_prints_writes_and_answers_2_without_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    section = _script("doc_section")
    doc = tmp_path / "topic.md"
    doc.write_text("<!-- b -->\n<!-- e -->\n", encoding="utf-8")
    assert section.publish("| t |", doc, "<!-- b -->", "<!-- e -->") == 0
    assert doc.read_text(encoding="utf-8") == "<!-- b -->\n| t |\n<!-- e -->\n"
    assert section.publish("| u |", None, "<!-- b -->", "<!-- e -->") == 0
    assert section.publish("| v |", doc, "<!-- x -->", "<!-- e -->") == 2
    out = capsys.readouterr()
    assert out.out == "| t |\n| u |\n| v |\n"
    assert "topic.md: has no <!-- x --> / <!-- e --> lines" in out.err


@pytest.fixture
def bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripts that import bench/doc_section.py find it as the command line would."""
    monkeypatch.syspath_prepend(str(BENCH))


def _models_section(script: types.ModuleType) -> str:
    """What docs/models.md holds between a benchmark script's BEGIN and END markers."""
    doc = (repo_root() / "docs" / "models.md").read_text(encoding="utf-8")
    return doc.split(script.BEGIN + "\n", 1)[1].split("\n" + script.END, 1)[0]


def _epoch(epoch: int, loss: float, samples: int, train_s: float, wait_s: float) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "loss": loss,
        "loss_curve": [loss + 0.5, loss - 0.5],
        "samples": samples,
        "samples_per_second": samples / train_s,
        "batch_wait_seconds": wait_s,
        "train_seconds": train_s,
        "peak_memory_gib": 10.26,
        "val": {"dice": 0.5, "accuracy": 1.0},
    }


@pytest.mark.usefixtures("bench_on_path")
def test_the_training_table_reads_each_epoch_and_plans_the_paper_epochs() -> None:
    throughput = _script("train_throughput")
    log = {
        "model": "jcs2d",
        "config": {"name": "full"},
        "device": {"name": "NVIDIA H200", "torch": "2.11"},
        "train_cases": 10,
        "epochs": [_epoch(1, 2.0, 1000, 40.0, 2.0), _epoch(2, 1.0, 1000, 10.0, 2.0)],
    }
    text = throughput.render([log], [10], 1000)
    lines = text.splitlines()
    assert lines[0] == "Measured on NVIDIA H200 (torch 2.11), `--config full`, bf16 autocast:"
    assert (
        lines[4] == "| jcs2d | 1 | 2.000 | 2.50 -> 1.50 | 1000 | 25.0 | 5% | 10.3 | 0.500 | 1.000 |"
    )
    assert (
        lines[5]
        == "| jcs2d | 2 | 1.000 | 1.50 -> 0.50 | 1000 | 100.0 | 20% | 10.3 | 0.500 | 1.000 |"
    )
    # Epoch 2 only: 100 samples/s measured, 125 without the 2 s wait; 100 samples per scan,
    # 100,000 per epoch of 1,000 scans: 1000 s / 800 s per epoch, the full config's 60 epochs.
    assert (
        lines[-1] == "| jcs2d | 100.0 - 125.0 | 100.0 | 100,000 | 0.22 - 0.28 | 60 | 13.3 - 16.7 |"
    )


@pytest.mark.usefixtures("bench_on_path")
def test_the_committed_training_table_is_what_the_committed_logs_say() -> None:
    throughput = _script("train_throughput")
    logs = [
        json.loads((repo_root() / "docs" / "gpu" / f"{m}_full_train_log.json").read_text())
        for m in ("jcs2d", "deepsc3d")
    ]
    assert _models_section(throughput) == throughput.render(logs, [12, 12], 1260)


def test_the_gpu_check_table_has_one_row_per_model_config_and_mode() -> None:
    gpu = _script("gpu_models")
    report = gpu.Report("NVIDIA H200", "2.11", "3.12", "2026-12-04T15:48:42+00:00", 120.0)
    report.seconds = 193.0
    report.skipped = ["deepsc3d full: the time budget was spent"]
    report.points = [
        gpu.Point("jcs2d", "tiny", "eager fp32", 1, 5.0, 200.0, 40.0, 0.0, 1.0),
        gpu.Point("jcs2d", "tiny", "eager fp32", 64, 4.0, 16000.0, 660.4, 0.0, 0.99995),
        gpu.Point("deepsc3d", "tiny", "cuda graphs", 2, 1.0, 2000.0, None, 2.5e-4, 1.0),
    ]
    assert gpu.table(report).splitlines() == [
        "NVIDIA H200, torch 2.11, 2026-12-04 (193 s of a 120 s budget; 1 measurements skipped):",
        "",
        "| model | config | mode | samples/s at batch 1 | largest batch | samples/s there "
        "| peak MiB there | max probability difference | min mask agreement |",
        "|---|---|---|---|---|---|---|---|---|",
        "| jcs2d | tiny | eager fp32 | 200 | 64 | 16,000 | 660 | 0.0e+00 | 0.99995 |",
        "| deepsc3d | tiny | cuda graphs | 2,000 (batch 2) | 2 | 2,000 | - | 2.5e-04 | 1.00000 |",
    ]


@pytest.mark.usefixtures("bench_on_path")
def test_the_temperature_floor_of_a_set_with_a_wrong_label() -> None:
    floor = _script("temperature_floor")

    def case(label: str, probs: list[float]) -> dict[str, Any]:
        return {
            "label": label,
            "uncalibrated_probabilities": dict(zip(CLASSES, probs, strict=True)),
        }

    report = {
        "model": "deepsc3d",
        "classes": list(CLASSES),
        "calibration": {"ece_after": 0.2},
        "per_case": [
            case("covid19", [0.8, 0.1, 0.1]),
            case("cap", [0.1, 0.8, 0.1]),
            case("normal", [0.1, 0.8, 0.1]),  # wrong, as confident as the right ones
        ],
    }
    result = floor.sweep(report)
    assert (result["cases"], result["wrong"]) == (3, 1)
    # One bin: accuracy 2/3 against confidence 0.8; a temperature moving every confidence to
    # 2/3 removes the gap (0.8^a / (0.8^a + 2 x 0.1^a) = 2/3 where 8^a = 4: a = 1/T = 2/3).
    assert result["ece_t1"] == pytest.approx(0.8 - 2 / 3)
    assert result["ece_min"] < 0.005 and result["t_min"] == pytest.approx(1.5, rel=0.02)
    with pytest.raises(ValueError, match="jcs2d: only deepsc3d"):
        floor.sweep({**report, "model": "jcs2d"})


@pytest.mark.usefixtures("bench_on_path")
def test_the_committed_temperature_floor_is_what_the_committed_reports_say() -> None:
    floor = _script("temperature_floor")
    names = [
        f"deepsc3d.bundled.{s}.json" for s in ("eval15_quadric", "eval15_fourier", "eval_fourier")
    ]
    reports = [json.loads((repo_root() / "docs" / "eval" / n).read_text()) for n in names]
    named = [(n, floor.sweep(r)) for n, r in zip(names, reports, strict=True)]
    for (_, swept), report in zip(named, reports, strict=True):
        assert swept["ece_t1"] == pytest.approx(report["calibration"]["ece_before"], abs=1e-9)
    assert _models_section(floor) == floor.render(named)
