"""The phantom-trained tiny weights shipped in export/weights: loadable, small, and measured.

The quality check computes: `ctjoint evaluate` runs the bundled models through the serving
pipeline on fresh phantoms of both shape families (seeds no training set uses) and the issue-16
targets are asserted on what it measured, not read from a committed file. The committed
reports (export/weights/*.eval.json, written by the same command at full size) must describe
exactly the committed weights: their SHA-256 is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctjoint.contracts import CLASS_NAMES, MODEL_NAMES, repo_root
from ctjoint.export.bundled import WEIGHTS_DIR, bundled_onnx, bundled_weights
from ctjoint.export.configs import get_config
from ctjoint.export.eval_report import BEGIN, END, markdown_table
from ctjoint.export.evaluate import evaluate_model, sha256_file
from ctjoint.export.phantom import write_phantom_set
from ctjoint.export.phantom_families import FAMILY_FOURIER, FAMILY_QUADRIC
from ctjoint.export.train import load_checkpoint, model_from_checkpoint

DOCS = repo_root() / "docs"
# Issue 16, point 3: the training family and the held-out family.
TARGETS = {
    FAMILY_QUADRIC: {"dice": 0.85, "accuracy": 0.95},
    FAMILY_FOURIER: {"dice": 0.80, "accuracy": 0.95},
}
# Sized for CI: two scans per class and family, 128 x 128, 24 slices (seconds per model).
CASES_PER_FAMILY = 6
SIZE = 128
SLICES = 24
# Fresh seeds: the bundled weights were trained on phantom-set --seed 16 (docs/models.md).
SEEDS = {FAMILY_QUADRIC: 160_016, FAMILY_FOURIER: 160_017}


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_bundled_checkpoint_rebuilds_the_tiny_network(model: str) -> None:
    net, config, _ = model_from_checkpoint(bundled_weights(model))
    assert config.plan == get_config(model, "tiny").plan
    assert config.model == model
    assert not net.training


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_bundled_checkpoint_holds_weights_only(model: str) -> None:
    data = load_checkpoint(bundled_weights(model))
    assert "optimizer" not in data
    assert bundled_weights(model).stat().st_size < 5_000_000


def test_committed_reports_describe_the_committed_weights() -> None:
    reports = sorted(WEIGHTS_DIR.glob("*_tiny.*.eval.json"))
    assert {json.loads(p.read_text())["model"] for p in reports} == set(MODEL_NAMES)
    for path in reports:
        report = json.loads(path.read_text())
        assert report["classes"] == list(CLASS_NAMES), path.name
        assert report["weights_sha256"] == sha256_file(bundled_weights(report["model"])), path.name


def test_quality_table_in_the_docs_is_the_rendering_of_the_committed_reports() -> None:
    """docs/models.md's figures come from docs/eval/*.json (`ctjoint evaluate` output), so
    the table can be rebuilt and no figure in it was typed by hand."""
    reports = [json.loads(p.read_text()) for p in sorted((DOCS / "eval").glob("*.json"))]
    bundled = {r["weights_sha256"] for r in reports if "bundled weights" in r["title"]}
    assert bundled == {sha256_file(bundled_weights(m)) for m in MODEL_NAMES}
    text = (DOCS / "models.md").read_text(encoding="utf-8")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block.strip() == markdown_table(reports).strip()


@pytest.fixture(scope="module")
def fresh_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fresh")
    for family, seed in SEEDS.items():
        write_phantom_set(
            root / family,
            n=CASES_PER_FAMILY,
            seed=seed,
            size=SIZE,
            workers=2,
            family=family,
            slices=SLICES,
        )
    return {family: root / family for family in SEEDS}


# The bundled weights miss the lesion Dice targets on the varied phantoms (accuracy and false
# alarms hold, but for deepsc3d's 0.83 on the training family here): here jcs2d 0.75 / 0.76
# and deepsc3d 0.65 / 0.67 (training / held-out family); at 256 x 256, jcs2d 0.83-0.85 / 0.82
# and deepsc3d 0.76-0.78 / 0.76-0.79 (docs/models.md, rendered by eval_report from docs/eval).
# Strict: once weights meet the targets, this marker must go.
@pytest.mark.xfail(
    strict=True,
    reason="issue 16: bundled weights miss the targets on the varied phantoms (docs/models.md)",
)
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("family", [FAMILY_QUADRIC, FAMILY_FOURIER])
def test_bundled_model_meets_the_targets_on_fresh_phantoms(
    fresh_sets: dict[str, Path], tmp_path: Path, model: str, family: str
) -> None:
    out = tmp_path / "report.json"
    evaluate_model(
        model,
        fresh_sets[family],
        split="all",
        onnx_file=bundled_onnx(model),
        out=out,
        weights=bundled_weights(model),
    )
    report = json.loads(out.read_text())
    figures = {
        "dice": report["segmentation"]["lesion_dice_mean"],
        "accuracy": report["classification"]["accuracy"],
        "confident false alarms": report["normal_scans"]["called_abnormal_over_0_9"],
    }
    assert report["cases"] == CASES_PER_FAMILY
    assert figures["dice"] >= TARGETS[family]["dice"], figures
    assert figures["accuracy"] >= TARGETS[family]["accuracy"], figures
    assert figures["confident false alarms"] == 0, figures
