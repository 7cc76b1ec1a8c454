"""Temperature scaling: fitting on validation logits, the metrics that judge it, and every
serving path dividing the logits by the temperature stored with the model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from contract_models import export_contract_model

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D, ONNX_META_TEMPERATURE
from ctjoint.export.calibrate import (
    TEMPERATURE_BOUNDS,
    CaseLogits,
    fit_temperature,
    platt_targets,
    scan_probabilities,
)
from ctjoint.export.metrics import brier_score, expected_calibration_error
from ctjoint.export.triton_spec import ModelFacts, ensemble_spec, postprocess_spec
from ctjoint.gateway.aggregate import softmax
from ctjoint.gateway.backends.base import Temperature, model_info_from_metadata
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.errors import BackendError


def test_ece_of_a_perfectly_calibrated_bin_is_zero_and_of_overconfidence_the_gap() -> None:
    # Four cases at confidence 0.75, three right: calibrated.
    probs = np.array([[0.75, 0.25, 0.0]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    # Confidence 0.9, half right: ECE 0.4.
    probs = np.array([[0.9, 0.1, 0.0]] * 2)
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.4)


def test_brier_score_is_the_mean_squared_distance_to_the_truth() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert brier_score(probs, np.array([0, 1])) == pytest.approx((0.0 + 0.5) / 2)


def test_fit_recovers_the_temperature_that_generated_the_labels() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 4.0, (3000, 3))
    true_t = 2.5
    probs = softmax(logits / true_t, axis=1)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    cases = [
        CaseLogits(int(y), z[None], np.zeros((1, 3)), np.zeros(1, np.int64))
        for z, y in zip(logits, labels, strict=True)
    ]
    fit = fit_temperature(cases, "3d")
    assert fit.temperature.cls == pytest.approx(true_t, rel=0.1)
    assert fit.cls_nll[1] < fit.cls_nll[0]
    assert not fit.cls_separable


def test_platt_targets_give_each_case_its_class_count_plus_one_over_plus_two() -> None:
    targets = platt_targets([0, 0, 1], 3)
    np.testing.assert_allclose(
        targets, [[3 / 4, 1 / 8, 1 / 8], [3 / 4, 1 / 8, 1 / 8], [1 / 6, 2 / 3, 1 / 6]]
    )


def test_a_validation_split_separated_without_doubt_does_not_run_to_the_bound() -> None:
    # Every case right with the same margin: the likelihood only grows as the temperature
    # falls, so the plain fit would stop at the search bound (0.05: logits x 20).
    margin = 6.0
    cases = [
        CaseLogits(label, margin * np.eye(3)[label][None], np.zeros((1, 3)), np.zeros(1, np.int64))
        for label in range(3)
        for _ in range(10)
    ]
    fit = fit_temperature(cases, "3d")
    assert fit.cls_separable
    assert fit.to_dict()["cls_target"] == "platt"
    # Platt's target for a class of 10 cases is 11/12: exp(margin / T) / (exp(margin / T) + 2)
    # = 11/12 at T = margin / ln 22.
    assert fit.temperature.cls == pytest.approx(margin / np.log(22.0), rel=1e-3)
    assert fit.temperature.cls > TEMPERATURE_BOUNDS[0] * 10


def test_jcs2d_scan_probabilities_go_through_the_slice_vote() -> None:
    slices = np.array([[4.0, 0.0, 0.0]] * 5 + [[0.0, 0.0, 4.0]] * 20)
    sharp = scan_probabilities(slices, "2.5d", 0.5)
    soft = scan_probabilities(slices, "2.5d", 4.0)
    assert sharp.sum() == pytest.approx(1.0) and soft.sum() == pytest.approx(1.0)
    assert sharp[0] > soft[0]


def test_temperature_divides_each_head_and_never_moves_an_argmax() -> None:
    from ctjoint.gateway.backends.base import ModelOutputs

    seg = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    cls = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]], np.float32)
    out = Temperature(cls=2.0, seg=4.0).apply(ModelOutputs(seg, cls))
    np.testing.assert_allclose(out.cls_logits, cls / 2.0)
    np.testing.assert_allclose(out.seg_logits, seg / 4.0)
    np.testing.assert_array_equal(out.seg_logits.argmax(1), seg.argmax(1))


def test_bad_temperature_metadata_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = export_contract_model(MODEL_JCS2D, tmp_path)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta[ONNX_META_TEMPERATURE] = json.dumps({"cls": -1.0, "seg": 1.0})
    with pytest.raises(BackendError, match=r"ctjoint\.temperature.*must be a positive"):
        model_info_from_metadata(MODEL_JCS2D, meta, source="x.onnx")


def test_embedded_backend_applies_the_exported_temperature(tmp_path: Path) -> None:
    plain = export_contract_model(MODEL_DEEPSC3D, tmp_path / "plain")
    proto = onnx.load(str(plain))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_TEMPERATURE, json.dumps({"cls": 3.0, "seg": 2.0})
    (tmp_path / "hot").mkdir()
    onnx.save(proto, str(tmp_path / "hot" / plain.name))
    image = np.random.default_rng(1).normal(size=(1, 1, 8, 32, 32)).astype(np.float32)

    async def run(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        async with EmbeddedBackend((MODEL_DEEPSC3D,), model_dir=folder) as backend:
            out = await backend.infer(MODEL_DEEPSC3D, image)
            return out.cls_logits, out.seg_logits

    cls_plain, seg_plain = asyncio.run(run(plain.parent))
    cls_hot, seg_hot = asyncio.run(run(tmp_path / "hot"))
    np.testing.assert_allclose(cls_hot, cls_plain / 3.0, rtol=1e-5)
    np.testing.assert_allclose(seg_hot, seg_plain / 2.0, rtol=1e-5)


def test_the_triton_ensemble_carries_the_temperature_and_only_the_gateway_applies_it(
    tmp_path: Path,
) -> None:
    facts = ModelFacts.from_config(MODEL_JCS2D)
    hot = ModelFacts(
        facts.model, facts.plan, facts.version, facts.trained_on, facts.cam_grid, '{"cls": 2.0}'
    )
    assert (ONNX_META_TEMPERATURE, '{"cls": 2.0}') in ensemble_spec(hot, "cpu").parameters
    # The postprocess step computes no probabilities, so it needs no temperature: the gateway
    # reads it from the ensemble and divides the logits once, as with the embedded backend.
    assert postprocess_spec(hot).parameters == ()
