"""`ctjoint train` and `ctjoint evaluate` end to end on each data layout, on tiny data.

The three layouts: phantom sets (DICOM series + NIfTI truth per case folder), NIfTI volumes +
masks + labels CSV, and DICOM series folders + NIfTI masks + labels CSV. One network trained
on each layout (the tiny configuration shrunk to 32 x 32, as in test_training, so an epoch
takes seconds); the ONNX export of one of them evaluates every layout through the serving
pipeline with `ctjoint evaluate` (one export keeps the file fast).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from synthetic_ct import write_dicom_series_set, write_nifti_set
from test_training import small_config
from typer.testing import CliRunner

from ctjoint.cli import app
from ctjoint.export.dataset import DatasetError, discover_cases
from ctjoint.export.phantom import write_phantom_set
from ctjoint.export.train import load_checkpoint, train_run

LAYOUTS = ("phantom", "nifti", "dicom-series")
MODEL = "jcs2d"


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def _write(layout: str, root: Path) -> Path:
    if layout == "phantom":
        write_phantom_set(root, n=9, seed=5, size=48, workers=1, slices=6)
        return root
    if layout == "nifti":
        return write_nifti_set(root, per_class=4, size=32, slices=8)
    return write_dicom_series_set(root, per_class=4, size=32, slices=8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {layout: _write(layout, base / layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def trained(sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """best.pt of a one-epoch run on each layout."""
    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for layout, data in sets.items():
        train_run(small_config(MODEL, 1), data, out / layout, console=Console(quiet=True))
        runs[layout] = out / layout / "best.pt"
    return runs


@pytest.fixture(scope="module")
def onnx_file(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("onnx") / f"{MODEL}.onnx"
    result = CliRunner().invoke(
        app,
        ["export", "onnx", "--model", MODEL, "--weights", str(trained["nifti"]),
         "--out", str(target)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return target


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_on_a_layout_writes_a_calibrated_checkpoint(
    trained: dict[str, Path], layout: str
) -> None:
    data = load_checkpoint(trained[layout])
    assert data["model"] == MODEL
    assert set(data["temperature"]) == {"cls", "seg"}
    assert all(t > 0 for t in data["temperature"].values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_evaluate_on_a_layout_reports_every_test_case(
    sets: dict[str, Path], trained: dict[str, Path], onnx_file: Path, tmp_path: Path, layout: str
) -> None:
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", MODEL, "--data", str(sets[layout]), "--split", "test",
         "--onnx", str(onnx_file), "--weights", str(trained["nifti"]),
         "--out", str(report_path), "--markdown", str(tmp_path / "table.md")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    expected = sorted(ref.case_id for ref in discover_cases(sets[layout], "test"))
    assert sorted(case["case"] for case in report["per_case"]) == expected
    digest = hashlib.sha256(trained["nifti"].read_bytes()).hexdigest()
    assert report["weights_sha256"] == digest
    assert 0.0 <= report["calibration"]["ece_after"] <= 1.0
    png = report_path.with_suffix(".reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert digest[:12] in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_abnormal_case_without_a_mask_is_an_error(
    sets: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(sets[layout], root)
    case = next(ref for ref in discover_cases(root) if ref.label_name == "cap")
    assert case.mask is not None
    case.mask.unlink()
    with pytest.raises(DatasetError, match=rf"case {case.case_id} is labelled cap but has no"):
        discover_cases(root)
