"""The phantom-trained tiny weights shipped in export/weights: loadable, small, and evaluated."""

from __future__ import annotations

import json

import pytest

from ctjoint.contracts import CLASS_NAMES, MODEL_NAMES
from ctjoint.export.configs import get_config
from ctjoint.export.onnx_export import WEIGHTS_DIR, bundled_weights
from ctjoint.export.train import load_checkpoint, model_from_checkpoint

# Issue 3, point 6: what the bundled models must reach on the held-out phantom test split.
TARGET_LESION_DICE = 0.85
TARGET_ACCURACY = 0.95


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


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_bundled_evaluation_meets_the_targets(model: str) -> None:
    report = json.loads((WEIGHTS_DIR / f"{model}_tiny.eval.json").read_text())
    assert report["split"] == "test"
    assert report["classes"] == list(CLASS_NAMES)
    assert report["segmentation"]["lesion_dice_mean"] >= TARGET_LESION_DICE
    assert report["classification"]["accuracy"] >= TARGET_ACCURACY
