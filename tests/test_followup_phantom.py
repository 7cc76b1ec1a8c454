"""Phantom follow-ups: the same synthetic patient scanned again with known lesion changes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctjoint.cli import app
from ctjoint.contracts import CASE_SERIES_DIR, CASE_TRUTH_DIR, TRUTH_LABEL
from ctjoint.export.phantom import PhantomError, read_truth, write_phantom_case
from ctjoint.export.phantom_followup import CHANGES, write_follow_up

SIZE = 64
SLICES = 16


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("followup") / "first"
    write_phantom_case(out, kind="covid19", seed=3, slices=SLICES, size=SIZE)
    return out


def _header(case: Path) -> pydicom.Dataset:
    path = sorted((case / CASE_SERIES_DIR).glob("*.dcm"))[0]
    return pydicom.dcmread(path, stop_before_pixels=True)


def _label(case: Path) -> dict:
    return json.loads((case / CASE_TRUTH_DIR / TRUTH_LABEL).read_text())


def test_a_stable_follow_up_is_the_same_patient_in_a_later_study(
    first: Path, tmp_path: Path
) -> None:
    later = tmp_path / "stable"
    write_follow_up(first, later, change="stable", days=9)
    a, b = _header(first), _header(later)
    assert b.PatientID == a.PatientID and b.PatientName == a.PatientName
    assert b.StudyInstanceUID != a.StudyInstanceUID
    assert b.SeriesInstanceUID != a.SeriesInstanceUID
    gap = dt.datetime.strptime(b.StudyDate, "%Y%m%d") - dt.datetime.strptime(a.StudyDate, "%Y%m%d")
    assert gap.days == 9
    # New slice positions: the first slice is not where it was.
    assert float(b.ImagePositionPatient[2]) != float(a.ImagePositionPatient[2])
    truth = _label(later)
    assert truth["follow_up"]["expected_category"] == "stable"
    prior = truth["follow_up"]["prior_lesion_volume_ml"]
    for name, volume in truth["lesion_volume_ml"].items():
        # Same lesions sampled elsewhere: within 15 % of the first study's volume.
        assert volume == pytest.approx(prior[name], rel=0.15)


# On a 64x64 grid the boundary voxels blur the ratio: the lung boundary cuts a grown lesion,
# and a shrunk one keeps a rim of partial voxels.
@pytest.mark.parametrize(
    ("change", "low", "high"), [("progress", 1.4, 2.05), ("improve", 0.3, 0.6)]
)
def test_lesions_grow_or_shrink_by_the_documented_factor(
    first: Path, tmp_path: Path, change: str, low: float, high: float
) -> None:
    later = tmp_path / change
    write_follow_up(first, later, change=change)
    truth = _label(later)
    ratio = sum(truth["lesion_volume_ml"].values()) / sum(
        truth["follow_up"]["prior_lesion_volume_ml"].values()
    )
    assert CHANGES[change].volume_factor == truth["follow_up"]["volume_factor"]
    assert low <= ratio <= high
    assert truth["follow_up"]["expected_category"] == CHANGES[change].category


def test_a_resolved_follow_up_has_no_lesions_and_is_labelled_normal(
    first: Path, tmp_path: Path
) -> None:
    later = tmp_path / "resolve"
    case = write_follow_up(first, later, change="resolve")
    lesions, _, info = read_truth(later)
    assert case.kind == "normal" and info["label"] == "normal"
    assert not lesions.any()
    assert info["follow_up"]["expected_category"] == "resolved"


def test_follow_up_of_a_normal_case_can_only_be_stable(tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    write_phantom_case(normal, kind="normal", seed=5, slices=4, size=32)
    with pytest.raises(PhantomError, match="no lesions, so there is nothing to progress"):
        write_follow_up(normal, tmp_path / "later", change="progress")


def test_follow_up_of_a_case_without_generation_record_is_refused(tmp_path: Path) -> None:
    label = tmp_path / "label.json"
    label.write_text(json.dumps({"label": "covid19", "seed": 1}))
    with pytest.raises(PhantomError, match="has no 'generation' record"):
        write_follow_up(label, tmp_path / "later", change="stable")


def test_cli_writes_a_follow_up_from_the_label_file(first: Path, tmp_path: Path) -> None:
    later = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "phantom",
            str(later),
            "--follow-up-of",
            str(first / CASE_TRUTH_DIR / TRUTH_LABEL),
            "--change",
            "improve",
        ],
    )
    assert result.exit_code == 0, result.output
    assert _label(later)["follow_up"]["change"] == "improve"
    # Same anatomy: the lungs of both studies hold the same volume within 3 %.
    _, lungs_a, _ = read_truth(first)
    _, lungs_b, _ = read_truth(later)
    assert np.count_nonzero(lungs_b) == pytest.approx(np.count_nonzero(lungs_a), rel=0.03)
