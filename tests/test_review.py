"""The "needs review" flag: each rule on arrays whose answer is known, then on real series
through the analysis, the wire, the client's JSON, the overlay and the SR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import SMALL_SERIES_LESIONS, write_ct_series
from test_render import decode_png

from ctjoint.client.render import write_overlay_png
from ctjoint.client.results import ResultFormatError, result_dict
from ctjoint.contracts import CASE_SERIES_DIR, MODEL_JCS2D
from ctjoint.gateway.analysis import analyze_directory
from ctjoint.gateway.review import (
    COVERAGE_CUT,
    LESION_AT_HEART_OR_DIAPHRAGM,
    LESION_BURDEN_SMALL,
    LESION_OUTSIDE_LUNGS,
    LOW_CONFIDENCE,
    LUNG_VOLUME_IMPLAUSIBLE,
    LUNGS_NOT_FOUND,
    MODELS_DISAGREE,
    REASONS,
    THICK_SLICES,
    Review,
    ReviewPolicy,
    ReviewSignals,
    disagreement,
    end_fractions,
    end_slice_fractions,
    fused_review,
    lesion_location,
    location_fractions,
    measure,
    review_of,
)
from ctjoint.gateway.wire import result_to_proto
from ctjoint.render import CAPTION_REVIEW, text_strip_height

SCHEMA = Path(__file__).resolve().parent.parent / "client" / "schema" / "scan_result.schema.json"


def _signals(**values: float) -> ReviewSignals:
    """Signals of an unremarkable scan, with `values` changed."""
    base = {
        "confidence": 0.99,
        "lesion_ml": 0.0,
        "outside_fraction": 0.0,
        "between_fraction": 0.0,
        "lung_ml": 4000.0,
        "first_slice_lung_fraction": 0.02,
        "last_slice_lung_fraction": 0.05,
        "slice_mm": 1.25,
    }
    return ReviewSignals(**{**base, **values})


def _two_lungs() -> np.ndarray:
    """[3, 10, 12]: a right lung in columns 1-3 and a left lung in columns 8-10, rows 2-7."""
    lungs = np.zeros((3, 10, 12), dtype=np.uint8)
    lungs[:, 2:8, 1:4] = 1
    lungs[:, 2:8, 8:11] = 2
    return lungs


# --- the rules -------------------------------------------------------------------------------


def test_an_unremarkable_scan_needs_no_review() -> None:
    review = review_of(_signals(), MODEL_JCS2D)
    assert (review.needed, review.reasons) == (False, ())


def test_a_label_below_the_operating_point_is_low_confidence() -> None:
    policy = ReviewPolicy(min_confidence={MODEL_JCS2D: 0.8})
    review = review_of(_signals(confidence=0.79), MODEL_JCS2D, policy)
    assert review.reasons == (LOW_CONFIDENCE,)
    assert review.details == ("p = 0.790 for the label, below the operating point 0.8 of jcs2d",)
    assert review_of(_signals(confidence=0.8), MODEL_JCS2D, policy).needed is False


def test_lesion_between_the_lungs_is_at_the_heart_or_diaphragm() -> None:
    lungs = _two_lungs()
    lesion = np.zeros_like(lungs)
    lesion[1, 4:6, 5:7] = 2  # between the lungs on the same rows: the heart's place
    assert location_fractions(lesion, lungs) == (0.0, 1.0, 4)


def test_lesion_between_two_parts_of_one_lung_is_not_at_the_heart() -> None:
    lungs = _two_lungs()
    lungs[:, 2:8, 1:3] = 0  # a gap inside the right lung's rows
    lungs[:, 2:8, 0] = 1
    lesion = np.zeros_like(lungs)
    lesion[1, 4, 1:3] = 2  # right lung on both sides: not between the two lungs
    assert location_fractions(lesion, lungs) == (1.0, 0.0, 2)


def test_lesion_outside_both_lungs_and_not_between_them_is_outside() -> None:
    lungs = _two_lungs()
    lesion = np.zeros_like(lungs)
    lesion[1, 0, 5] = 1  # above the lungs' rows: chest wall
    lesion[1, 4, 3] = 1  # in the right lung
    assert location_fractions(lesion, lungs) == (0.5, 0.0, 2)


def test_location_rules_fire_above_their_limits_only_with_enough_lesion() -> None:
    policy = ReviewPolicy()
    heart = _signals(lesion_ml=39.0, between_fraction=0.9)
    assert review_of(heart, "deepsc3d", policy).reasons == (LESION_AT_HEART_OR_DIAPHRAGM,)
    outside = _signals(lesion_ml=10.0, outside_fraction=policy.max_outside_fraction + 0.05)
    assert review_of(outside, "deepsc3d", policy).reasons == (LESION_OUTSIDE_LUNGS,)
    tiny = _signals(lesion_ml=policy.min_lesion_ml / 2, between_fraction=1.0)
    assert review_of(tiny, "deepsc3d", policy).needed is False
    # A normal label is not supported by its lesions: where they lie does not question it.
    assert review_of(heart, "deepsc3d", policy, label="normal").needed is False
    assert review_of(heart, "deepsc3d", policy, label="cap").needed is True


def test_lungs_still_wide_at_an_end_of_the_series_mean_it_was_cut() -> None:
    lungs = _two_lungs()
    lungs[0] = 0  # the first slice is below the lungs; the last one is as wide as any
    assert end_slice_fractions(lungs) == (0.0, 1.0)
    review = review_of(_signals(last_slice_lung_fraction=1.0), MODEL_JCS2D)
    assert review.reasons == (COVERAGE_CUT,)
    assert "the last slice still holds 100% of the widest lung slice" in review.details[0]
    # Unscanned lung may hide lesions: it questions "normal", not a finding that was seen.
    cut = _signals(last_slice_lung_fraction=1.0, lesion_ml=80.0)
    assert review_of(cut, MODEL_JCS2D, label="normal").reasons == (COVERAGE_CUT,)
    assert review_of(cut, MODEL_JCS2D, label="covid19").needed is False
    assert review_of(cut, MODEL_JCS2D, label="cap").needed is False


def test_an_abnormal_label_on_a_few_millilitres_of_lesion_is_flagged() -> None:
    """A normal chest drawn as a mimic was called CAP with p = 0.999 on 7.6 mL of "lesion"
    (docs/review.md): nothing else questioned it."""
    policy = ReviewPolicy()
    speck = _signals(lesion_ml=7.6)
    review = review_of(speck, MODEL_JCS2D, policy, label="cap")
    assert review.reasons == (LESION_BURDEN_SMALL,)
    assert review.details == ("7.6 mL of lesion for an abnormal label (at least 10 mL)",)
    enough = _signals(lesion_ml=policy.min_abnormal_lesion_ml)
    assert review_of(enough, MODEL_JCS2D, policy, label="covid19").needed is False
    # A normal label, or none, is not supported by lesions at all.
    assert review_of(speck, MODEL_JCS2D, policy, label="normal").needed is False
    assert review_of(speck, MODEL_JCS2D, policy).needed is False


def test_no_lungs_and_thick_slices_are_reasons_of_their_own() -> None:
    review = review_of(_signals(lung_ml=0.0, slice_mm=8.0), MODEL_JCS2D)
    assert review.reasons == (LUNGS_NOT_FOUND, THICK_SLICES)
    assert review.details[1] == "slices of 8 mm, thicker than the 5 mm the models were trained on"


def test_disagreeing_networks_are_a_reason_and_reasons_combine_once_in_order() -> None:
    assert disagreement({"jcs2d": "normal", "deepsc3d": "normal"}).needed is False
    disagree = disagreement({"jcs2d": "normal", "deepsc3d": "cap"})
    assert disagree.details == ("the networks disagree: jcs2d normal, deepsc3d cap",)
    thick = review_of(_signals(slice_mm=8.0), MODEL_JCS2D)
    both = fused_review({"jcs2d": ("normal", thick), "deepsc3d": ("cap", thick)}, 0.99)
    assert both.reasons == (THICK_SLICES, MODELS_DISAGREE)
    assert both.details[1] == disagree.details[0]


def test_the_fused_answer_is_judged_on_its_own_probability() -> None:
    policy = ReviewPolicy(min_confidence={"jcs2d": 0.9, "deepsc3d": 0.98, "both": 0.95})
    sure = review_of(_signals(confidence=0.998), "jcs2d", policy)
    hesitant = review_of(_signals(confidence=0.903), "deepsc3d", policy)
    assert (sure.reasons, hesitant.reasons) == ((), (LOW_CONFIDENCE,))
    agree = {"jcs2d": ("covid19", sure), "deepsc3d": ("covid19", hesitant)}
    # The members agree and their mean, 0.9505, clears the fused operating point.
    assert fused_review(agree, 0.9505, policy).needed is False
    low = fused_review(agree, 0.94, policy)
    assert low.reasons == (LOW_CONFIDENCE,)
    assert low.details == (
        "p = 0.940 for the fused label, below the operating point 0.95 of the fused answer",
    )
    # Every other reason of a member stays.
    thick = review_of(_signals(confidence=0.903, slice_mm=8.0), "deepsc3d", policy)
    agree["deepsc3d"] = ("covid19", thick)
    assert fused_review(agree, 0.96, policy).reasons == (THICK_SLICES,)


def test_a_disagreeing_member_keeps_only_the_reasons_that_hold_for_any_label() -> None:
    """The slab case of docs/review.md: jcs2d normal, deepsc3d COVID-19 on 7.6 mL; the fused
    answer is normal, so deepsc3d's small-burden reason questions an answer it is not."""
    policy = ReviewPolicy()
    jcs2d = review_of(_signals(last_slice_lung_fraction=0.9), "jcs2d", policy, label="normal")
    deepsc3d = review_of(
        _signals(lesion_ml=7.6, lung_ml=1000.0, confidence=0.999),
        "deepsc3d",
        policy,
        label="covid19",
    )
    assert deepsc3d.reasons == (LUNG_VOLUME_IMPLAUSIBLE, LESION_BURDEN_SMALL)
    members = {"jcs2d": ("normal", jcs2d), "deepsc3d": ("covid19", deepsc3d)}
    fused = fused_review(members, 0.99, policy, label="normal")
    assert fused.reasons == (LUNG_VOLUME_IMPLAUSIBLE, COVERAGE_CUT, MODELS_DISAGREE)
    # Had the fused answer been COVID-19, jcs2d's coverage reason would go instead.
    fused = fused_review(members, 0.99, policy, label="covid19")
    assert fused.reasons == (LUNG_VOLUME_IMPLAUSIBLE, MODELS_DISAGREE, LESION_BURDEN_SMALL)


def test_a_review_without_reasons_cannot_be_needed() -> None:
    with pytest.raises(ValueError, match="needed exactly when there is a reason"):
        Review(needed=True)
    with pytest.raises(ValueError, match="unknown review reasons"):
        Review(needed=True, reasons=("gut_feeling",))


# --- on real series --------------------------------------------------------------------------


def test_thick_slices_are_flagged_through_the_analysis_and_the_wire(
    tmp_path: Path, contract_model_dir: Path
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    folder = tmp_path / "thick"
    write_ct_series(folder, slices=8, size=32, spacing_z=8.0, lesions=SMALL_SERIES_LESIONS)
    result = analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir).result
    assert THICK_SLICES in result.review.reasons and result.review.needed
    assert result.review.signals is not None and result.review.signals.slice_mm == 8.0
    direct = json.loads(json.dumps(result.to_dict()))
    rebuilt = result_dict(result_to_proto(result, request_id="r"))
    assert rebuilt["review"] == direct["review"]
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validate(direct, schema)
    jsonschema.validate(rebuilt, schema)
    # Every reason the gateway can give is one the schema admits, and no other.
    review_schema = schema["$defs"]["review"]["properties"]["reasons"]["items"]
    assert set(review_schema["enum"]) == set(REASONS)


def test_a_flag_without_reasons_on_the_wire_does_not_decode(
    ct_series_dir: Path, contract_model_dir: Path
) -> None:
    result = analyze_directory(ct_series_dir, model=MODEL_JCS2D, model_dir=contract_model_dir)
    message = result_to_proto(result.result, request_id="r")
    message.review.needed = True
    del message.review.reasons[:]
    with pytest.raises(ResultFormatError, match="review flag and its reasons disagree"):
        result_dict(message)


def test_coverage_cut_follows_what_the_generator_left_out(
    tmp_path: Path, contract_model_dir: Path
) -> None:
    """A 12-slice slab through the mid lungs is cut; a phantom that covers the whole chest
    (seed 7) is not; one whose generator cut its bases off (seed 5, `base-cut`) is."""
    from ctjoint.export.phantom import write_phantom_case

    cases = {
        "slab": write_phantom_case(tmp_path / "slab", kind="normal", seed=5, slices=12, size=64),
        "whole": write_phantom_case(
            tmp_path / "whole", kind="normal", seed=7, slices=None, size=64
        ),
        "base": write_phantom_case(tmp_path / "base", kind="normal", seed=5, slices=None, size=64),
    }
    coverage = {
        name: json.loads((case.out_dir / "truth" / "label.json").read_text())["scanner"]["coverage"]
        for name, case in cases.items()
    }
    assert (coverage["whole"], coverage["base"]) == ("full", "base-cut")
    signals = {
        name: analyze_directory(
            case.out_dir / CASE_SERIES_DIR, model=MODEL_JCS2D, model_dir=contract_model_dir
        ).result.review.signals
        for name, case in cases.items()
    }
    # Judged as a normal answer would be (the contract network's own label is arbitrary).
    flagged = {
        name: COVERAGE_CUT in review_of(s, MODEL_JCS2D, label="normal").reasons
        for name, s in signals.items()
        if s is not None
    }
    assert flagged == {"slab": True, "whole": False, "base": True}


def test_the_overlay_caption_says_review_and_draws_every_reason(tmp_path: Path) -> None:
    hu = np.full((2, 16, 16), -800.0, dtype=np.float32)
    labels = np.zeros((2, 16, 16), dtype=np.uint8)
    plain = tmp_path / "plain.png"
    flagged = tmp_path / "flagged.png"
    write_overlay_png(hu, labels, plain, legend=False)
    caption = Review.of([(code, "") for code in REASONS]).caption
    write_overlay_png(hu, labels, flagged, legend=False, caption=caption)
    assert caption.startswith("REVIEW - LOW CONFIDENCE - ")
    # The caption is drawn below the montage: the flagged image is taller by its line.
    plain_image, flagged_image = decode_png(plain.read_bytes()), decode_png(flagged.read_bytes())
    assert flagged_image.shape[0] == plain_image.shape[0] + text_strip_height()
    line = flagged_image[plain_image.shape[0] :]
    assert (line == CAPTION_REVIEW).all(axis=2).any()
    # The image widens to hold the whole caption, every reason written out.
    assert flagged_image.shape[1] > plain_image.shape[1]


def _plain_location_fractions(
    label_map: np.ndarray, air_lungs: np.ndarray
) -> tuple[float, float, int]:
    """The rule on the whole volume at once (as it was written first)."""
    lesion = label_map > 0
    total = int(np.count_nonzero(lesion))
    if total == 0:
        return 0.0, 0.0, 0
    outside_lungs = lesion & (air_lungs == 0)
    between = np.zeros_like(outside_lungs)
    for first, second in ((1, 2), (2, 1)):
        one, other = air_lungs == first, air_lungs == second
        before_one = np.maximum.accumulate(one, axis=2)
        after_one = np.maximum.accumulate(one[:, :, ::-1], axis=2)[:, :, ::-1]
        before_other = np.maximum.accumulate(other, axis=2)
        after_other = np.maximum.accumulate(other[:, :, ::-1], axis=2)[:, :, ::-1]
        between |= outside_lungs & before_one & ~after_one & after_other & ~before_other
    n_between = int(np.count_nonzero(between))
    n_outside = int(np.count_nonzero(outside_lungs)) - n_between
    return n_outside / total, n_between / total, total


def test_location_fractions_by_chunks_equal_the_whole_volume_rule() -> None:
    # 50 slices with lesions scattered over 37 of them: several of the rule's chunks.
    rng = np.random.default_rng(22)
    lungs = np.zeros((50, 20, 30), dtype=np.uint8)
    lungs[:, 4:16, 3:12] = 1
    lungs[:, 4:16, 18:27] = 2
    lungs[:, 8:10, 7:9] = 0  # a hole in the right lung
    labels = (rng.random(lungs.shape) < 0.05).astype(np.uint8) * rng.integers(
        1, 3, size=lungs.shape, dtype=np.uint8
    )
    labels[:13] = 0
    result = location_fractions(labels, lungs)
    assert result == _plain_location_fractions(labels, lungs)
    assert result[0] > 0 and result[1] > 0 and result[2] == int(np.count_nonzero(labels))
    assert location_fractions(np.zeros_like(labels), lungs) == (0.0, 0.0, 0)


@pytest.mark.parametrize("case", ["scattered", "edges", "one-lung", "left-first", "no-lungs"])
def test_the_location_rule_from_the_lesion_rows_equals_the_whole_volume_rule(case: str) -> None:
    rng = np.random.default_rng(8)
    shape = (12, 30, 40)
    # Lungs as pixel noise: rows where each lung starts, stops and starts again.
    lungs = (rng.random(shape) < 0.2) * rng.integers(1, 3, shape)
    if case == "one-lung":
        lungs[lungs == 2] = 0
    elif case == "left-first":
        lungs = np.zeros(shape, dtype=np.int64)
        lungs[:, 5:25, 28:36] = 1
        lungs[:, 5:25, 4:12] = 2
    elif case == "no-lungs":
        lungs[:] = 0
    lungs = lungs.astype(np.uint8)
    labels = ((rng.random(shape) < 0.15) * rng.integers(1, 3, shape)).astype(np.uint8)
    if case == "edges":
        labels[:] = 0
        labels[:, :, [0, -1]] = 1
        labels[:, [0, -1], :] = 2
    found = np.nonzero(labels)
    order = rng.permutation(found[0].size)  # any order of the voxels
    located = lesion_location(lungs, *(axis[order] for axis in found))
    assert located == _plain_location_fractions(labels, lungs)
    assert location_fractions(labels, lungs) == located
    if case in ("scattered", "left-first"):
        assert located[1] > 0  # some lesion voxels are between the lungs


def test_measure_from_the_quantifiers_counts_gives_the_signals_of_the_maps() -> None:
    lungs = _two_lungs()
    lungs[0, 2:4] = 0  # a smaller first slice
    lesion = np.zeros_like(lungs)
    lesion[1, 4:6, 5:7] = 2
    lesion[2, 3, 2] = 1
    slice_voxels = np.count_nonzero(lungs, axis=(1, 2))
    assert end_fractions(slice_voxels) == end_slice_fractions(lungs)
    assert end_fractions(np.zeros(3, dtype=np.int64)) == end_slice_fractions(np.zeros_like(lungs))
    signals = measure(
        label="covid19",
        probabilities={"covid19": 0.9, "cap": 0.05, "normal": 0.05},
        location=location_fractions(lesion, lungs),
        slice_lung_voxels=slice_voxels,
        voxel_ml=0.5,
        spacing_mm=(2.0, 0.7, 0.7),
        slice_thickness_mm=3.0,
    )
    first, last = end_slice_fractions(lungs)
    assert signals == ReviewSignals(
        confidence=0.9,
        lesion_ml=5 * 0.5,
        outside_fraction=0.0,
        between_fraction=4 / 5,
        lung_ml=int(np.count_nonzero(lungs)) * 0.5,
        first_slice_lung_fraction=first,
        last_slice_lung_fraction=last,
        slice_mm=3.0,
    )
    assert (first, last) == (24 / 36, 1.0)
