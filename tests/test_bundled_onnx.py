"""The committed ONNX of each bundled checkpoint (export/weights/<model>_tiny.onnx, what
serving runs without torch) is what a fresh export of that checkpoint gives today.

When this fails, the checkpoint (or the exporter) changed: `make bundled-onnx` re-exports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ctjoint import contracts
from ctjoint.export.bundled import bundled_onnx, bundled_weights
from ctjoint.export.onnx_export import export_onnx
from ctjoint.export.triton_spec import ModelFacts, image_dims

# Both files come from one checkpoint through ONNX Runtime on one machine: only the exporter's
# float re-association separates them.
TOLERANCE = 1e-4


def _run(path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {contracts.INPUT_IMAGE: image}), strict=True))


@pytest.mark.parametrize("model", contracts.MODEL_NAMES)
def test_committed_onnx_equals_a_fresh_export_of_the_bundled_weights(
    tmp_path: Path, model: str
) -> None:
    committed = bundled_onnx(model)
    assert committed.is_file(), f"{committed} is missing: run `make bundled-onnx`"
    fresh = tmp_path / f"{model}.onnx"
    export_onnx(model, bundled_weights(model), fresh)
    dims = image_dims(ModelFacts.from_onnx(committed).plan)
    image = np.random.default_rng(5).uniform(-1, 1, (2, *dims)).astype(np.float32)
    want, have = _run(fresh, image), _run(committed, image)
    assert sorted(have) == sorted(want)
    diffs = {name: float(np.max(np.abs(have[name] - want[name]))) for name in want}
    assert max(diffs.values()) <= TOLERANCE, (
        f"{committed} is stale (max abs diff {diffs}): run `make bundled-onnx`"
    )
    meta = {p.key: p.value for p in onnx.load(str(committed)).metadata_props}
    fresh_meta = {p.key: p.value for p in onnx.load(str(fresh)).metadata_props}
    assert meta == fresh_meta
