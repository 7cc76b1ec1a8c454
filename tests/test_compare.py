"""The comparison with a prior analysis: categories, changes, reading SRs and result JSONs back,
and `ctjoint compare`."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from ctjoint.cli import app
from ctjoint.client.render import write_result_json
from ctjoint.export.phantom import write_phantom_case
from ctjoint.export.phantom_followup import write_follow_up
from ctjoint.gateway.analysis import ScanAnalysis, analyze_directory
from ctjoint.gateway.comparison import (
    CHANGE_FRACTION,
    CHANGE_ML,
    Comparison,
    ComparisonError,
    Measurements,
    category,
    compare,
    study_datetime,
)
from ctjoint.gateway.dicom_outputs import analysis_objects
from ctjoint.gateway.prior_report import (
    PriorReportError,
    measurements_from_result,
    measurements_from_sr,
    read_measurements,
)


def _m(
    gg: float, cons: float = 0.0, when: dt.datetime | None = None, label: str = "covid19"
) -> Measurements:
    return Measurements(
        label=label,
        ground_glass_ml=gg,
        consolidation_ml=cons,
        right_percent_involved=gg / 20,
        left_percent_involved=cons / 20,
        severity_score=int(gg // 20),
        model="jcs2d",
        study_datetime=when,
    )


@pytest.mark.parametrize(
    ("prior", "current", "expected"),
    [
        (200.0, 200.0 * (1 + CHANGE_FRACTION) + 1, "progressed"),
        (200.0, 200.0 * (1 - CHANGE_FRACTION) - 1, "improved"),
        (200.0, 200.0 * (1 + CHANGE_FRACTION) - 1, "stable"),
        # A small lesion's large relative swing is not a change below CHANGE_ML.
        (12.0, 12.0 + CHANGE_ML - 1, "stable"),
        (12.0, 12.0 + CHANGE_ML + 1, "progressed"),
        # A large lesion's change in mL is not one below CHANGE_FRACTION.
        (400.0, 400.0 * (1 + CHANGE_FRACTION) - 1, "stable"),
    ],
)
def test_with_pneumonia_in_both_the_volume_change_decides(
    prior: float, current: float, expected: str
) -> None:
    assert category("covid19", prior, "cap", current) == expected


@pytest.mark.parametrize(
    ("prior_label", "current_label", "expected"),
    [
        ("normal", "normal", "stable"),
        ("normal", "covid19", "new"),
        ("cap", "normal", "resolved"),
    ],
)
def test_the_labels_decide_new_and_resolved_whatever_the_volumes(
    prior_label: str, current_label: str, expected: str
) -> None:
    # Lesion-free scans still measure tens of mL (docs/follow-up.md): volumes cannot say it.
    assert category(prior_label, 60.0, current_label, 60.0) == expected


def test_comparison_reports_interval_labels_and_changes() -> None:
    before = _m(80.0, 20.0, dt.datetime(2024, 3, 1, 12, 0))
    after = _m(150.0, 10.0, dt.datetime(2024, 3, 15, 0, 0))
    block = compare(before, after).to_dict()
    assert block["available"] is True
    assert block["category"] == "progressed"
    assert block["prior_study_date"] == "2024-03-01"
    assert block["interval_days"] == 13.5
    assert block["prior_label"] == "covid19" and block["current_label"] == "covid19"
    assert block["changes"]["total_ml"] == {"absolute": 60.0, "relative": 0.6}
    assert block["changes"]["consolidation_ml"] == {"absolute": -10.0, "relative": -0.5}
    assert block["changes"]["severity_score"]["absolute"] == 3.0
    assert Comparison.from_dict(block).to_dict() == block


def test_a_change_from_nothing_has_no_relative_value() -> None:
    block = compare(_m(0.0, label="normal"), _m(30.0)).to_dict()
    assert block["category"] == "new"
    assert block["changes"]["total_ml"] == {"absolute": 30.0, "relative": None}
    assert block["interval_days"] is None and block["prior_study_date"] is None


def test_a_prior_that_is_not_earlier_is_refused() -> None:
    same = dt.datetime(2024, 3, 1, 12, 0)
    with pytest.raises(ComparisonError, match="prior study is not earlier"):
        compare(_m(10.0, when=same), _m(20.0, when=same))


def test_an_unavailable_comparison_says_why() -> None:
    block = Comparison.unavailable("no prior analysis in the PACS")
    assert block.to_dict() == {"available": False, "reason": "no prior analysis in the PACS"}
    assert block.caption == "vs prior: n/a (no prior analysis in the PACS)"
    with pytest.raises(ValueError, match="says why"):
        Comparison(available=False)


@pytest.mark.parametrize(
    ("date", "time", "expected"),
    [
        ("20240301", "123456.789", dt.datetime(2024, 3, 1, 12, 34, 56)),
        ("20240301", "0930", dt.datetime(2024, 3, 1, 9, 30)),
        ("20240301", "", dt.datetime(2024, 3, 1)),
        ("20240301", "NOTATIME", dt.datetime(2024, 3, 1)),
        ("2024-03-01", "1200", None),
        ("", "1200", None),
    ],
)
def test_study_datetime_reads_dicom_dates_and_times(
    date: str, time: str, expected: dt.datetime | None
) -> None:
    assert study_datetime(date, time) == expected


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScanAnalysis]:
    """A small covid19 phantom and its progressed follow-up, analysed with bundled jcs2d."""
    root = tmp_path_factory.mktemp("compare")
    write_phantom_case(root / "first", kind="covid19", seed=3, slices=16, size=64)
    write_follow_up(root / "first", root / "later", change="progress")
    return {
        name: analyze_directory(root / name / "series", model="jcs2d", intra_op_threads=1)
        for name in ("first", "later")
    }


def test_the_sr_gives_back_what_the_analysis_measured(studies: dict[str, ScanAnalysis]) -> None:
    analysis = studies["first"]
    sr = analysis_objects(analysis, seg=False, sr=True).sr
    assert sr is not None
    read = measurements_from_sr(pydicom.dcmread(pydicom.filebase.DicomBytesIO(sr)))
    expected = measurements_from_result(analysis.result.to_dict())
    assert read.label == expected.label and read.model == "jcs2d"
    assert read.ground_glass_ml == pytest.approx(expected.ground_glass_ml, rel=1e-9)
    assert read.consolidation_ml == pytest.approx(expected.consolidation_ml, rel=1e-9)
    assert read.right_percent_involved == pytest.approx(expected.right_percent_involved)
    assert read.severity_score == expected.severity_score
    header = analysis.source_header
    assert header is not None
    assert read.study_datetime == study_datetime(header.StudyDate, header.StudyTime)


def test_ctjoint_compare_prints_the_same_block_for_srs_and_result_jsons(
    studies: dict[str, ScanAnalysis], tmp_path: Path
) -> None:
    paths = {}
    for name, analysis in studies.items():
        sr = analysis_objects(analysis, seg=False, sr=True).sr
        assert sr is not None
        paths[f"{name}.dcm"] = tmp_path / f"{name}.dcm"
        paths[f"{name}.dcm"].write_bytes(sr)
        paths[f"{name}.json"] = tmp_path / f"{name}.json"
        write_result_json(analysis.result, paths[f"{name}.json"])
    runner = CliRunner()
    from_sr = runner.invoke(app, ["compare", str(paths["first.dcm"]), str(paths["later.dcm"])])
    assert from_sr.exit_code == 0, from_sr.output
    block = json.loads(from_sr.output)
    assert block["category"] == "progressed"
    assert block["interval_days"] == pytest.approx(14.0, abs=1.0)
    from_json = runner.invoke(app, ["compare", str(paths["first.json"]), str(paths["later.json"])])
    assert from_json.exit_code == 0, from_json.output
    other = json.loads(from_json.output)
    assert other["category"] == "progressed"
    assert other["changes"]["total_ml"]["absolute"] == pytest.approx(
        block["changes"]["total_ml"]["absolute"], abs=1e-3
    )
    # A result JSON carries no study date: no interval from two of them.
    assert other["interval_days"] is None
    reversed_order = runner.invoke(
        app, ["compare", str(paths["later.dcm"]), str(paths["first.dcm"])]
    )
    assert reversed_order.exit_code == 2
    assert "prior study is not earlier" in reversed_order.output


def test_a_file_that_is_no_ctjoint_sr_is_named_in_the_error(tmp_path: Path) -> None:
    ct = tmp_path / "ct.dcm"
    write_phantom_case(tmp_path / "case", kind="normal", seed=1, slices=2, size=32)
    ct.write_bytes(sorted((tmp_path / "case" / "series").glob("*.dcm"))[0].read_bytes())
    with pytest.raises(PriorReportError, match=r"ct\.dcm: not a Comprehensive 3D SR"):
        read_measurements(ct)
    bad = tmp_path / "bad.json"
    bad.write_text('{"label": "covid19"}')
    with pytest.raises(PriorReportError, match=r"bad\.json: not a ctjoint result"):
        read_measurements(bad)


def test_add_caption_puts_one_more_line_under_an_overlay() -> None:
    import io

    import numpy as np
    from PIL import Image

    from ctjoint.render import add_caption, render_overlay, text_strip_height

    volume = np.full((4, 32, 32), -800, dtype=np.int16)
    overlay = render_overlay(volume, np.zeros(volume.shape, dtype=np.uint8))
    line = compare(_m(100.0, when=dt.datetime(2024, 1, 1)), _m(200.0, when=dt.datetime(2024, 1, 8)))
    assert line.caption == "vs prior: PROGRESSED 100 -> 200 mL (+100) in 7 d"
    captioned = add_caption(overlay.png, line.caption)
    with Image.open(io.BytesIO(overlay.png)) as before, Image.open(io.BytesIO(captioned)) as after:
        assert after.height == before.height + text_strip_height()
        assert np.asarray(after.convert("RGB"))[: before.height, : before.width].tolist() == (
            np.asarray(before.convert("RGB")).tolist()
        )
