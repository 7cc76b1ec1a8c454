"""The bundled (phantom-trained) models through gateway + client: fresh phantoms of each class
come back with the right label and the masks of the embedded analysis.

Needs build/onnx/<model>.onnx, which `make test` exports from the bundled weights first; a
model whose file is absent is skipped with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gateway_process import GatewayProcess, ctjoint

from ctjoint.contracts import (
    CASE_SERIES_DIR,
    MODEL_NAMES,
    default_model_dir,
    onnx_path,
)
from ctjoint.gateway.analysis import analyze_directory

KINDS = ("covid19", "cap", "normal")
# Seeds far from any the bundled set was generated with, so these scans are unseen.
SEED_BASE = 880_000
PRESENT = tuple(m for m in MODEL_NAMES if onnx_path(m).is_file())


def _need(model: str) -> None:
    if model not in PRESENT:
        pytest.skip(f"{onnx_path(model)} is absent: run `make onnx` (make test does it first)")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    if not PRESENT:
        pytest.skip(f"no exported model in {default_model_dir()}: run `make onnx`")
    args = [arg for model in PRESENT for arg in ("--model", model)]
    log = tmp_path_factory.mktemp("gw") / "gateway.log"
    process = GatewayProcess(default_model_dir(), log, *args).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ctjoint.export.phantom import write_phantom_case

    root = tmp_path_factory.mktemp("bundled_phantoms")
    return {
        kind: write_phantom_case(
            root / kind, kind=kind, seed=SEED_BASE + i, slices=40, size=256
        ).out_dir
        / CASE_SERIES_DIR
        for i, kind in enumerate(KINDS)
    }


CASES = [pytest.param(model, kind) for model in MODEL_NAMES for kind in KINDS]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_phantom_gets_the_embedded_label_and_masks_through_the_gateway(
    gateway: GatewayProcess, phantoms: dict[str, Path], tmp_path: Path, model: str, kind: str
) -> None:
    _need(model)
    out = tmp_path / "out"
    series = phantoms[kind]
    done = ctjoint(
        "send", str(series), "--gateway", gateway.address, "--model", model, "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    embedded = analyze_directory(series, model=model)
    assert result["label"] == embedded.result.label
    with np.load(out / "masks.npz") as masks:
        np.testing.assert_array_equal(masks["labels"], embedded.label_map)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "kind"), CASES)
def test_a_fresh_phantom_gets_its_label(phantoms: dict[str, Path], model: str, kind: str) -> None:
    _need(model)
    analysis = analyze_directory(phantoms[kind], model=model)
    assert analysis.result.label == kind, analysis.result.probabilities
